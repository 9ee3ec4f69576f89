"""``python -m nthr_kernels demo``: the LLD study on the embedded default model, end to end.

Writes into ``out_dir`` (each file atomically, see :mod:`nthr_kernels.grpo.files`): ``report.json``
(schema below), ``lld_deltas.png`` (per-question Delta(x) of each method, their distributions, the paired
differences and the beta ablation against GRPO) and ``highlight.html`` (incorrect responses with NTHR's
selected tokens). Report schema::

    {"questions": int, "seeds": [int, ...],   # questions pooled over the seeds
     "methods": {"grpo"|"pos_only"|"random"|"nthr":
                 {"mean_delta", "median_delta", "lld_fraction", "ci95": {same keys: [lo, hi]}, "deltas"}},
     "paired_vs_grpo": {method: {"mean_diff", "ci95": [lo, hi], "win_rate", "tie_rate", "lld_diff", "lld_ci95"}},
     "kernel_agreement": float,   # backend vs backend="reference": same selection, per negative token
     "nthr_ms": float,            # one nthr_advantages call on one seed's batch of mixed groups
     "backend": str,              # the backend that ran (never "auto")
     "backend_table": {...},      # the synthetic backend check (python -m nthr_kernels demo)
     "beta_ablation": {...}, "gwhes": {...}, "per_seed": {...}, "setup": {...}, "model": {...}, "seconds": {...}}
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["StudySize", "FULL_STUDY", "QUICK_STUDY", "run_demo", "format_table", "format_ci", "verdict", "json_safe",
           "NAMES"]

NAMES = {"grpo": "GRPO", "pos_only": "Pos Only", "random": "GRPO + Random", "nthr": "GRPO + NTHR (eta=0)"}


@dataclass(frozen=True)
class StudySize:
    seeds: tuple[int, ...]
    questions_per_seed: int


# the study's time is recorded in benchmarks/results/lld-study.json ("seconds"); --quick: well under a minute
FULL_STUDY = StudySize(seeds=(0, 1, 2, 3, 4), questions_per_seed=52)
QUICK_STUDY = StudySize(seeds=(0, 1), questions_per_seed=8)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def format_ci(ci, scale: float = 1.0, digits: int = 3) -> str:
    """``[lo, hi]`` of an interval, times ``scale``."""
    return f"[{scale * ci[0]:.{digits}f}, {scale * ci[1]:.{digits}f}]"


def format_table(report: dict) -> str:
    """The study as a plain-text table (95 % bootstrap intervals in brackets)."""
    s = report["setup"]
    rows = [f"LLD study: {report['questions']} questions with mixed groups ({len(report['seeds'])} seeds x "
            f"{s['questions_per_seed']}), one update each ({s['optimizer']}, lr={s['lr']}); "
            f"95 % bootstrap intervals in brackets",
            f"{'method':<21}{'mean Delta':>24}{'median Delta':>24}{'LLD % (Delta<=0)':>22}"]
    for m, r in report["methods"].items():
        c = r["ci95"]
        rows.append(f"{NAMES.get(m, m):<21}{r['mean_delta']:>8.3f} {format_ci(c['mean_delta']):>15}"
                    f"{r['median_delta']:>8.3f} {format_ci(c['median_delta']):>15}"
                    f"{_pct(r['lld_fraction']):>7} {format_ci(c['lld_fraction'], 100, 1):>14}")
    rows.append("")
    rows.append("paired with GRPO, question by question:")
    rows.append(f"{'method':<21}{'mean Delta diff':>26}{'better':>8}{'equal':>7}{'LLD points diff':>26}")
    for m, p in report["paired_vs_grpo"].items():
        rows.append(f"{NAMES.get(m, m):<21}{p['mean_diff']:>+9.3f} {format_ci(p['ci95']):>16}{_pct(p['win_rate']):>7}%"
                    f"{_pct(p['tie_rate']):>6}%{100 * p['lld_diff']:>+9.1f} {format_ci(p['lld_ci95'], 100, 1):>16}")
    rows.append("")
    rows.append(f"beta ablation (NTHR, eta={s['nthr_eta']}), paired with GRPO:")
    rows.append(f"{'beta':<21}{'mean Delta':>11}{'diff vs GRPO':>26}{'LLD %':>8}{'selected':>10}")
    for b, r in sorted(report["beta_ablation"].items(), key=lambda kv: float(kv[0])):
        p = r["paired_vs_grpo"]
        rows.append(f"{b:<21}{r['mean_delta']:>11.3f}{p['mean_diff']:>+9.3f} {format_ci(p['ci95']):>16}"
                    f"{_pct(r['lld_fraction']):>8}{_pct(r['selected_fraction']):>9}%")
    rows.append("")
    rows.append("GWHES vs GRPO's Delta: overlap of the top-K by GWHES with the K laziest questions")
    rows.append(f"{'K':<6}{'GWHES':>8}{'random (mean +- std)':>24}")
    for k, o in report["gwhes"]["topk_overlap"].items():
        rows.append(f"{k:<6}{o['gwhes']:>8.3f}{o['random_mean']:>14.3f} +- {o['random_std']:.3f}")
    rows.append(f"Spearman(GWHES, GRPO Delta) = {report['gwhes']['spearman_vs_grpo_delta']:.3f} "
                f"(negative: larger GWHES, lazier)")
    rows.append("")
    rows.append(f"kernels on the model's hidden states: backend {report['backend']!r} agrees with 'reference' on "
                f"{100 * report['kernel_agreement']:.2f}% of {s['negative_tokens']} negative tokens; "
                f"nthr_advantages took {report['nthr_ms']:.2f} ms for a batch of {s['questions_per_seed']} groups")
    return "\n".join(rows)


def verdict(report: dict) -> str:
    """What the numbers say about NTHR against GRPO, in plain words (also when they say nothing)."""
    from .stats import excludes_zero, paired

    g, t = report["methods"]["grpo"], report["methods"]["nthr"]
    p = report["paired_vs_grpo"]["nthr"]
    n, k = report["questions"], len(report["seeds"])
    ci = f"paired difference {100 * p['lld_diff']:+.1f} points, 95 % CI {format_ci(p['lld_ci95'], 100, 1)}"
    if excludes_zero(p["lld_ci95"]):
        word = "lowered" if p["lld_diff"] < 0 else "raised"
        first = (f"NTHR {word} the share of questions whose right answers lost likelihood from "
                 f"{_pct(g['lld_fraction'])} % (GRPO) to {_pct(t['lld_fraction'])} % ({ci}).")
    else:
        first = (f"NTHR did not measurably change the share of questions whose right answers lost likelihood: "
                 f"{_pct(g['lld_fraction'])} % (GRPO) against {_pct(t['lld_fraction'])} % ({ci}, which includes 0).")
    diff = f"{p['mean_diff']:+.3f} (95 % CI {format_ci(p['ci95'])})"
    if excludes_zero(p["ci95"]):
        word = "raised" if p["mean_diff"] > 0 else "lowered"
        second = (f"It {word} the mean log-likelihood change of the right answers by {diff}, and did better than "
                  f"GRPO on {_pct(p['win_rate'])} % of the questions (equal on {_pct(p['tie_rate'])} %).")
    else:
        second = f"Its mean log-likelihood change of the right answers differs from GRPO's by {diff}: no clear effect."
    vs_rand = paired(t["deltas"], report["methods"]["random"]["deltas"])
    rand = f"mean Delta {vs_rand['mean_diff']:+.3f} against Random, 95 % CI {format_ci(vs_rand['ci95'])}"
    third = ("Against down-weighting as many random negative tokens, NTHR's choice of tokens "
             + (f"made a difference ({rand})." if excludes_zero(vs_rand["ci95"])
                else f"made no clear difference here ({rand})."))
    return f"Verdict ({n} questions, {k} seeds): {first} {second} {third}"


def json_safe(x):
    """``x`` with non-finite floats as strings (``"inf"``, ``"-inf"``) or None (NaN): strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None if math.isnan(x) else ("inf" if x > 0 else "-inf")
    if isinstance(x, dict):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def run_demo(out_dir: str = "nthr_results", quick: bool = False, json_path: str | None = None, *,
             size: StudySize | None = None, backend_table: dict | None = None, progress: bool = True) -> dict:
    """Run the LLD study on the embedded default model; write plots, HTML and JSON into ``out_dir``.

    ``quick=True``: :data:`QUICK_STUDY` (2 seeds x 8 questions) instead of :data:`FULL_STUDY`; ``size``
    overrides both. ``backend_table``: the synthetic backend check's result, stored in the report.
    Loads the shipped weights: trains nothing, writes no model file. Returns the report (as in the JSON).
    """
    from nthr_kernels.demo_synthetic import machine_description

    from .files import write_text_atomic
    from .highlight import render_ansi, render_html, use_colour
    from .lld import run_lld_study
    from .loop import nthr_result
    from .model import WEIGHTS_DIR, load_default_model, torch_threads
    from .plots import plot_lld

    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    if json_path is not None and not isinstance(json_path, (str, Path)):
        raise TypeError(f"json_path must be a path or None, got {type(json_path).__name__}")
    if size is not None and not isinstance(size, StudySize):
        raise TypeError(f"size must be a StudySize or None, got {type(size).__name__}")
    if backend_table is not None and not isinstance(backend_table, dict):
        raise TypeError(f"backend_table must be a dict or None, got {type(backend_table).__name__}")
    size = size or (QUICK_STUDY if quick else FULL_STUDY)
    t0, cpu0 = time.perf_counter(), time.process_time()
    out = Path(out_dir)
    model, task = load_default_model(progress=progress)
    t_model = time.perf_counter()
    report, rollouts = run_lld_study(model, task, seeds=list(size.seeds), questions_per_seed=size.questions_per_seed,
                                     progress=progress)
    report["model"] = {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                       "weights": str(WEIGHTS_DIR), "task": f"{task.n_digits}-digit addition"}
    with torch_threads():  # the machine as the study saw it (its thread count)
        report["machine"] = machine_description()
    report["quick"] = quick
    report["backend_table"] = backend_table
    report["seconds"]["model"] = t_model - t0

    # highlighting: NTHR's default selection (beta = 1), the first questions of the first seed
    ro = rollouts[0]
    sel = nthr_result(model, ro).selected
    groups = list(range(min(8, ro.n_groups)))
    html_path = render_html(task, ro, sel, out / "highlight.html", groups=groups,
                            note=f"{report['model']['task']}, tiny Qwen2, beta=1, 8 responses per question")
    png_path = plot_lld(report, out / "lld_deltas.png")
    report["seconds"]["total"] = time.perf_counter() - t0
    report["seconds"]["cpu"] = time.process_time() - cpu0  # CPU time of the study; with one thread about its wall time on an idle core
    report = json_safe(report)
    paths = [out / "report.json"] + ([Path(json_path)] if json_path is not None else [])
    text = json.dumps(report, indent=1) + "\n"
    for p in paths:
        write_text_atomic(p, text)

    print(format_table(report))
    print()
    print("NTHR-selected tokens (marked) in incorrect responses:")
    print(render_ansi(task, ro, sel, groups=groups[:2], max_negatives=3, colour=use_colour()))
    print()
    print(f"wrote {png_path}, {html_path} and {', '.join(map(str, paths))} "
          f"({report['seconds']['total']:.0f} s)")
    print()
    print(verdict(report))
    return report
