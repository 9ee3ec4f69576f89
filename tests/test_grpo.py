"""The GRPO reference loop on a real (tiny) transformers model, and the LLD measurement."""

from __future__ import annotations

import copy
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

from nthr_kernels.grpo import (DEFAULT_SPEC, AdditionTask, CharTokenizer, ModelSpec, Rollout, build_model,
                               collect_rollout, completion_logprobs, group_advantages, grpo_step, load_default_model,
                               load_weights, policy_loss, pretrain, token_advantages)
from nthr_kernels.grpo.lld import lld_delta, sequence_logprobs, topk_overlap, _spearman
from nthr_kernels.grpo.stats import summarize
from nthr_kernels import nthr_advantages
from nthr_kernels.grpo.loop import nthr_result
from nthr_kernels.testing import logprob_variants

TINY = ModelSpec(n_digits=2, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                 num_key_value_heads=1, steps=60, batch_size=32, lr=3e-3, warmup=10, seed=3)


@pytest.fixture(scope="module")
def tiny():
    """A briefly pretrained tiny Qwen2 (real transformer hidden states, a couple of seconds on CPU)."""
    torch.manual_seed(0)
    model = pretrain(TINY, progress=False)
    return model, AdditionTask(TINY.n_digits)


def _mixed_rewards(n_groups: int, G: int, seed: int) -> torch.Tensor:
    """Rewards with 1..G-1 positives per group (a briefly trained model is mostly wrong)."""
    g = torch.Generator().manual_seed(seed)
    r = torch.zeros(n_groups, G)
    for i in range(n_groups):
        k = int(torch.randint(1, G, (1,), generator=g))
        r[i, torch.randperm(G, generator=g)[:k]] = 1.0
    return r.reshape(-1)


@pytest.fixture(scope="module")
def rollout(tiny):
    """Sampled responses with the model's hidden states; rewards assigned so every group is mixed."""
    model, task = tiny
    ro = collect_rollout(model, task, task.sample_problems(6, seed=1), group_size=8,
                         generator=torch.Generator().manual_seed(0))
    r = _mixed_rewards(ro.n_groups, 8, seed=2)
    return Rollout(**{**ro.__dict__, "rewards": r, "advantages": group_advantages(r, 8)})


def _params(m):
    return [p.detach().clone() for p in m.parameters()]


def _step(model, ro, adv):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    grpo_step(model, opt, ro, adv)
    return _params(model)


# --- task -------------------------------------------------------------------------------------

def test_task_solution_and_reward():
    from nthr_kernels.grpo.task import Problem

    task = AdditionTask(3)
    p = Problem(347, 285)
    assert task.prompt_text(p) == "347+285="
    assert task.solution_text(p) == "7+5=12,4+8+1=13,3+2+1=6>632"
    tok = task.tokenizer
    good = tok.encode(task.solution_text(p)) + [tok.eos_id]
    assert task.reward(good, p) == 1.0
    assert task.reward(good[:-1], p) == 0.0  # never ended
    assert task.reward(tok.encode("7+5=12>633") + [tok.eos_id], p) == 0.0
    assert task.prompt_ids([p]).shape == (1, task.prompt_len)
    assert tok.decode(tok.encode("12+3=") + [tok.eos_id] + tok.encode("9")) == "12+3="


def test_task_bad_input():
    with pytest.raises(ValueError, match="n_digits"):
        AdditionTask(0)
    with pytest.raises(TypeError, match="n_digits"):
        AdditionTask(2.0)
    with pytest.raises(ValueError, match="vocabulary"):
        CharTokenizer().encode("1a")


def test_group_advantages():
    r = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0])
    a = group_advantages(r, 4)
    # group 0: mean 0.25, population std sqrt(3)/4; group 1 uniform -> 0
    s = math.sqrt(3) / 4
    assert torch.allclose(a[:4], torch.tensor([0.75 / s, -0.25 / s, -0.25 / s, -0.25 / s]), atol=1e-5)
    assert torch.equal(a[4:], torch.zeros(4))
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(r, 3)


# --- the old-policy forward ---------------------------------------------------------------------

