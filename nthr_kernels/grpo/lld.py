"""The paper's Lazy Likelihood Displacement measurement (sections 3 and 5.3) and GWHES (Eq. 5).

For one question (one mixed group): copy the parameters, take one update on that group alone, and
record ``Delta(x) = mean_{i in P} [ln pi_new(y_i|x) - ln pi_old(y_i|x)]`` (sequence log-likelihoods of
the correct responses); then restore the parameters. A method suffers LLD on a question when
``Delta(x) <= 0``: the update meant to reinforce the correct answers did not raise their likelihood.

The update is the training optimizer's first step, AdamW (``lr * grad / |grad|``, element-wise), with
``lr = 1e-4`` by default: on the tiny default model that is the largest step that stays in the regime
where the methods differ (at 3e-4 most questions already lose likelihood under every method).
``optimizer="sgd"`` gives the plain gradient step, whose first-order effect is the gradient interaction
``<grad ln pi(y+), -grad loss>`` that the paper's analysis (and GWHES) describes.
"""

from __future__ import annotations

import math
import statistics
import time

import torch

from .loop import METHODS, grpo_step, nthr_result, token_advantages
from . import seeds as _seeds
from .model import torch_threads
from .rollout import Rollout, collect_rollout, completion_logprobs
from .stats import paired, summarize
from .task import AdditionTask

__all__ = ["sequence_logprobs", "lld_delta", "concat_rollouts", "collect_mixed_groups", "question_gwhes",
           "topk_overlap", "run_lld_study", "BETAS"]

BETAS = (float("-inf"), 0.0, 0.1, 1.0)


@torch.no_grad()
def sequence_logprobs(model, rollout: Rollout) -> torch.Tensor:
    """``[R]`` float64: ``ln pi(y_i | x_i)`` summed over each response's completion tokens."""
    logp = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids, temperature=rollout.temperature)
    return torch.where(rollout.mask, logp.double(), torch.zeros((), dtype=torch.float64)).sum(1)


def _make_optimizer(name: str, params, lr: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {name!r}")


def lld_delta(model, rollout: Rollout, token_adv: torch.Tensor, *, lr: float, optimizer: str = "adamw",
              clip_eps: float = 0.2, before: torch.Tensor | None = None) -> float:
    """Delta(x) of one update on ``rollout`` with ``token_adv``; the parameters are restored after.

    ``before``: the ``[R]`` sequence log-likelihoods under the current parameters, if already known.
    """
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    pos = rollout.rewards > 0.5
    if not bool(pos.any()):
        raise ValueError("rollout has no correct response: Delta(x) is undefined")
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.detach().clone() for p in params]
    try:
        if before is None:
            before = sequence_logprobs(model, rollout)
        opt = _make_optimizer(optimizer, params, lr)
        grpo_step(model, opt, rollout, token_adv, clip_eps=clip_eps, max_grad_norm=None)
        after = sequence_logprobs(model, rollout)
    finally:
        with torch.no_grad():
            for p, s in zip(params, saved):
                p.copy_(s)
            for p in params:
                p.grad = None
    return float((after - before)[pos].mean())


def concat_rollouts(rollouts: list[Rollout]) -> Rollout:
    """Stack rollouts with the same group size and temperature (completion columns padded)."""
    if not rollouts:
        raise ValueError("rollouts must be non-empty")
    G, T = rollouts[0].group_size, rollouts[0].temperature
    if any(r.group_size != G or r.temperature != T for r in rollouts):
        raise ValueError("rollouts must share group_size and temperature")
    width = max(r.completion_ids.shape[1] for r in rollouts)

    def pad(t, value):
        extra = width - t.shape[1]
        if extra == 0:
            return t
        shape = (t.shape[0], extra) + tuple(t.shape[2:])
        return torch.cat([t, torch.full(shape, value, dtype=t.dtype)], dim=1)

    cat = lambda name, value: torch.cat([pad(getattr(r, name), value) for r in rollouts])  # noqa: E731
    has_h = all(r.hidden is not None for r in rollouts)
    return Rollout(
        problems=[p for r in rollouts for p in r.problems],
        prompt_ids=torch.cat([r.prompt_ids for r in rollouts]),
        completion_ids=cat("completion_ids", 0), mask=cat("mask", False),
        rewards=torch.cat([r.rewards for r in rollouts]), advantages=torch.cat([r.advantages for r in rollouts]),
        group_size=G, temperature=T,
        hidden=cat("hidden", 0.0) if has_h else None, old_logprobs=cat("old_logprobs", 0.0) if has_h else None,
    )


