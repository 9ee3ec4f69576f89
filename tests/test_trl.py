"""NTHRGRPOTrainer on CPU: a tiny Qwen2 built from a config, a local character-level tokenizer, no download."""
from __future__ import annotations

import copy
import gc
import importlib.util
import pathlib
import warnings
import weakref

import pytest
import torch

from nthr_kernels.core.rules import SCORE_TOLERANCE

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from trl import GRPOConfig, GRPOTrainer  # noqa: E402
from trl.trainer.utils import add_fused_lm_head  # noqa: E402

from nthr_kernels import nthr_advantages  # noqa: E402
from nthr_kernels.integrations.trl import CAPTURE_MODES, NTHRGRPOTrainer, capture_old_policy, check_lm_head  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
G = 4
TEMPERATURE = 0.9


_spec = importlib.util.spec_from_file_location(
    "trl_train_example", pathlib.Path(__file__).resolve().parents[1] / "examples" / "trl_train.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)  # the example's tiny model, tokenizer and reward (nothing downloaded)
_tokenizer, _model = example.tiny_tokenizer, example.tiny_model


PROMPTS = ["1+2=", "3+4=", "ab", "9 9", "j=", "0+0="]
REWARD_LOG: list = []


def parity_reward(completions, **kwargs):
    r = example.parity_reward(completions)
    REWARD_LOG.append(r)
    return r


def _args(tmp_path, **kw):
    base = dict(
        output_dir=str(tmp_path), per_device_train_batch_size=2 * G, num_generations=G, max_completion_length=12,
        max_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0, temperature=TEMPERATURE,
        logging_steps=1, bf16=False,  # float32 everywhere: the comparisons below are exact up to float32 rounding
    )
    base.update(kw)
    return GRPOConfig(**base)


def _trainer(cls, tmp_path, model=None, args=None, **kw):
    return cls(model=model or _model(), reward_funcs=parity_reward, args=args or _args(tmp_path),
               train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=_tokenizer(), **kw)


def _rows(prompts):
    return [{"prompt": p} for p in prompts for _ in range(G)]


# --------------------------------------------------------------------------------------------------
class Recording(NTHRGRPOTrainer):
    """Records the generated batch, an independent NTHR computation, and what reaches the loss."""

    def _generate_and_score_completions(self, inputs):
        n_before = len(REWARD_LOG)
        out = super()._generate_and_score_completions(inputs)
        rewards = torch.tensor(REWARD_LOG[n_before])
        # independent old-policy quantities: the model's own hidden states and logits (no fused head)
        model = self.accelerator.unwrap_model(self.model)
        ids = torch.cat([out["prompt_ids"], out["completion_ids"]], 1)
        am = torch.cat([out["prompt_mask"], out["completion_mask"]], 1)
        c = out["completion_ids"].shape[1]
        was = model.training
        model.eval()
        with torch.no_grad():
            o = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
        model.train(was)
        hidden = o.hidden_states[-1][:, -c - 1 : -1]
        logits = o.logits[:, -c - 1 : -1]
        ref = nthr_advantages(
            hidden, out["completion_ids"], rewards, self._plain_adv(rewards), logits=logits,
            temperature=self.temperature, mask=out["completion_mask"].bool(), group_size=G, backend="reference",
            beta=self.nthr_beta, eta=self.nthr_eta, anchor=self.nthr_anchor,
        )
        self.record = dict(out={k: v.clone() for k, v in out.items() if isinstance(v, torch.Tensor)}, ref=ref,
                           rewards=rewards)
        self.loss_inputs = []
        return out

    @staticmethod
    def _plain_adv(rewards):
        r = rewards.view(-1, G)
        a = (r - r.mean(1, keepdim=True)) / (r.std(1, keepdim=True) + 1e-4)
        return a.reshape(-1)

    def _compute_loss(self, model, inputs):
        self.loss_inputs.append({k: v.clone() for k, v in inputs.items() if isinstance(v, torch.Tensor)})
        return super()._compute_loss(model, inputs)


def test_train_step_uses_nthr_advantages(tmp_path):
    tr = _trainer(Recording, tmp_path, nthr_beta=0.0)
    tr.train()
    rec, res = tr.record, tr.nthr_last
    out, ref = rec["out"], rec["ref"]
    mask = out["completion_mask"].bool()
    # TRL's own [B] advantages were replaced by [B, C] NTHR advantages, equal to an independent computation
    assert out["advantages"].shape == out["completion_ids"].shape
    # float32 (library, log-prob shortcut) against float64 (reference, full softmax over the model's logits)
    torch.testing.assert_close(res.scores, ref.scores, rtol=0, atol=SCORE_TOLERANCE[torch.float32] * float(ref.scores.abs().max()))
    assert torch.equal(res.selected, ref.selected)
    torch.testing.assert_close(out["advantages"], ref.token_advantages, rtol=1e-5, atol=1e-6)
    assert bool(res.selected.any()), "NTHR selected nothing: the test would not see the rescale"
    plain = Recording._plain_adv(rec["rewards"])[:, None].expand_as(mask)
    assert bool((out["advantages"][mask] != plain[mask]).any())
    # every row that reached the loss carries its NTHR advantages (rows are shuffled by TRL)
    seen = 0
    for inp in tr.loss_inputs:
        assert inp["advantages"].dim() == 2
        for i in range(inp["completion_ids"].shape[0]):
            j = [k for k in range(out["completion_ids"].shape[0])
                 if torch.equal(out["completion_ids"][k], inp["completion_ids"][i])
                 and torch.equal(out["prompt_ids"][k], inp["prompt_ids"][i])
                 and torch.equal(out["advantages"][k], inp["advantages"][i])]
            assert j, "a row reached the loss with advantages that are not the NTHR ones"
            seen += 1
    assert seen == out["completion_ids"].shape[0]


def test_unscorable_completions_do_not_count_as_wrong(tmp_path):
    # TRL leaves a completion that every reward function scored None out of its group's baseline (advantage
    # 0); NTHR counted it as a wrong response, so its group's success rate, hence eta, was off
    def some_none(completions, **kwargs):
        r = example.parity_reward(completions)
        return [None if i % G == G - 1 else v for i, v in enumerate(r)]  # the last completion of each group

    tr = NTHRGRPOTrainer(model=_model(3), reward_funcs=some_none, args=_args(tmp_path),
                         train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=_tokenizer(),
                         nthr_beta=0.0)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    checked = 0
    for seed in range(8):
        torch.manual_seed(seed)
        out = tr._generate_and_score_completions(_rows(PROMPTS[:2]))
        res = tr.nthr_last
        rpf = tr._nthr_rewards_per_func
        for grp in range(2):
            r = rpf[grp * G:(grp + 1) * G, 0]
            scored = r[~torch.isnan(r)]
            n_pos, n = int((scored == 1).sum()), scored.numel()
            k = int((res.group_ids == grp).nonzero()[0, 0])
            assert bool(res.active[k]) == (0 < n_pos < n), (r, res.active[k])
            if 0 < n_pos < n:
                checked += 1
                assert float(res.eta[k]) == pytest.approx(2 * abs(0.5 - n_pos / n))
        # the unscorable rows keep TRL's advantage of 0 and are never selected
        none_rows = torch.isnan(rpf[:, 0])
        assert bool((out["advantages"][none_rows] == 0).all()) and not bool(res.selected[none_rows].any())
    assert checked > 0, "no mixed group in any draw: the test saw no eta"


def test_eta_one_loss_equals_plain_grpo(tmp_path):
    model = _model(1)
    plain = _trainer(GRPOTrainer, tmp_path / "p", model=copy.deepcopy(model))
    one = _trainer(NTHRGRPOTrainer, tmp_path / "n", model=copy.deepcopy(model), nthr_eta=1.0, nthr_beta=0.0)
    default = _trainer(NTHRGRPOTrainer, tmp_path / "d", model=copy.deepcopy(model), nthr_beta=0.0)
    losses, outs = [], []
    for tr in (plain, one, default):
        tr.model.train()
        tr.current_gradient_accumulation_steps = 1  # set by the training loop, read by the loss
        torch.manual_seed(123)
        out = tr._generate_and_score_completions(_rows(PROMPTS[:2]))
        outs.append(out)
        losses.append(tr._compute_loss(tr.model, out).detach())
    assert torch.equal(outs[0]["completion_ids"], outs[1]["completion_ids"])
    assert outs[0]["advantages"].dim() == 1 and outs[1]["advantages"].dim() == 2
    assert bool(one.nthr_last.selected.any())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-6, atol=1e-7)
    assert not torch.allclose(losses[2], losses[0], rtol=1e-6, atol=1e-7)