def test_captured_hidden_states_are_the_lm_head_inputs(tiny, rollout):
    model, task = tiny
    ro = rollout
    P, L = ro.prompt_ids.shape[1], ro.completion_ids.shape[1]
    ids = torch.cat([ro.prompt_ids, ro.completion_ids], 1)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    last = out.hidden_states[-1]  # after the final norm
    m = ro.mask
    # hidden position t predicts token t + 1: completion token k comes from position P + k - 1
    assert torch.equal(ro.hidden[m], last[:, P - 1:P + L - 1][m])
    assert not torch.allclose(ro.hidden[m], last[:, P:P + L][m])  # the off-by-one would differ
    # the lm_head of the captured states reproduces the model's logits and the old log-probs
    logits = model.lm_head(ro.hidden)
    assert torch.allclose(logits[m], out.logits[:, P - 1:P + L - 1][m], atol=1e-5)
    ref = torch.log_softmax(out.logits[:, P - 1:P + L - 1].double(), -1).gather(
        -1, ro.completion_ids.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(ro.old_logprobs[m].double(), ref[m], atol=1e-5)
    assert torch.equal(ro.hidden[~m], torch.zeros_like(ro.hidden[~m]))
    assert torch.equal(ro.old_logprobs[~m], torch.zeros_like(ro.old_logprobs[~m]))


def test_old_logprobs_respect_temperature(tiny, rollout):
    model, _ = tiny
    T = 0.7
    lp = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids, temperature=T)
    logits = model.lm_head(rollout.hidden).double() / T
    ref = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids.unsqueeze(-1)).squeeze(-1)
    m = rollout.mask
    assert torch.allclose(lp.detach()[m].double(), ref[m], atol=1e-5)
    with pytest.raises(ValueError, match="temperature"):
        completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids, temperature=0.0)


def test_mask_ends_at_eos(rollout):
    eos = CharTokenizer().eos_id
    for i in range(rollout.mask.shape[0]):
        n = int(rollout.mask[i].sum())
        assert bool(rollout.mask[i, :n].all()) and not bool(rollout.mask[i, n:].any())
        toks = rollout.completion_ids[i, :n].tolist()
        assert eos not in toks[:-1]


# --- the methods --------------------------------------------------------------------------------

def test_nthr_with_eta_one_gives_exactly_grpos_parameters(tiny, rollout):
    model, _ = tiny
    adv_g, _ = token_advantages(model, rollout, "grpo")
    adv_n, sel = token_advantages(model, rollout, "nthr", eta=1.0)
    assert int(sel.sum()) > 0  # NTHR did select tokens; eta = 1 leaves their advantage unchanged
    p_grpo = _step(copy.deepcopy(model), rollout, adv_g)
    p_nthr = _step(copy.deepcopy(model), rollout, adv_n)
    assert all(torch.equal(a, b) for a, b in zip(p_grpo, p_nthr))
    # ...while eta = 0 changes the update (so the comparison above can fail)
    adv_0, _ = token_advantages(model, rollout, "nthr", eta=0.0)
    p_0 = _step(copy.deepcopy(model), rollout, adv_0)
    assert not all(torch.equal(a, b) for a, b in zip(p_grpo, p_0))


def test_pos_only_equals_grpo_with_negative_advantages_zeroed(tiny, rollout):
    model, _ = tiny
    assert bool((rollout.advantages < 0).any())
    adv_p, _ = token_advantages(model, rollout, "pos_only")
    zeroed = Rollout(**{**rollout.__dict__, "advantages": rollout.advantages.clamp(min=0)})
    adv_z, _ = token_advantages(model, zeroed, "grpo")
    assert torch.equal(adv_p, adv_z)
    p1 = _step(copy.deepcopy(model), rollout, adv_p)
    p2 = _step(copy.deepcopy(model), zeroed, adv_z)
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))


def test_random_selects_as_many_negative_tokens_as_nthr(tiny, rollout):
    model, _ = tiny
    _, sel_n = token_advantages(model, rollout, "nthr", eta=0.0)
    adv_r, sel_r = token_advantages(model, rollout, "random", eta=0.0, generator=torch.Generator().manual_seed(1))
    G = rollout.group_size
    neg = rollout.mask & (rollout.rewards <= 0.5).unsqueeze(1)
    assert not bool((sel_r & ~neg).any())
    for g in range(rollout.n_groups):
        assert int(sel_r[g * G:(g + 1) * G].sum()) == int(sel_n[g * G:(g + 1) * G].sum())
    A = rollout.advantages.unsqueeze(1).expand_as(adv_r)
    assert torch.equal(adv_r[sel_r], torch.zeros_like(adv_r[sel_r]))
    assert torch.equal(adv_r[rollout.mask & ~sel_r], A[rollout.mask & ~sel_r])
    assert not torch.equal(sel_r, sel_n)  # a different draw than NTHR's own choice


