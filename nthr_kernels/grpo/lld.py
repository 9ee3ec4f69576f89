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
from .model import torch_threads
from .rollout import Rollout, collect_rollout, completion_logprobs
from .task import AdditionTask

__all__ = ["sequence_logprobs", "lld_delta", "concat_rollouts", "collect_mixed_groups", "question_gwhes",
           "topk_overlap", "summarize", "run_lld_study", "BETAS"]

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


def collect_mixed_groups(model, task: AdditionTask, n_questions: int, *, group_size: int = 8,
                         temperature: float = 1.0, seed: int = 0, batch_prompts: int = 64,
                         max_batches: int = 32, progress: bool = True) -> tuple[Rollout, dict]:
    """Sample until ``n_questions`` mixed groups are found; returns them and sampling statistics."""
    from tqdm.auto import tqdm

    if not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be a positive int, got {n_questions!r}")
    gen = torch.Generator().manual_seed(seed)
    kept, n_mixed, n_seen, correct = [], 0, 0, 0.0
    bar = tqdm(total=n_questions, desc="sampling mixed groups", disable=not progress, leave=False)
    for b in range(max_batches):
        problems = task.sample_problems(batch_prompts, seed=seed * 100_003 + b)
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


def summarize(deltas) -> dict:
    d = [float(x) for x in deltas]
    return {"mean_delta": statistics.fmean(d), "median_delta": statistics.median(d),
            "lld_fraction": sum(x <= 0 for x in d) / len(d), "deltas": d}


def run_lld_study(model, task: AdditionTask, *, n_questions: int = 64, group_size: int = 8,
                  temperature: float = 1.0, lr: float = 1e-4, optimizer: str = "adamw", nthr_eta=0.0,
                  betas=BETAS, backend: str = "auto", seed: int = 0, ks=None,
                  progress: bool = True) -> tuple[dict, Rollout]:
    """The LLD study on ``n_questions`` mixed groups; returns ``(report, rollout of those groups)``.

    Methods: GRPO, Pos Only, GRPO + Random and GRPO + NTHR (``eta = nthr_eta``, 0 as in the paper for this
    measurement, ``beta = 1``). Also: GWHES-vs-Delta(GRPO) top-K overlap against random ranking, a beta
    ablation of NTHR (same eta), the agreement of ``backend`` with ``backend="reference"`` on the
    selected tokens, and the time of one ``nthr_advantages`` call on the whole batch.
    """
    _make_optimizer(optimizer, [torch.zeros(1, requires_grad=True)], 1.0)  # fail before sampling, not after
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite float, got {lr!r}")
    if not isinstance(n_questions, int) or n_questions < 1:
        raise ValueError(f"n_questions must be a positive int, got {n_questions!r}")
    with torch_threads():
        return _run_lld_study(model, task, n_questions, group_size, temperature, lr, optimizer, nthr_eta, betas,
                              backend, seed, ks, progress)


def _run_lld_study(model, task, n_questions, group_size, temperature, lr, optimizer, nthr_eta, betas, backend,
                   seed, ks, progress):
    from tqdm.auto import tqdm

    from nthr_kernels import available_backends

    t_start = time.perf_counter()
    ro, stats = collect_mixed_groups(model, task, n_questions, group_size=group_size, temperature=temperature,
                                     seed=seed, progress=progress)
    n = ro.n_groups
    t_sampled = time.perf_counter()
    gen = torch.Generator().manual_seed(seed + 1)

    # token advantages of every method, computed once on the whole batch (NTHR works group by group)
    advs = {}
    for m in METHODS:
        advs[m], _ = token_advantages(model, ro, m, eta=nthr_eta, beta=1.0, backend=backend, generator=gen)
    neg_tok = ro.mask & (ro.rewards <= 0.5).unsqueeze(1)
    ablation_adv, ablation_sel = {}, {}
    for b in betas:
        res = nthr_result(model, ro, eta=nthr_eta, beta=b, backend=backend)
        ablation_adv[b], ablation_sel[b] = res.token_advantages.float(), res.selected

    # the kernels on the real model's hidden states: default backend vs float64 reference
    res_fast = nthr_result(model, ro, eta=nthr_eta, backend=backend)
    res_ref = nthr_result(model, ro, eta=nthr_eta, backend="reference")
    agree = (res_fast.selected == res_ref.selected)[neg_tok]
    kernel_agreement = float(agree.float().mean()) if agree.numel() else 1.0
    times = []
    for _ in range(7):
        t0 = time.perf_counter()
        nthr_result(model, ro, backend=backend)
        times.append(time.perf_counter() - t0)
    nthr_ms = 1e3 * statistics.median(times)

    # one update per question and method
    deltas = {m: [] for m in METHODS}
    abl = {b: [] for b in betas}
    gw = []
    G = group_size
    for q in tqdm(range(n), desc="LLD: one update per question and method", disable=not progress, leave=False):
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
    t_updates = time.perf_counter()

    ks = sorted({k for k in (ks or (max(1, n // 8), max(1, n // 4), max(1, n // 2))) if 1 <= k <= n})
    rng = torch.Generator().manual_seed(seed + 2)
    overlap = {}
    for k in ks:
        rand = [topk_overlap(torch.rand(n, generator=rng).tolist(), deltas["grpo"], k) for _ in range(1000)]
        overlap[str(k)] = {"gwhes": topk_overlap(gw, deltas["grpo"], k), "random_expected": k / n,
                           "random_mean": statistics.fmean(rand), "random_std": statistics.pstdev(rand)}
    n_neg = max(1, int(neg_tok.sum()))
    report = {
        "questions": n,
        "methods": {m: summarize(deltas[m]) for m in METHODS},
        "kernel_agreement": kernel_agreement,
        "nthr_ms": nthr_ms,
        "backend": backend,
        "available_backends": available_backends(),
        "selected_fraction": float(res_fast.selected.sum()) / n_neg,
        "beta_ablation": {str(b): {**summarize(abl[b]), "selected_fraction": float(ablation_sel[b].sum()) / n_neg}
                          for b in betas},
        "gwhes": {"scores": gw, "topk_overlap": overlap,
                  "spearman_vs_grpo_delta": _spearman(gw, deltas["grpo"])},
        "setup": {"group_size": group_size, "temperature": temperature, "optimizer": optimizer, "lr": lr,
                  "nthr_eta": nthr_eta, "nthr_beta": 1.0, "seed": seed, "tokens": int(ro.mask.sum()),
                  "negative_tokens": n_neg, **stats},
        "seconds": {"sampling": t_sampled - t_start, "updates": t_updates - t_sampled},
    }
    return report, ro


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