def test_capture_matches_model_logits():
    model = _model(2)
    add_fused_lm_head(model, temperature=0.7)
    ids = torch.randint(3, 26, (3, 9))
    am = torch.ones_like(ids)
    am[0, :2] = 0  # left padding
    am[1, -3:] = 0  # right padding of a short completion
    hidden, lp = capture_old_policy(model, ids, am, 5, batch_size=2)
    model.eval()
    with torch.no_grad():
        o = model(input_ids=ids, attention_mask=am, output_hidden_states=True)
    torch.testing.assert_close(hidden, o.hidden_states[-1][:, -6:-1])
    ref = torch.log_softmax(o.logits[:, -6:-1].float() / 0.7, -1).gather(-1, ids[:, -5:, None]).squeeze(-1)
    valid = am[:, -5:].bool()
    torch.testing.assert_close(lp[valid], ref[valid], rtol=1e-5, atol=1e-5)
    w = model.get_output_embeddings().weight
    torch.testing.assert_close(hidden @ w.T, o.logits[:, -6:-1], rtol=1e-5, atol=1e-5)


def test_refusals(tmp_path):
    with pytest.raises(ValueError, match="use_liger_kernel"):
        _trainer(NTHRGRPOTrainer, tmp_path, args=_args(tmp_path, use_liger_kernel=True))
    with pytest.raises(ValueError, match="off_policy_mask_threshold"):
        _trainer(NTHRGRPOTrainer, tmp_path, args=_args(tmp_path, off_policy_mask_threshold=0.5))
    with pytest.raises(ValueError, match="nthr_eta"):
        _trainer(NTHRGRPOTrainer, tmp_path, nthr_eta=2.0)
    with pytest.raises(ValueError, match="nthr_anchor"):
        _trainer(NTHRGRPOTrainer, tmp_path, nthr_anchor="mine")
    with pytest.raises(ValueError, match="nthr_backend: unknown"):
        _trainer(NTHRGRPOTrainer, tmp_path, nthr_backend="cuda")
    m = _model()
    m.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        check_lm_head(m)
    m = _model()
    m.lm_head.bias = torch.nn.Parameter(torch.zeros(26))
    with pytest.raises(ValueError, match="bias"):
        check_lm_head(m)