def test_default_backend_masks_equal_reference_on_model_hidden_states(tiny, rollout):
    model, _ = tiny
    for beta in (1.0, 0.1, 0.0, float("-inf")):
        for anchor in ("all", "others"):
            fast = nthr_result(model, rollout, beta=beta, anchor=anchor, backend="auto")
            ref = nthr_result(model, rollout, beta=beta, anchor=anchor, backend="reference")
            assert torch.equal(fast.selected, ref.selected), (beta, anchor)
            assert torch.allclose(fast.token_advantages, ref.token_advantages, atol=1e-6)
    ref = nthr_result(model, rollout, backend="reference")
    n_neg = int((rollout.mask & (rollout.rewards <= 0.5).unsqueeze(1)).sum())
    assert 0 < int(ref.selected.sum()) < n_neg  # a non-trivial selection


# The old_logprobs consistency check (check_logprobs) on a real model's hidden states: the cases and the
# tolerance are those of benchmarks/logprob_check.py (docs/NTHR.md quotes its numbers).
@pytest.mark.parametrize("variant, consistent", [
    ("float32 (exact)", True), ("bf16 forward", True), ("rollout noise N(0, 0.01)", True),
    ("rollout noise N(0, 0.1)", True), ("one position off", False), ("one position off (other way)", False),
    ("temperature 0.6 x the sampling one passed", False), ("temperature 0.8 x the sampling one passed", False),
])
def test_old_logprobs_check_on_model_outputs(tiny, rollout, variant, consistent):
    model, _ = tiny
    lp, temperature = logprob_variants(model, rollout)[variant]
    kw = dict(lm_head_weight=model.lm_head.weight.detach(), old_logprobs=lp, temperature=temperature,
              mask=rollout.mask, group_size=rollout.group_size, backend="torch")
    call = lambda **k: nthr_advantages(rollout.hidden, rollout.completion_ids, rollout.rewards,  # noqa: E731
                                       rollout.advantages, **kw, **k)
    if consistent:
        call()
    else:
        with pytest.raises(ValueError, match=r"^old_logprobs: inconsistent with hidden"):
            call()
        call(check_logprobs=False)  # the switch


def test_token_advantages_bad_input(tiny, rollout):
    model, _ = tiny
    with pytest.raises(ValueError, match="method"):
        token_advantages(model, rollout, "ppo")
    with pytest.raises(TypeError, match="method"):
        token_advantages(model, rollout, 3)
    no_hidden = Rollout(**{**rollout.__dict__, "hidden": None})
    with pytest.raises(ValueError, match="hidden"):
        token_advantages(model, no_hidden, "nthr")
    adv, _ = token_advantages(model, rollout, "grpo")
    with pytest.raises(ValueError, match="clip_eps"):
        policy_loss(model, rollout, adv, clip_eps=1.5)
    with pytest.raises(ValueError, match="token_adv"):
        policy_loss(model, rollout, adv[:, :-1])
    with pytest.raises(ValueError, match="ref_model"):
        policy_loss(model, rollout, adv, kl_coef=0.1)
    with pytest.raises(ValueError, match="group_size"):
        collect_rollout(model, AdditionTask(2), AdditionTask(2).sample_problems(1, seed=0), group_size=1)


def test_kl_to_itself_is_zero_and_clipping_bites(tiny, rollout):
    model, _ = tiny
    adv, _ = token_advantages(model, rollout, "grpo")
    l0, _ = policy_loss(model, rollout, adv)
    l1, info = policy_loss(model, rollout, adv, ref_model=model, kl_coef=0.5)
    assert info["kl"] == pytest.approx(0.0, abs=1e-7) and l0.item() == pytest.approx(l1.item(), abs=1e-7)
    # on-policy the ratio is 1, so the loss is -(mean advantage); after big steps the clip engages
    m = copy.deepcopy(model)
    opt = torch.optim.SGD(m.parameters(), lr=5.0)
    for _ in range(3):
        grpo_step(m, opt, rollout, adv, max_grad_norm=None)
    _, info = policy_loss(m, rollout, adv)
    assert info["clip_frac"] > 0


