"""``python -m nthr_kernels demo``: the LLD study on the embedded default model, end to end.

Writes into ``out_dir``: ``report.json`` (schema below), ``lld_deltas.png`` (per-question Delta(x) of
each method, their distributions, the beta ablation) and ``highlight.html`` (incorrect responses with
NTHR's selected tokens). Report schema::

    {"questions": int,
     "methods": {"grpo"|"pos_only"|"random"|"nthr": {"mean_delta", "median_delta", "lld_fraction", "deltas"}},
     "kernel_agreement": float,   # default backend vs backend="reference": same selection, per negative token
     "nthr_ms": float,            # one nthr_advantages call on the whole batch of mixed groups
     "beta_ablation": {...}, "gwhes": {...}, "setup": {...}, "model": {...}, "seconds": {...}}
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

__all__ = ["run_demo", "format_table", "json_safe"]

_NAMES = {"grpo": "GRPO", "pos_only": "Pos Only", "random": "GRPO + Random", "nthr": "GRPO + NTHR (eta=0)"}


def format_table(report: dict) -> str:
    """The study as a plain-text table."""
    rows = [f"LLD study: {report['questions']} questions with mixed groups, one update each "
            f"({report['setup']['optimizer']}, lr={report['setup']['lr']})",
            f"{'method':<22}{'mean Delta':>12}{'median Delta':>14}{'LLD (Delta<=0)':>16}"]
    for m, s in report["methods"].items():
        rows.append(f"{_NAMES.get(m, m):<22}{s['mean_delta']:>12.4f}{s['median_delta']:>14.4f}"
                    f"{100 * s['lld_fraction']:>15.1f}%")
    rows.append("")
    rows.append(f"beta ablation (NTHR, eta={report['setup']['nthr_eta']}):")
    rows.append(f"{'beta':<22}{'mean Delta':>12}{'median Delta':>14}{'LLD (Delta<=0)':>16}{'selected':>10}")
    for b, s in sorted(report["beta_ablation"].items(), key=lambda kv: float(kv[0])):
        rows.append(f"{b:<22}{s['mean_delta']:>12.4f}{s['median_delta']:>14.4f}{100 * s['lld_fraction']:>15.1f}%"
                    f"{100 * s['selected_fraction']:>9.1f}%")
    rows.append("")
    rows.append("GWHES vs GRPO's Delta: overlap of the top-K by GWHES with the K laziest questions")
    rows.append(f"{'K':<6}{'GWHES':>8}{'random (mean +- std)':>24}")
    for k, o in report["gwhes"]["topk_overlap"].items():
        rows.append(f"{k:<6}{o['gwhes']:>8.3f}{o['random_mean']:>14.3f} +- {o['random_std']:.3f}")
    rows.append(f"Spearman(GWHES, GRPO Delta) = {report['gwhes']['spearman_vs_grpo_delta']:.3f} "
                f"(negative: larger GWHES, lazier)")
    rows.append("")
    rows.append(f"kernels on the model's hidden states: backend {report['backend']!r} agrees with 'reference' on "
                f"{100 * report['kernel_agreement']:.2f}% of {report['setup']['negative_tokens']} negative tokens; "
                f"nthr_advantages took {report['nthr_ms']:.2f} ms for the batch")
    return "\n".join(rows)


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
             seed: int = 0, progress: bool = True) -> dict:
    """Run the LLD study on the embedded default model; write plots, HTML and JSON into ``out_dir``.

    ``quick=True``: a smaller model trained for a few seconds (no need for the cached default model)
    and 16 questions; for tests and CI. Returns the report dict (as written to JSON).
    """
    from .highlight import render_ansi, render_html
    from .lld import run_lld_study
    from .model import DEFAULT_SPEC, QUICK_SPEC, cache_dir, load_default_model
    from .plots import plot_lld

    if not isinstance(out_dir, (str, Path)):
        raise TypeError(f"out_dir must be a path, got {type(out_dir).__name__}")
    if not isinstance(quick, bool):
        raise TypeError(f"quick must be a bool, got {type(quick).__name__}")
    if json_path is not None and not isinstance(json_path, (str, Path)):
        raise TypeError(f"json_path must be a path or None, got {type(json_path).__name__}")
    t0 = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = QUICK_SPEC if quick else DEFAULT_SPEC
    model, task = load_default_model(spec, progress=progress)
    t_model = time.perf_counter()
    report, ro = run_lld_study(model, task, n_questions=16 if quick else 64, seed=seed, progress=progress)
    report["model"] = {"architecture": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
                       "spec": spec.__dict__, "cache": str(cache_dir()), "task": f"{spec.n_digits}-digit addition"}
    report["quick"] = quick
    report["seconds"]["model"] = t_model - t0

    # highlighting: NTHR's default selection (beta = 1), first few questions
    from .loop import nthr_result

    sel = nthr_result(model, ro).selected
    groups = list(range(min(8, ro.n_groups)))
    html_path = render_html(task, ro, sel, out / "highlight.html", groups=groups,
                            note=f"{report['model']['task']}, tiny Qwen2, beta=1, 8 responses per question")
    png_path = plot_lld(report, out / "lld_deltas.png")
    report["seconds"]["total"] = time.perf_counter() - t0
    report = json_safe(report)
    paths = [out / "report.json"] + ([Path(json_path)] if json_path is not None else [])
    for p in paths:
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(report, indent=1) + "\n")

    print(format_table(report))
    print()
    print("NTHR-selected tokens (orange) in incorrect responses:")
    print(render_ansi(task, ro, sel, groups=groups[:2], max_negatives=3))
    print()
    print(f"wrote {png_path}, {html_path} and {', '.join(map(str, paths))} "
          f"({report['seconds']['total']:.0f} s)")
    return report