def test_unavailable_backend_refused_at_construction(tmp_path, monkeypatch):
    """A backend this process cannot run is refused when the trainer is built, under the trainer's argument
    name, not at the first training step under the library's."""
    import nthr_kernels.integrations.trl as trl_mod

    monkeypatch.setattr(trl_mod, "available_backends", lambda: ["reference", "torch"])
    for b in ("triton", "native"):
        with pytest.raises(ValueError, match=f"nthr_backend: '{b}' is not available here"):
            _trainer(NTHRGRPOTrainer, tmp_path, nthr_backend=b)


def test_non_binary_rewards_refused(tmp_path):
    def graded(completions, **kw):
        return [float(len(c) % 3) for c in completions]

    tr = NTHRGRPOTrainer(model=_model(), reward_funcs=graded, args=_args(tmp_path),
                         train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=_tokenizer())
    tr.model.train()
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="rewards: expected binary"):
        tr._generate_and_score_completions(_rows(PROMPTS[:2]))


# --------------------------------------------------------------------------------------------------
# capture modes: no forward GRPOTrainer does not run, advantages as with the extra forward
# --------------------------------------------------------------------------------------------------
# the GRPOConfig fields that select each mode on CPU (vLLM, the other way to "old_logps", needs a GPU)
MODE_CONFIGS = {"generate": {}, "old_logps": {"num_iterations": 2}}