# --- the LLD measurement ------------------------------------------------------------------------

class _Unigram(torch.nn.Module):
    """logits = W[:, 0] at every position (hidden state 1): ln pi(v) = w_v - logsumexp(w)."""

    def __init__(self, V: int) -> None:
        super().__init__()
        self.lm_head = torch.nn.Linear(1, V, bias=False)
        torch.nn.init.zeros_(self.lm_head.weight)

    def forward(self, input_ids, **_):
        h = torch.ones(*input_ids.shape, 1)
        return SimpleNamespace(logits=self.lm_head(h))


def _hand_rollout(advantages):
    # one group: response 0 correct with tokens [0, 1]; response 1 incorrect with token [2]
    return Rollout(problems=[None], prompt_ids=torch.zeros(2, 1, dtype=torch.long),
                   completion_ids=torch.tensor([[0, 1], [2, 0]]), mask=torch.tensor([[True, True], [True, False]]),
                   rewards=torch.tensor([1.0, 0.0]), advantages=torch.tensor(advantages), group_size=2,
                   old_logprobs=torch.full((2, 2), -math.log(3)) * torch.tensor([[1.0, 1.0], [1.0, 0.0]]))


def test_delta_matches_a_hand_computed_case():
    # W = 0: pi = (1/3, 1/3, 1/3). Loss = -1/2 [ 1/2 A0 (ln pi_0 + ln pi_1) + A1 ln pi_2 ], on-policy.
    # d ln pi_y / dw = e_y - 1/3. With A = (1, -1): grad = -1/2 [(1/6, 1/6, -1/3) + (1/3, 1/3, -2/3)]
    # = (-1/4, -1/4, 1/2). SGD lr = 1: w' = (1/4, 1/4, -1/2).
    # Delta = 2 (1/4 - ln(2 e^{1/4} + e^{-1/2})) + 2 ln 3.
    model = _Unigram(3)
    ro = _hand_rollout([1.0, -1.0])
    adv, _ = token_advantages(model, ro, "grpo")
    expected = 2 * (0.25 - math.log(2 * math.exp(0.25) + math.exp(-0.5))) + 2 * math.log(3)
    assert expected == pytest.approx(0.38687, abs=1e-5)
    w0 = model.lm_head.weight.detach().clone()
    assert lld_delta(model, ro, adv, lr=1.0, optimizer="sgd") == pytest.approx(expected, abs=1e-6)
    assert torch.equal(model.lm_head.weight, w0)  # parameters restored
    # Pos Only: grad = (-1/12, -1/12, 1/6), w' = (1/12, 1/12, -1/6)
    adv, _ = token_advantages(model, ro, "pos_only")
    expected = 2 * (1 / 12 - math.log(2 * math.exp(1 / 12) + math.exp(-1 / 6))) + 2 * math.log(3)
    assert lld_delta(model, ro, adv, lr=1.0, optimizer="sgd") == pytest.approx(expected, abs=1e-6)
    # sequence log-likelihoods: 2 ln(1/3) and ln(1/3)
    assert torch.allclose(sequence_logprobs(model, ro), torch.tensor([-2 * math.log(3), -math.log(3)],
                                                                      dtype=torch.float64))


def test_lld_delta_bad_input():
    model = _Unigram(3)
    ro = _hand_rollout([1.0, -1.0])
    adv, _ = token_advantages(model, ro, "grpo")
    with pytest.raises(ValueError, match="lr"):
        lld_delta(model, ro, adv, lr=0.0)
    with pytest.raises(ValueError, match="lr"):
        lld_delta(model, ro, adv, lr=float("nan"))
    with pytest.raises(ValueError, match="optimizer"):
        lld_delta(model, ro, adv, lr=1.0, optimizer="lion")
    no_pos = Rollout(**{**ro.__dict__, "rewards": torch.zeros(2)})
    with pytest.raises(ValueError, match="correct"):
        lld_delta(model, no_pos, adv, lr=1.0)