def stream(seed: int, purpose: str) -> torch.Generator:
    """The random stream of one purpose of one seed of the study (:mod:`nthr_kernels.grpo.seeds`): streams of
    different seeds and purposes never coincide (seed s's random selection used to be seeded s + 1, which is
    seed s + 1's sampling stream)."""
    return _seeds.stream("lld", purpose, seed)


def collect_mixed_groups(model, task: AdditionTask, n_questions: int, *, group_size: int = 8,
                         temperature: float = 1.0, seed: int = 0, batch_prompts: int = 64,
                         max_batches: int = 32, progress: bool = True) -> tuple[Rollout, dict]:
    """Sample until ``n_questions`` mixed groups are found; returns them and sampling statistics."""
    from tqdm.auto import tqdm

    if not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be a positive int, got {n_questions!r}")
    gen = stream(seed, "sampling")
    kept, n_mixed, n_seen, correct = [], 0, 0, 0.0
    bar = tqdm(total=n_questions, desc="sampling mixed groups", disable=not progress, leave=False)
    for b in range(max_batches):
        # its own stream (seed * 100_003 + b was, for seed 0, the pretraining's problems of step b)
        problems = task.sample_problems(batch_prompts, seed=_seeds.seed_of("lld", "problems", seed, b))
        ro = collect_rollout(model, task, problems, group_size=group_size, temperature=temperature, generator=gen)
        n_seen += ro.n_groups
        correct += float(ro.rewards.sum())
        mixed = ro.mixed_groups().nonzero().squeeze(1).tolist()[: n_questions - n_mixed]
        if mixed:
            kept.append(ro.select_groups(mixed))
            n_mixed += len(mixed)
            bar.update(len(mixed))
        if n_mixed >= n_questions:
            break
    bar.close()
    if not kept:
        raise RuntimeError(f"no mixed group in {n_seen} sampled questions: the model is all-right or all-wrong")
    stats = {"questions_sampled": n_seen, "mixed_found": n_mixed,
             "sample_accuracy": correct / (n_seen * group_size)}
    return concat_rollouts(kept), stats


def question_gwhes(model, rollout: Rollout, group: int) -> float:
    """GWHES of one group (mean over its correct responses), float64 via ``nthr_kernels.ops.advantages.reference.gwhes``."""
    from nthr_kernels.ops.advantages.reference import gwhes

    G = rollout.group_size
    rows = slice(group * G, (group + 1) * G)
    m = rollout.mask[rows]
    resp = torch.arange(G).unsqueeze(1).expand_as(m)[m]
    out = gwhes(rollout.hidden[rows][m], rollout.completion_ids[rows][m], resp,
                [bool(r > 0.5) for r in rollout.rewards[rows]], lm_head_weight=model.lm_head.weight.detach(),
                old_logprobs=rollout.old_logprobs[rows][m], temperature=rollout.temperature)
    return float(out["score"])


def topk_overlap(predictor, deltas, k: int) -> float:
    """|top-k by predictor (largest) ∩ top-k laziest (smallest Delta)| / k."""
    n = len(deltas)
    if len(predictor) != n or not 1 <= k <= n:
        raise ValueError(f"need len(predictor) == len(deltas) >= k >= 1, got {len(predictor)}, {n}, {k}")
    by_pred = sorted(range(n), key=lambda i: (-predictor[i], i))[:k]
    laziest = sorted(range(n), key=lambda i: (deltas[i], i))[:k]
    return len(set(by_pred) & set(laziest)) / k


