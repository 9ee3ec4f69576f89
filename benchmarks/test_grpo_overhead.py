"""NTHR's share of one GRPO step of the reference loop (nthr_kernels.grpo), same batch with and without.

One step = sample the responses (16 prompts x 8) + old-policy forward (hidden states, old log-probs)
+ token advantages + one clipped-surrogate AdamW update. The model is a small, untrained Qwen2, which
gets every answer wrong; rewards are therefore assigned (every group mixed, NTHR's most expensive case)
after sampling, identically for both variants. Each timed round also records its three phases, so the
share of NTHR comes from the very rounds pytest-benchmark times (one value per round: the summary
gives the median and the range). The paper's figure for comparison: 22 s of a 522 s step (about 4 %)
on Qwen2.5-Math-1.5B with 256 x 8 rollouts of up to 3072 tokens. Runs at the suite's thread count.

    pytest benchmarks/test_grpo_overhead.py --benchmark-only
"""

from __future__ import annotations

import copy
import time

import pytest
import torch

from nthr_kernels.grpo import ModelSpec, Rollout, build_model, collect_rollout, group_advantages, grpo_step
from nthr_kernels.grpo.loop import token_advantages
from nthr_kernels.grpo.model import torch_threads
from nthr_kernels.grpo.seeds import seed_of, stream

# Streams of its own (nthr_kernels.grpo.seeds): the literal 0 used before for the model, the problems and the
# responses was the default model's initialisation stream (torch.manual_seed(0)) and the problems of its
# pretraining's first step (random.Random(0 * 1_000_003 + 0)). Timing only: no figure changes meaning.
SCOPE = "grpo_overhead"
SPEC = ModelSpec(n_digits=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, seed=seed_of(SCOPE, "model"))
PROMPTS, G = 16, 8


def make_setup():
    """``(model, task, problems, rewards)``: the untrained model, its task, the prompts and the assigned rewards."""
    from nthr_kernels.grpo.task import AdditionTask

    model = build_model(SPEC)
    task = AdditionTask(SPEC.n_digits)
    problems = task.sample_problems(PROMPTS, seed=seed_of(SCOPE, "problems"))
    rewards = torch.tensor([float((i % G) < 1 + (i // G) % (G - 1)) for i in range(PROMPTS * G)])
    return model, task, problems, rewards


@pytest.fixture(scope="module")
def setup():
    return make_setup()


def _step(model, task, problems, rewards, method, timings):
    """One full step; returns the rollout so both variants can be checked to see the same batch (every round
    samples from a fresh generator of the same stream)."""
    t0 = time.perf_counter()
    ro = collect_rollout(model, task, problems, group_size=G, generator=stream(SCOPE, "rollouts"))
    ro = Rollout(**{**ro.__dict__, "rewards": rewards, "advantages": group_advantages(rewards, G)})
    t1 = time.perf_counter()
    adv, _ = token_advantages(model, ro, method)
    t2 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every round sees the same weights
    grpo_step(model, opt, ro, adv)
    t3 = time.perf_counter()
    timings.append((t1 - t0, t2 - t1, t3 - t2))
    return ro


ROUNDS = (5, 1)  # (measured, warm-up)


@pytest.mark.parametrize("method", ["grpo", "nthr"])
def test_grpo_step(benchmark, setup, method):
    model, task, problems, rewards = setup
    model = copy.deepcopy(model)
    timings = []
    rounds, warmup = ROUNDS
    with torch_threads(torch.get_num_threads()):
        ro = benchmark.pedantic(_step, (model, task, problems, rewards, method, timings), rounds=rounds,
                                warmup_rounds=warmup, iterations=1)
    assert bool(ro.mixed_groups().all()) and ro.hidden is not None
    timed = timings[-rounds:] if benchmark.enabled else timings  # the measured rounds, warm-up left out
    rollout_s, nthr_s, update_s = ([t[k] for t in timed] for k in range(3))
    shares = [n / (r + n + u) for r, n, u in timed]
    assert all(0 < x < 1 for x in shares)
    benchmark.group = "grpo step"
    benchmark.extra_info.update(op="grpo_step", method=method, rollout_s=rollout_s, nthr_s=nthr_s,
                                update_s=update_s, nthr_share=shares, tokens=int(ro.mask.sum()),
                                responses=f"{PROMPTS}x{G}", threads=torch.get_num_threads())