def test_lld_delta_on_the_model_restores_parameters(tiny, rollout):
    model, _ = tiny
    before = _params(model)
    sub = rollout.select_groups([0])
    adv, _ = token_advantages(model, sub, "grpo")
    d = lld_delta(model, sub, adv, lr=0.05)
    assert math.isfinite(d)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(model)))
    assert all(p.grad is None for p in model.parameters())
    # pos_only only pushes the correct responses up: to first order (small SGD step) Delta > 0
    adv, _ = token_advantages(model, sub, "pos_only")
    assert lld_delta(model, sub, adv, lr=1e-3, optimizer="sgd") > 0


def test_summary_and_rank_statistics():
    s = summarize([0.5, -1.0, 0.0, 2.0])
    assert s["mean_delta"] == pytest.approx(0.375) and s["median_delta"] == pytest.approx(0.25)
    assert s["lld_fraction"] == pytest.approx(0.5)
    # predictor ranks the two laziest questions (Delta -3, -2) on top
    assert topk_overlap([9, 8, 0, 1], [-3, -2, 5, 4], 2) == 1.0
    assert topk_overlap([0, 1, 9, 8], [-3, -2, 5, 4], 2) == 0.0
    assert _spearman([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    with pytest.raises(ValueError):
        topk_overlap([1, 2], [1, 2], 3)


# --- the default model ----------------------------------------------------------------------------

def test_pretrain_writes_weights_that_load_without_pickle(tmp_path):
    from nthr_kernels.grpo.model import CONFIG_FILE, TOKENIZER_FILE, WEIGHTS_FILE
    from nthr_kernels.grpo.pretrain import save_weights

    spec = ModelSpec(n_digits=1, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=1, steps=3, batch_size=4, warmup=2, seed=5)
    m1 = pretrain(spec, progress=False)
    save_weights(m1, spec, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE])
    assert not (tmp_path / WEIGHTS_FILE).read_bytes().startswith(b"\x80")  # safetensors, not a pickle
    m2, task, config = load_weights(tmp_path)
    m3 = pretrain(spec, progress=False)  # trained again from the seed
    for a, b, c in zip(m1.state_dict().values(), m2.state_dict().values(), m3.state_dict().values()):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert m2.lm_head.weight is m2.model.embed_tokens.weight  # the tied head stays tied
    assert config["spec_key"] == spec.key() and task.n_digits == 1
    other = ModelSpec(**{**spec.__dict__, "seed": 6})
    assert other.key() != spec.key()
    assert not torch.equal(build_model(other).lm_head.weight, build_model(spec).lm_head.weight)
    # an edited config or vocabulary is refused, a missing file named
    cfg = json.loads((tmp_path / CONFIG_FILE).read_text())
    (tmp_path / CONFIG_FILE).write_text(json.dumps({**cfg, "spec": {**cfg["spec"], "steps": 4}}))
    with pytest.raises(ValueError, match="spec_key"):
        load_weights(tmp_path)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(cfg))
    (tmp_path / TOKENIZER_FILE).write_text(json.dumps({"type": "char", "chars": "0123456789"}))
    with pytest.raises(ValueError, match="tokenizer"):
        load_weights(tmp_path)
    (tmp_path / WEIGHTS_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS_FILE):
        load_weights(tmp_path)
    with pytest.raises(TypeError, match="folder"):
        load_weights(3)


def test_shipped_weights_load_and_nothing_is_trained(monkeypatch):
    import nthr_kernels.grpo.model as model_mod
    from nthr_kernels.grpo.model import WEIGHTS_DIR

    def no_training(*a, **k):
        raise AssertionError("load_default_model must not train")

    monkeypatch.setattr(model_mod, "pretrain", no_training)
    monkeypatch.setattr(model_mod, "_pretrain", no_training)
    before = {p: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()}
    model, task = load_default_model(progress=False)
    assert {p: p.stat().st_mtime_ns for p in WEIGHTS_DIR.iterdir()} == before  # nothing written
    assert task.n_digits == DEFAULT_SPEC.n_digits
    assert model.config.hidden_size == DEFAULT_SPEC.hidden_size
    assert sum(p.stat().st_size for p in WEIGHTS_DIR.iterdir()) < 8 << 20  # a few MB at most


def test_import_has_no_side_effects(tmp_path):
    env = {**os.environ, "NTHR_KERNELS_CACHE": str(tmp_path / "cache")}
    code = "import nthr_kernels.grpo, nthr_kernels.grpo.demo; print('ok')"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert not (tmp_path / "cache").exists()