def run_lld_study(model, task: AdditionTask, *, seeds=(0,), questions_per_seed: int = 64, group_size: int = 8,
                  temperature: float = 1.0, lr: float = 1e-4, optimizer: str = "adamw", nthr_eta=0.0,
                  betas=BETAS, backend: str = "auto", ks=None, progress: bool = True) -> tuple[dict, list[Rollout]]:
    """The LLD study on ``questions_per_seed`` mixed groups for each seed of ``seeds``; returns
    ``(report, [rollout of each seed's groups])``.

    Methods: GRPO, Pos Only, GRPO + Random and GRPO + NTHR (``eta = nthr_eta``, 0 as in the paper for this
    measurement, ``beta = 1``). The questions of all seeds are pooled: per method mean and median Delta and
    the LLD fraction with bootstrap intervals, and each method paired with GRPO question by question
    (:mod:`nthr_kernels.grpo.stats`). Also: GWHES-vs-Delta(GRPO) top-K overlap against random ranking, a beta
    ablation of NTHR (same eta), the agreement of ``backend`` with ``backend="reference"`` on the
    selected tokens, and the time of one ``nthr_advantages`` call on a seed's batch.
    """
    _make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)], 1.0)  # fail before sampling, not after
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    if not isinstance(questions_per_seed, int) or isinstance(questions_per_seed, bool) or questions_per_seed < 1:
        raise ValueError(f"questions_per_seed must be a positive int, got {questions_per_seed!r}")
    seeds = list(seeds) if isinstance(seeds, (list, tuple)) else seeds
    if (not isinstance(seeds, list) or not seeds or len(set(seeds)) != len(seeds)
            or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in seeds)):
        raise ValueError(f"seeds must be a non-empty list of distinct non-negative ints, got {seeds!r}")
    with torch_threads() as threads:
        per_seed = [_measure_seed(model, task, s, questions_per_seed, group_size, temperature, lr, optimizer,
                                  nthr_eta, betas, backend, progress) for s in seeds]
    report = _pool(per_seed, ks)
    report["setup"] = {"group_size": group_size, "temperature": temperature, "optimizer": optimizer, "lr": lr,
                       "nthr_eta": nthr_eta, "nthr_beta": 1.0, "seeds": seeds, "questions_per_seed": questions_per_seed,
                       "torch_threads": threads.n,
                       **{k: sum(p["setup"][k] for p in per_seed)
                          for k in ("tokens", "negative_tokens", "questions_sampled", "mixed_found")},
                       "sample_accuracy": statistics.fmean(p["setup"]["sample_accuracy"] for p in per_seed)}
    report["backend"] = per_seed[0]["backend"]
    report["backend_requested"] = backend
    return report, [p["rollout"] for p in per_seed]


def _measure_seed(model, task, seed, n_questions, group_size, temperature, lr, optimizer, nthr_eta, betas, backend,
                  progress) -> dict:
    """One seed: sample its mixed groups, then Delta(x) of every method and beta on every question."""
    from tqdm.auto import tqdm

    from nthr_kernels.registry import resolve

    t_start = time.perf_counter()
    ro, stats = collect_mixed_groups(model, task, n_questions, group_size=group_size, temperature=temperature,
                                     seed=seed, progress=progress)
    n = ro.n_groups
    t_sampled = time.perf_counter()
    gen = stream(seed, "random selection")

    # token advantages of every method, computed once on the whole batch (NTHR works group by group)
    advs = {}
    for m in METHODS:
        advs[m], _ = token_advantages(model, ro, m, eta=nthr_eta, beta=1.0, backend=backend, generator=gen)
    neg_tok = ro.mask & (ro.rewards <= 0.5).unsqueeze(1)
    ablation_adv, ablation_sel = {}, {}
    for b in betas:
        res = nthr_result(model, ro, eta=nthr_eta, beta=b, backend=backend)
        ablation_adv[b], ablation_sel[b] = res.token_advantages.float(), int(res.selected.sum())

    # the kernels on the real model's hidden states: the backend vs the float64 reference
    res_fast = nthr_result(model, ro, eta=nthr_eta, backend=backend)
    res_ref = nthr_result(model, ro, eta=nthr_eta, backend="reference")
    agree = (res_fast.selected == res_ref.selected)[neg_tok]
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        nthr_result(model, ro, backend=backend)
        times.append(time.perf_counter() - t0)

    # one update per question and method
    deltas = {m: [] for m in METHODS}
    abl = {b: [] for b in betas}
    gw = []
    G = group_size
    for q in tqdm(range(n), desc=f"LLD seed {seed}: one update per question and method", disable=not progress,
                  leave=False):
        sub = ro.select_groups([q])
        rows = slice(q * G, (q + 1) * G)
        before = sequence_logprobs(model, sub)
        done: list[tuple[torch.Tensor, float]] = []  # identical token advantages give the identical update

        def delta(adv):
            for a, d in done:
                if torch.equal(a, adv):
                    return d
            d = lld_delta(model, sub, adv, lr=lr, optimizer=optimizer, before=before)
            done.append((adv, d))
            return d

        for m in METHODS:
            deltas[m].append(delta(advs[m][rows]))
        for b in betas:
            abl[b].append(delta(ablation_adv[b][rows]))
        gw.append(question_gwhes(model, ro, q))
    return {"seed": seed, "rollout": ro, "deltas": deltas, "ablation": abl, "ablation_selected": ablation_sel,
            "gwhes": gw, "agree": int(agree.sum()), "selected": int(res_fast.selected.sum()),
            "backend": resolve(backend, ro.hidden.device), "nthr_ms": 1e3 * statistics.median(times),
            "setup": {"tokens": int(ro.mask.sum()), "negative_tokens": int(neg_tok.sum()), **stats},
            "seconds": {"sampling": t_sampled - t_start, "updates": time.perf_counter() - t_sampled}}