def _counted_step(cls, tmp_path, model, cfg, **kw):
    """One training step; returns (trainer, number of forward calls of the policy's backbone)."""
    calls = []
    handle = model.base_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        tr = _trainer(cls, tmp_path, model=model, args=_args(tmp_path, **cfg), **kw)
        tr.train()
    finally:
        handle.remove()
    return tr, len(calls)


@pytest.mark.parametrize("mode", sorted(MODE_CONFIGS))
def test_capture_runs_no_extra_forward_and_keeps_advantages(tmp_path, mode):
    cfg = MODE_CONFIGS[mode]
    model = _model(3)
    _, n_grpo = _counted_step(GRPOTrainer, tmp_path / "g", copy.deepcopy(model), cfg)
    auto, n_auto = _counted_step(NTHRGRPOTrainer, tmp_path / "a", copy.deepcopy(model), cfg, nthr_beta=0.0)
    extra, n_extra = _counted_step(NTHRGRPOTrainer, tmp_path / "f", copy.deepcopy(model), cfg, nthr_beta=0.0,
                                   nthr_capture="forward")
    assert auto.nthr_capture == mode and extra.nthr_capture == "forward"
    assert n_auto == n_grpo, f"{mode}: NTHRGRPOTrainer ran {n_auto - n_grpo} forward(s) GRPOTrainer does not"
    assert n_extra == n_grpo + 1  # the extra forward (one chunk of per_device_train_batch_size rows)
    a, f = auto.nthr_last, extra.nthr_last
    assert bool(f.selected.any()) and not bool(f.selected.all()), "the comparison needs a non-trivial selection"
    torch.testing.assert_close(a.scores, f.scores, rtol=0, atol=SCORE_TOLERANCE[torch.float32] * float(f.scores.abs().max()))
    assert torch.equal(a.selected, f.selected)
    assert torch.equal(a.token_advantages, f.token_advantages)


class GatherCounting(NTHRGRPOTrainer):
    """Counts the rollout batches of training (each one NTHR step)."""

    def _generate_and_score_completions(self, inputs):
        self.n_batches = getattr(self, "n_batches", 0) + self.model.training
        return super()._generate_and_score_completions(inputs)


@pytest.mark.parametrize("mode", sorted(MODE_CONFIGS) + ["forward"])
def test_fsdp2_lm_head_weight_gathered_once_per_step(tmp_path, mode):
    # An FSDP2 weight is a DTensor whose full_tensor() all-gathers it: the step must do that once (the "generate"
    # capture gathered it for the old log-probs and again for nthr_advantages), and keep no gathered copy after it.
    model = _model(3)
    gathered = []

    def full_tensor():  # the gather, on the unsharded weight: a new tensor each time, as DTensor.full_tensor gives
        full = model.lm_head.weight.detach().clone()
        gathered.append(weakref.ref(full.untyped_storage()))  # alive while any tensor (a detached view) holds it
        return full

    model.lm_head.weight.full_tensor = full_tensor  # TRL's own head checks isinstance(DTensor): only NTHR counts
    cfg = MODE_CONFIGS.get(mode, {})
    tr = _trainer(GatherCounting, tmp_path, model=model, args=_args(tmp_path, **cfg), nthr_capture=mode)
    tr.train()
    assert tr.n_batches >= 1
    assert len(gathered) == tr.n_batches, f"{mode}: {len(gathered)} gathers for {tr.n_batches} step(s)"
    gc.collect()
    assert all(ref() is None for ref in gathered), "a gathered lm_head weight outlived its step"