def test_lld_study_validates_before_sampling(tiny):
    from nthr_kernels.grpo.lld import run_lld_study

    model, task = tiny
    with pytest.raises(ValueError, match="optimizer"):
        run_lld_study(model, task, optimizer="lion", progress=False)
    with pytest.raises(ValueError, match="lr"):
        run_lld_study(model, task, lr=-1.0, progress=False)
    with pytest.raises(ValueError, match="questions_per_seed"):
        run_lld_study(model, task, questions_per_seed=0, progress=False)
    for bad in ([], [0, 0], [-1], (1.5,), "0"):
        with pytest.raises(ValueError, match="seeds"):
            run_lld_study(model, task, seeds=bad, progress=False)


def test_highlight_marks_exactly_the_selected_tokens(tiny, rollout, tmp_path):
    from nthr_kernels.grpo.highlight import render_ansi, render_html

    model, task = tiny
    sel = nthr_result(model, rollout).selected
    assert int(sel.sum()) > 0
    html = render_html(task, rollout, sel, tmp_path / "h.html").read_text()
    assert html.count("class='sel'") == int(sel.sum())  # every group, every incorrect response
    ansi = render_ansi(task, rollout, sel, max_negatives=None)
    assert ansi.count("\x1b[1;30;48;5;215m") == int(sel.sum())
    with pytest.raises(ValueError, match="selected"):
        render_html(task, rollout, sel.float(), tmp_path / "x.html")


class _ParityTask(AdditionTask):
    """Reward 1 iff the first completion token has an even id: mixed groups even for an untrained model."""

    def reward(self, completion_ids, problem):
        return float(int(completion_ids[0]) % 2 == 0)


def test_train_is_deterministic_and_logs(tiny):
    from nthr_kernels.grpo import train

    model, _ = tiny
    task = _ParityTask(TINY.n_digits)
    evalp = task.sample_problems(4, seed=9)
    runs = []
    for _ in range(2):
        m = copy.deepcopy(model)
        h = train(m, task, method="nthr", steps=2, prompts_per_step=2, group_size=4, lr=1e-3, eval_every=1,
                  eval_problems=evalp, kl_coef=0.01, progress=False)
        runs.append((h, _params(m)))
    (h, p1), (h2, p2) = runs
    assert h["step"] == [0, 1, 2] and len(h["train_reward"]) == 2
    assert {k: v for k, v in h.items() if k != "seconds"} == {k: v for k, v in h2.items() if k != "seconds"}
    assert 0 < h["train_reward"][0] < 1 and h["selected_frac"][0] > 0  # mixed groups, NTHR active
    assert all(torch.equal(a, b) for a, b in zip(p1, p2))
    assert not all(torch.equal(a, b) for a, b in zip(p1, _params(model)))
    with pytest.raises(ValueError, match="steps"):
        train(model, task, steps=0)


def test_held_out_problems_were_never_trained_on(monkeypatch):
    """``train``'s default held-out set (the training example's accuracy) leaves out the shipped weights'
    pretraining problems and the run's own training problems. It was the first 128 problems of its stream:
    1, 1 and 4 of them were pretraining problems for seeds 0, 1 and 2 of the committed run."""
    from nthr_kernels.grpo import loop
    from nthr_kernels.grpo.model import pretraining_problems

    task = AdditionTask(DEFAULT_SPEC.n_digits)
    pre = pretraining_problems(DEFAULT_SPEC)
    assert pretraining_problems(DEFAULT_SPEC, 0)[0] in pre and len(pre) <= DEFAULT_SPEC.steps * DEFAULT_SPEC.batch_size
    seen = []
    monkeypatch.setattr(loop, "_train", lambda *a: seen.append(a[13]) or {})
    for seed in (0, 1, 2):
        loop.train(None, task, steps=40, prompts_per_step=16, seed=seed)
        trained = set().union(*(loop.training_problems(task, seed, s, 16) for s in range(1, 41)))
        held = seen[-1]
        assert len(held) == 128 and not set(held) & pre and not set(held) & trained
    few = frozenset(task.sample_problems(3, seed=1))
    assert task.sample_problems(3, seed=1, exclude=few)[0] not in few
    with pytest.raises(ValueError, match="exclude"):
        AdditionTask(1).sample_problems(1, seed=0, exclude=frozenset(task.sample_problems(80, seed=0)) | {
            p for p in AdditionTask(1).sample_problems(500, seed=2)})