def _pool(per_seed: list[dict], ks) -> dict:
    """The report over the questions of every seed (see :func:`run_lld_study`)."""
    from nthr_kernels import available_backends

    pool = lambda get: [x for p in per_seed for x in get(p)]  # noqa: E731
    deltas = {m: pool(lambda p: p["deltas"][m]) for m in METHODS}
    betas = list(per_seed[0]["ablation"])
    gw = pool(lambda p: p["gwhes"])
    n = len(gw)
    n_neg = max(1, sum(p["setup"]["negative_tokens"] for p in per_seed))
    ks = sorted({k for k in (ks or (max(1, n // 8), max(1, n // 4), max(1, n // 2))) if 1 <= k <= n})
    rng = stream(per_seed[0]["seed"], "top-K random baseline")
    overlap = {}
    for k in ks:
        rand = [topk_overlap(torch.rand(n, generator=rng).tolist(), deltas["grpo"], k) for _ in range(1000)]
        overlap[str(k)] = {"gwhes": topk_overlap(gw, deltas["grpo"], k), "random_expected": k / n,
                           "random_mean": statistics.fmean(rand), "random_std": statistics.pstdev(rand)}
    grpo = deltas["grpo"]
    return {
        "questions": n,
        "seeds": [p["seed"] for p in per_seed],
        "methods": {m: summarize(deltas[m]) for m in METHODS},
        "paired_vs_grpo": {m: paired(deltas[m], grpo) for m in METHODS if m != "grpo"},
        "per_seed": {str(p["seed"]): {m: {"lld_fraction": sum(x <= 0 for x in p["deltas"][m]) / len(p["deltas"][m]),
                                          "mean_delta": statistics.fmean(p["deltas"][m])} for m in METHODS}
                     for p in per_seed},
        "kernel_agreement": sum(p["agree"] for p in per_seed) / n_neg,
        "nthr_ms": statistics.median(p["nthr_ms"] for p in per_seed),
        "available_backends": available_backends(),
        "selected_fraction": sum(p["selected"] for p in per_seed) / n_neg,
        "beta_ablation": {str(b): {**summarize(pool(lambda p: p["ablation"][b])),
                                   "paired_vs_grpo": paired(pool(lambda p: p["ablation"][b]), grpo),
                                   "selected_fraction": sum(p["ablation_selected"][b] for p in per_seed) / n_neg}
                          for b in betas},
        "gwhes": {"scores": gw, "topk_overlap": overlap, "spearman_vs_grpo_delta": _spearman(gw, grpo)},
        "seconds": {k: sum(p["seconds"][k] for p in per_seed) for k in ("sampling", "updates")},
    }


def _spearman(x, y) -> float:
    def ranks(v):
        order = sorted(range(len(v)), key=lambda i: v[i])
        r = [0.0] * len(v)
        i = 0
        while i < len(order):  # average ranks of ties
            j = i
            while j + 1 < len(order) and v[order[j + 1]] == v[order[i]]:
                j += 1
            for t in range(i, j + 1):
                r[order[t]] = (i + j) / 2
            i = j + 1
        return r

    rx, ry = ranks(list(x)), ranks(list(y))
    n = len(rx)
    if n < 2:
        return math.nan
    mx, my = sum(rx) / n, sum(ry) / n
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sx = math.sqrt(sum((a - mx) ** 2 for a in rx))
    sy = math.sqrt(sum((b - my) ** 2 for b in ry))
    return cov / (sx * sy) if sx and sy else math.nan