def test_capture_mode_choice(tmp_path):
    assert set(CAPTURE_MODES) == {"auto", *MODE_CONFIGS, "forward"}
    with pytest.raises(ValueError, match="nthr_capture: 'old_logps' is not available"):
        _trainer(NTHRGRPOTrainer, tmp_path, nthr_capture="old_logps")
    with pytest.raises(ValueError, match="nthr_capture: expected one of"):
        _trainer(NTHRGRPOTrainer, tmp_path, nthr_capture="vllm")
    # with both available, TRL's own old-log-prob forward is preferred (the same forward as the loss's)
    tr = _trainer(NTHRGRPOTrainer, tmp_path, args=_args(tmp_path, **MODE_CONFIGS["old_logps"]))
    assert tr.nthr_capture == "old_logps"
    assert _trainer(NTHRGRPOTrainer, tmp_path, nthr_capture="generate").nthr_capture == "generate"


# --------------------------------------------------------------------------------------------------
# two processes (gloo): a group straddles them, so the trainer takes the distributed path
# --------------------------------------------------------------------------------------------------
def _dist_worker(rank, world, port, out_dir):
    import os

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    import nthr_kernels.integrations.trl as mod

    calls = []
    real = mod.nthr_advantages

    def recording(*args, **kw):
        res = real(*args, **kw)
        calls.append(dict(args=[a.clone() for a in args], kw={k: v for k, v in kw.items() if k != "process_group"},
                          distributed=kw.get("process_group") is not None, result=res.__dict__))
        return res

    mod.nthr_advantages = recording
    # 6 rows per process, groups of 4: rows 4..7 of the global batch (group 1) straddle the two processes
    args = _args(f"{out_dir}/o{rank}", per_device_train_batch_size=6)
    tr = _trainer(NTHRGRPOTrainer, None, args=args, nthr_beta=0.0)
    tr.train()
    torch.save(calls, f"{out_dir}/rank{rank}.pt")
    import torch.distributed as dist

    dist.barrier()
    os._exit(0)  # results saved: leave without gloo's teardown, which can abort a rank (tests/test_distributed.py)


def test_group_straddling_processes_uses_distributed_path(tmp_path):
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_dist_worker, args=(2, port, str(tmp_path)), nprocs=2, join=True)
    calls = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    assert all(len(c) == 1 and c[0]["distributed"] for c in calls)
    # the same data in one process (packed layout)
    hid, ids, lp, cu, rew, adv, gid = [], [], [], [0], [], [], []
    for c in calls:
        h, t, r, a = c[0]["args"]
        m = c[0]["kw"]["mask"]
        for i in range(t.shape[0]):
            hid.append(h[i][m[i]])
            ids.append(t[i][m[i]])
            lp.append(c[0]["kw"]["old_logprobs"][i][m[i]])
            cu.append(cu[-1] + int(m[i].sum()))
        rew.append(r)
        adv.append(a)
        gid.append(c[0]["kw"]["group_ids"])
    gid = torch.cat(gid)
    assert gid.tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2]
    kw = calls[0][0]["kw"]
    single = nthr_advantages(
        torch.cat(hid), torch.cat(ids), torch.cat(rew), torch.cat(adv), lm_head_weight=kw["lm_head_weight"],
        old_logprobs=torch.cat(lp), cu_seqlens=torch.tensor(cu), group_ids=gid, temperature=kw["temperature"],
        beta=kw["beta"], eta=kw["eta"], backend="torch",
    )
    assert bool(single.active[1]), "the straddling group must be mixed for this test to mean anything"
    got_scores = torch.cat([c[0]["result"]["scores"][c[0]["kw"]["mask"]] for c in calls])
    got_adv = torch.cat([c[0]["result"]["token_advantages"][c[0]["kw"]["mask"]] for c in calls])
    torch.testing.assert_close(got_scores, single.scores, rtol=0, atol=1e-5 * float(single.scores.abs().max()))
    assert torch.equal(got_adv, single.token_advantages)
    for c in calls:
        assert torch.equal(c[0]["result"]["tau"].nan_to_num(9.0), single.tau.nan_to_num(9.0)) or torch.allclose(
            c[0]["result"]["tau"], single.tau, rtol=1e-5, equal_nan=True)
