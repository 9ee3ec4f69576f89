"""Measures the ``old_logprobs`` consistency check (``check_logprobs``) on the tiny Qwen2 of
:mod:`nthr_kernels.grpo`: the log of the probability mass that the log-probs imply on ``V*``, at every
completion token of real rollouts, for log-probs that belong to the hidden states (float32, a bf16
forward, rollout-engine noise) and for ones that do not (one position off, another temperature).

    python benchmarks/logprob_check.py [--prompts N]

Prints, per case, quantiles of the implied log-mass (nats; > 0: the slice holds more than probability 1),
the fraction of tokens above LOGPROB_TOLERANCE (all tokens, and the check's sample), and whether the
check (at most LOGPROB_MAX_BAD tokens of its LOGPROB_SAMPLE-token sample above the tolerance) accepts
the batch. docs/NTHR.md quotes the result.
"""
from __future__ import annotations

import argparse

import torch

from nthr_kernels.core.checks import implied_vstar_mass, logprob_sample, validate_batch
from nthr_kernels.core.rules import LOGPROB_MAX_BAD, LOGPROB_TOLERANCE, Inputs, Options
from nthr_kernels.grpo.model import load_default_model, torch_threads
from nthr_kernels.grpo.rollout import collect_rollout
from nthr_kernels.grpo.seeds import seed_of, stream
from nthr_kernels.testing import logprob_variants

TEMPERATURE = 1.0


def measure(prompts: int = 16) -> list:
    """Per case of :func:`nthr_kernels.testing.logprob_variants`: ``(name, q50, q90, q99, max, fraction of
    tokens above the tolerance, sampled tokens above it, sample size, "pass" or "FAIL")``, and the token count."""
    rows = []
    with torch_threads():
        model, task = load_default_model(progress=False)
        # streams of their own (nthr_kernels.grpo.seeds): the literals before (problems seed 123, manual_seed(0))
        # were the pretraining's problems of step 123, which the model had been trained on, and the model's
        # initialisation stream (for the responses and the noise)
        problems = task.sample_problems(prompts, seed=seed_of("logprob_check", "problems"))
        ro = collect_rollout(model, task, problems, group_size=8, temperature=TEMPERATURE,
                             generator=stream("logprob_check", "rollouts"))
        w = model.lm_head.weight.detach()
        for name, (lp, t) in logprob_variants(model, ro, seed=seed_of("logprob_check", "noise")).items():
            x = Inputs(ro.hidden, ro.completion_ids, ro.rewards, ro.advantages, lm_head_weight=w, old_logprobs=lp,
                       mask=ro.mask, group_size=8)
            batch = validate_batch(x, Options(temperature=t, check_logprobs=False))
            every = implied_vstar_mass(batch, torch.arange(batch.n_tokens))
            sample = implied_vstar_mass(batch, logprob_sample(batch.n_tokens))
            q = torch.quantile(every, torch.tensor([0.5, 0.9, 0.99], dtype=torch.float64)).tolist()
            n_bad = int((sample > LOGPROB_TOLERANCE).sum())
            rows.append((name, *q, float(every.max()), float((every > LOGPROB_TOLERANCE).double().mean()), n_bad,
                         sample.numel(), "pass" if n_bad <= LOGPROB_MAX_BAD else "FAIL"))
    return rows, int(ro.mask.sum())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    args = ap.parse_args()
    rows, n_tokens = measure(args.prompts)
    print(f"the shipped tiny Qwen2 (DEFAULT_SPEC), {args.prompts} prompts x 8, {n_tokens} completion tokens, "
          f"tolerance {LOGPROB_TOLERANCE} nats, at most {LOGPROB_MAX_BAD} sampled tokens above it")
    print(f"{'case':42s} {'q50':>8s} {'q90':>8s} {'q99':>8s} {'max':>8s} {'>tol all':>9s} {'>tol sample':>12s}  check")
    for name, q50, q90, q99, top, frac_all, n_bad, k, verdict in rows:
        print(f"{name:42s} {q50:8.3f} {q90:8.3f} {q99:8.3f} {top:8.3f} {frac_all:9.1%} {f'{n_bad}/{k}':>12s}  {verdict}")


if __name__ == "__main__":
    main()
