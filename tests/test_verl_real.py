"""NTHR with real verl 0.9 (its DataProto, padding helpers, dispatch decorators and ``compute_advantage``).

Runs in the verl venv (``scripts/verl_env.sh`` creates it; ``.ci/run`` runs this file there); skipped where
verl is not installed. The actor's FSDP engine is replaced by a tiny Hugging Face Qwen2 that runs one
sequence at a time (verl's remove-padding layout, without flash-attention's varlen kernels on CPU); the
worker method, the layouts and everything on the driver are verl's own code.
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch

verl = pytest.importorskip("verl")

import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from transformers import Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from verl import DataProto  # noqa: E402
from verl.single_controller.base.decorator import MAGIC_ATTR  # noqa: E402
from verl.trainer.ppo.ray_trainer import compute_advantage  # noqa: E402
from verl.utils import tensordict_utils as tu  # noqa: E402
from verl.workers.engine_workers import ActorRolloutRefWorker  # noqa: E402
from verl.workers.utils.padding import left_right_2_no_padding, no_padding_2_padding  # noqa: E402

from nthr_kernels import nthr_advantages  # noqa: E402
from nthr_kernels.integrations import verl as nv  # noqa: E402
from nthr_kernels.integrations.verl_worker import NTHRActorRolloutRefWorker, nthr_actor_worker  # noqa: E402

G, N_GROUPS, P, R, VOCAB, T = 4, 6, 5, 9, 40, 0.8
WORLD = 2


def _model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).eval()


def _batch(seed=0) -> DataProto:
    """A rollout batch in verl's layout (prompts left-padded, responses right-padded), rows shuffled so
    that prompt groups straddle the two halves verl's dispatch gives the two workers."""
    g = torch.Generator().manual_seed(seed)
    bs = G * N_GROUPS
    prompt = torch.randint(1, VOCAB, (N_GROUPS, P), generator=g)
    prompt_len = torch.randint(2, P + 1, (N_GROUPS,), generator=g)
    perm = torch.randperm(bs, generator=g)
    group = (torch.arange(bs) // G)[perm]
    resp_len = torch.randint(1, R + 1, (bs,), generator=g)
    responses = torch.randint(1, VOCAB, (bs, R), generator=g)
    am = torch.zeros(bs, P + R, dtype=torch.long)
    for i in range(bs):
        am[i, P - int(prompt_len[group[i]]) : P + int(resp_len[i])] = 1
    prompts = prompt[group] * am[:, :P]
    responses = responses * am[:, P:]
    reward = torch.zeros(bs)
    for k in range(N_GROUPS):  # mixed groups: half of each group correct, one group all wrong
        idx = (group == k).nonzero().squeeze(1)
        reward[idx[: (G // 2 if k < N_GROUPS - 1 else 0)]] = 1.0
    scores = torch.zeros(bs, R)
    scores[torch.arange(bs), resp_len - 1] = reward
    data = DataProto.from_dict(
        tensors=dict(prompts=prompts, responses=responses, input_ids=torch.cat([prompts, responses], 1),
                     attention_mask=am, position_ids=(am.cumsum(1) - 1).clamp_min(0), response_mask=am[:, P:],
                     token_level_scores=scores),
        non_tensors=dict(uid=np.array([f"prompt-{int(k) * 7919 % 1000}" for k in group], dtype=object)),
        meta_info=dict(temperature=T),
    )
    return data


class _Engine:
    """Stands in for verl's FSDP engine: the module, its data-parallel group, and an ``infer_batch`` that
    returns nested ``log_probs`` in verl's no-padding layout (position t scores token t + 1)."""

    def __init__(self, module, group):
        self.module, self._group = module, group

    def get_data_parallel_group(self):
        return self._group


class _Actor:
    def __init__(self, engine):
        self.engine = engine

    @torch.no_grad()
    def infer_batch(self, data):
        ids, pos = data["input_ids"], data["position_ids"]
        out = []
        for seq, p in zip(ids.unbind(), pos.unbind()):
            logits = self.engine.module(input_ids=seq[None], position_ids=p[None]).logits[0].float()
            lp = torch.log_softmax(logits[:-1] / T, -1).gather(-1, seq[1:, None]).squeeze(-1)
            out.append(torch.cat([lp, lp.new_zeros(1)]))
        lengths = ids.offsets().diff()
        return tu.get_tensordict({"log_probs": torch.nested.nested_tensor_from_jagged(
            torch.cat(out), offsets=torch.cat([lengths.new_zeros(1), lengths.cumsum(0)]))})


def _worker_td(chunk: DataProto):
    """What the driver sends to ``compute_log_prob`` (verl's ``_compute_old_log_prob``, steps 1-3)."""
    td = left_right_2_no_padding(chunk.to_tensordict())
    tu.assign_non_tensor(td, calculate_entropy=False, compute_loss=False)
    return td


def _rank(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    chunk = _batch().chunk(WORLD)[rank]  # verl's DP_COMPUTE_PROTO split: contiguous shares
    worker = object.__new__(nthr_actor_worker(beta=0.0))
    worker.enable_routing_replay = False
    model = _model()
    worker.actor = _Actor(_Engine(model, dist.group.WORLD))
    td = _worker_td(chunk)
    out = worker.compute_log_prob(td)
    old_lp = no_padding_2_padding(tu.get(out, "log_probs"), td).float()
    # what this rank's forward saw, for the single-process reference
    with nv.LMHeadInputCapture(model) as cap:
        _Actor(_Engine(model, None)).infer_batch(td)
    hidden = no_padding_2_padding(torch.cat([c.reshape(-1, c.shape[-1]) for c in cap.captured]), td)
    torch.save(dict(scale=out[nv.SCALE_KEY], old_log_probs=old_lp, hidden=hidden, keys=sorted(out.keys())),
               os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_worker_scale_then_verl_compute_advantage_equals_library(tmp_path):
    mp.spawn(_rank, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=WORLD, join=True)
    outs = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert all(nv.HIDDEN_KEY not in o["keys"] for o in outs)  # no hidden state leaves a worker
    batch = _batch()
    chunks = batch.chunk(WORLD)
    uids = [set(c.non_tensor_batch["uid"].tolist()) for c in chunks]
    assert uids[0] & uids[1], "a prompt group must straddle the two workers for this test to mean anything"

    # driver: verl's collect (DataProto.concat) of what the workers returned, then verl's compute_advantage
    returned = DataProto.concat([DataProto.from_dict(tensors={"old_log_probs": o["old_log_probs"] * c.batch["response_mask"],
                                                              nv.SCALE_KEY: o["scale"]})
                                 for o, c in zip(outs, chunks)])
    batch = batch.union(returned)
    batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
    with nv.nthr_inputs(batch):
        batch = compute_advantage(batch, adv_estimator="nthr", config={"norm_adv_by_std_in_grpo": True})

    # the library on the whole batch in one process: GRPO's own advantages (verl), the workers' forwards
    plain = _batch()
    plain.batch["token_level_rewards"] = plain.batch["token_level_scores"]
    grpo = compute_advantage(plain, adv_estimator="grpo").batch["advantages"]
    hidden = torch.cat([o["hidden"] for o in outs])
    m = batch.batch["response_mask"].bool()
    ref = nthr_advantages(hidden, batch.batch["responses"], batch.batch["token_level_scores"].sum(-1),
                          grpo[:, 0].contiguous(),  # every response has a first token
                          lm_head_weight=_model().lm_head.weight.detach(), old_logprobs=batch.batch["old_log_probs"],
                          temperature=T, mask=m, group_ids=nv.group_ids_from_uids(batch.non_tensor_batch["uid"]),
                          beta=0.0)
    assert bool(ref.selected.any()) and bool(ref.active.any())
    straddling = np.isin(batch.non_tensor_batch["uid"], list(uids[0] & uids[1]))
    assert bool(ref.selected[torch.as_tensor(straddling)].any()), "NTHR must select tokens in a straddling group"
    assert torch.equal(batch.batch["advantages"], ref.token_advantages)
    assert torch.equal(batch.batch["returns"], ref.token_advantages)


def test_worker_method_uses_verls_registration():
    ours = getattr(NTHRActorRolloutRefWorker.compute_log_prob, MAGIC_ATTR)
    theirs = getattr(ActorRolloutRefWorker.compute_log_prob, MAGIC_ATTR)
    assert {k: v for k, v in ours.items() if k != "dispatch_mode"} == {k: v for k, v in theirs.items() if k != "dispatch_mode"}
    for fn in ("dispatch_fn", "collect_fn"):
        a, b = ours["dispatch_mode"][fn], theirs["dispatch_mode"][fn]
        assert (a.func, a.args) == (b.func, b.args)  # make_nd_compute_dataproto_dispatch_fn(mesh_name="actor")
    with pytest.raises(ValueError, match="eta"):
        nthr_actor_worker(eta=2.0)
    with pytest.raises(ValueError, match="gamma: not an NTHR option"):
        nthr_actor_worker(gamma=1.0)


def test_one_worker_scale_equals_driver_fallback():
    """One worker (no process group): worker side and the driver-side fallback (hidden states and the
    weight shipped to the driver) through verl's compute_advantage agree token for token."""
    model = _model()
    worker = object.__new__(nthr_actor_worker(beta=0.0, eta="1-p"))
    worker.enable_routing_replay = False
    worker.actor = _Actor(_Engine(model, None))
    batch = _batch(seed=1)
    td = _worker_td(batch)
    out = worker.compute_log_prob(td)
    with nv.LMHeadInputCapture(model) as cap:
        worker.actor.infer_batch(td)
    hidden = no_padding_2_padding(torch.cat([c.reshape(-1, c.shape[-1]) for c in cap.captured]), td)
    mask = batch.batch["response_mask"]
    old_lp = no_padding_2_padding(tu.get(out, "log_probs"), td).float() * mask
    batch.batch["token_level_rewards"] = batch.batch["token_level_scores"]
    worker_side = batch.union(DataProto.from_dict(tensors={"old_log_probs": old_lp, nv.SCALE_KEY: out[nv.SCALE_KEY]}))
    driver_side = _batch(seed=1).union(DataProto.from_dict(tensors={"old_log_probs": old_lp, nv.HIDDEN_KEY: hidden}))
    driver_side.batch["token_level_rewards"] = driver_side.batch["token_level_scores"]
    with nv.nthr_inputs(worker_side):
        a = compute_advantage(worker_side, adv_estimator="nthr").batch["advantages"]
    with nv.nthr_inputs(driver_side, lm_head_weight=model.lm_head.weight.detach(), beta=0.0, eta="1-p"):
        b = compute_advantage(driver_side, adv_estimator="nthr").batch["advantages"]
    assert bool((out[nv.SCALE_KEY] != 1).any())
    assert torch.equal(a, b)
    # without outcome scores in the batch the method is the parent's: no nthr_scale
    plain = _batch(seed=1)
    td = _worker_td(plain.select(batch_keys=[k for k in plain.batch.keys() if k != "token_level_scores"]))
    assert nv.SCALE_KEY not in worker.compute_log_prob(td).keys()


def test_worker_inputs_follow_the_captured_hidden_states(monkeypatch):
    """verl keeps the worker's batch and infer_batch's output on the CPU while the captured LM-head inputs
    sit on the accelerator: every tensor reaching compute_nthr_scale must be on the hidden states' device
    (the meta device stands in for a GPU here; before, responses, mask, scores and log-probs stayed on the
    CPU and a GPU step raised "token_ids: expected device cuda:0")."""
    from nthr_kernels.integrations import verl_worker

    model = _model()
    td = _worker_td(_batch(seed=1))
    with nv.LMHeadInputCapture(model) as cap:
        out = _Actor(_Engine(model, None)).infer_batch(td)
    seen = {}

    def record(*args, **kwargs):
        seen.update({f"arg{i}": x.device for i, x in enumerate(args) if torch.is_tensor(x)})
        seen.update({k: x.device for k, x in kwargs.items() if torch.is_tensor(x)})
        return torch.zeros(())

    monkeypatch.setattr(verl_worker, "compute_nthr_scale", record)
    verl_worker.nthr_scale_on_worker(td, out, [c.to("meta") for c in cap.captured], model.lm_head.weight.detach(), None)
    assert len(seen) == 6 and all(dev.type == "meta" for dev in seen.values()), seen


def test_worker_keeps_only_the_rows_that_predict_response_tokens(monkeypatch):
    """compute_log_prob keeps, of the LM-head inputs of its forwards, only the rows that predict response
    tokens (hidden position t predicts token t + 1): no prompt row and no sequence's last row is kept (before,
    every row of every micro-batch was kept to the end of the forward and then copied whole by a torch.cat).
    The scale is that of the whole capture, bit for bit."""
    from nthr_kernels.integrations import verl_worker

    made = []

    class Spy(nv.LMHeadInputCapture):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(verl_worker, "LMHeadInputCapture", Spy)
    model = _model()
    worker = object.__new__(nthr_actor_worker(beta=0.0))
    worker.enable_routing_replay = False
    worker.actor = _Actor(_Engine(model, None))
    batch = _batch(seed=2)
    td = _worker_td(batch)
    out = worker.compute_log_prob(td)
    (cap,) = made
    kept = torch.cat([c.reshape(-1, c.shape[-1]) for c in cap.captured])
    am = batch.batch["attention_mask"]
    n_tok, n_resp = int(am.sum()), int(am[:, P:].sum())
    assert len(cap.captured) == am.shape[0]  # one forward per sequence here, one kept chunk each
    assert kept.shape[0] == n_resp < n_tok
    # the kept rows are the whole capture's rows at the response positions of verl's padded layout
    with nv.LMHeadInputCapture(model) as whole:
        own = worker.actor.infer_batch(td)
    padded = no_padding_2_padding(torch.cat([c.reshape(-1, c.shape[-1]) for c in whole.captured]), td)
    assert torch.equal(kept, padded[am[:, P:].bool()])
    ref = verl_worker.nthr_scale_on_worker(td, own, whole.captured, model.lm_head.weight.detach(), None, {"beta": 0.0})
    assert bool((ref != 1).any())
    assert torch.equal(out[nv.SCALE_KEY], ref)
