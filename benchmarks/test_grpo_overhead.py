"""NTHR's share of one GRPO step of the reference loop (nthr_kernels.grpo), same batch with and without.

One step = sample the responses (16 prompts x 8) + old-policy forward (hidden states, old log-probs)
+ token advantages + one clipped-surrogate AdamW update. The model is a small, untrained Qwen2, which
gets every answer wrong; rewards are therefore assigned (every group mixed, NTHR's most expensive case)
after sampling, identically for both variants. The paper's figure for comparison: 22 s of a 522 s step
(about 4 %) on Qwen2.5-Math-1.5B with 256 x 8 rollouts of up to 3072 tokens.

    pytest benchmarks/test_grpo_overhead.py --benchmark-only -s
"""

from __future__ import annotations

import copy
import statistics
import time

import pytest
import torch

from nthr_kernels.grpo import ModelSpec, Rollout, build_model, collect_rollout, group_advantages, grpo_step
from nthr_kernels.grpo.loop import token_advantages
from nthr_kernels.grpo.model import torch_threads

SPEC = ModelSpec(n_digits=3, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, seed=0)
PROMPTS, G = 16, 8


@pytest.fixture(scope="module")
def setup():
    from nthr_kernels.grpo.task import AdditionTask

    model = build_model(SPEC)
    task = AdditionTask(SPEC.n_digits)
    problems = task.sample_problems(PROMPTS, seed=0)
    rewards = torch.tensor([float((i % G) < 1 + (i // G) % (G - 1)) for i in range(PROMPTS * G)])
    return model, task, problems, rewards


def _step(model, task, problems, rewards, method, timings=None):
    """One full step; returns the rollout so both variants can be checked to see the same batch."""
    t0 = time.perf_counter()
    ro = collect_rollout(model, task, problems, group_size=G, generator=torch.Generator().manual_seed(0))
    ro = Rollout(**{**ro.__dict__, "rewards": rewards, "advantages": group_advantages(rewards, G)})
    t1 = time.perf_counter()
    adv, _ = token_advantages(model, ro, method)
    t2 = time.perf_counter()
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: every round sees the same weights
    grpo_step(model, opt, ro, adv)
    t3 = time.perf_counter()
    if timings is not None:
        timings.append((t1 - t0, t2 - t1, t3 - t2))
    return ro


@pytest.mark.parametrize("method", ["grpo", "nthr"])
def test_grpo_step(benchmark, setup, method):
    model, task, problems, rewards = setup
    model = copy.deepcopy(model)
    with torch_threads():
        ro = benchmark(_step, model, task, problems, rewards, method)
        assert bool(ro.mixed_groups().all()) and ro.hidden is not None
        if method == "nthr":
            # the same batch timed phase by phase, to report NTHR's share of the step
            timings = []
            for _ in range(1 if benchmark.disabled else 5):
                _step(model, task, problems, rewards, "nthr", timings)
            rollout_s, nthr_s, update_s = (statistics.median(t[k] for t in timings) for k in range(3))
            share = nthr_s / (rollout_s + nthr_s + update_s)
            benchmark.extra_info.update({"rollout_s": rollout_s, "nthr_s": nthr_s, "update_s": update_s,
                                         "nthr_share": share, "tokens": int(ro.mask.sum())})
            print(f"\nGRPO step on {PROMPTS}x{G} responses ({int(ro.mask.sum())} tokens): rollout {rollout_s * 1e3:.1f} ms, "
                  f"NTHR {nthr_s * 1e3:.2f} ms, update {update_s * 1e3:.1f} ms -> NTHR share {100 * share:.1f}%")
            assert 0 < share < 1
