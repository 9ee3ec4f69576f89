"""Matplotlib figures (Agg backend, PNG) for the LLD study and the training runs."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from .files import atomic_path

__all__ = ["plot_lld", "plot_training"]

_LABELS = {"grpo": "GRPO", "pos_only": "Pos Only", "random": "GRPO + Random", "nthr": "GRPO + NTHR"}
_COLORS = {"grpo": "#d62728", "pos_only": "#2ca02c", "random": "#7f7f7f", "nthr": "#1f77b4"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path) -> Path:
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(path)


def _diff_panel(ax, labels, diffs, colors, title):
    """Paired mean differences against GRPO with their 95 % intervals, on an axis around 0."""
    xs = range(len(labels))
    mean = [d["mean_diff"] for d in diffs]
    err = [[m - d["ci95"][0] for m, d in zip(mean, diffs)], [d["ci95"][1] - m for m, d in zip(mean, diffs)]]
    ax.bar(xs, mean, color=colors, alpha=0.85)
    ax.errorbar(xs, mean, yerr=err, fmt="none", ecolor="black", capsize=4, lw=1)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(list(xs), labels, fontsize=8)
    ax.set_ylabel(r"mean $\Delta$ minus GRPO's (same questions)")
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)


def plot_lld(report: dict, path) -> Path:
    """Four panels: per-question Delta(x) of each method (questions sorted by GRPO's Delta), the
    distributions with the LLD fraction, the paired differences against GRPO, and the beta ablation as
    differences against GRPO (with the fraction of negative tokens selected)."""
    plt = _plt()
    methods = [m for m in _LABELS if m in report["methods"]]
    n = report["questions"]
    order = sorted(range(n), key=lambda i: report["methods"]["grpo"]["deltas"][i])
    fig, axes = plt.subplots(1, 4, figsize=(21, 4.8), gridspec_kw={"width_ratios": [2.0, 1.2, 1.0, 1.1]})
    ax = axes[0]
    for m in methods:
        d = report["methods"][m]["deltas"]
        ax.plot(range(n), [d[i] for i in order], ".", ms=3, color=_COLORS[m], label=_LABELS[m], alpha=0.8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("question (sorted by GRPO's Delta)")
    ax.set_ylabel(r"$\Delta(x)$: mean change of ln $\pi(y^+|x)$")
    ax.set_title(f"Likelihood change of the correct responses after one update ({n} questions)")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.boxplot([report["methods"][m]["deltas"] for m in methods], showfliers=True)
    ax.set_xticks(range(1, len(methods) + 1),
                  [f"{_LABELS[m]}\nLLD {100 * report['methods'][m]['lld_fraction']:.1f}%" for m in methods], fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title(r"$\Delta(x)$ per method (fraction with $\Delta \leq 0$)")
    others = [m for m in methods if m in report.get("paired_vs_grpo", {})]
    _diff_panel(axes[2], [_LABELS[m].replace("GRPO + ", "+ ") for m in others],
                [report["paired_vs_grpo"][m] for m in others], [_COLORS[m] for m in others],
                "Paired with GRPO (95 % CI)")
    abl = report.get("beta_ablation", {})
    if abl:
        keys = sorted(abl, key=float)
        _diff_panel(axes[3], [("-inf" if math.isinf(float(b)) else b) for b in keys],
                    [abl[b]["paired_vs_grpo"] for b in keys], ["#1f77b4"] * len(keys),
                    r"NTHR $\beta$ ablation, paired with GRPO")
        axes[3].set_xlabel(r"NTHR $\beta$ (same $\eta$)")
        ax2 = axes[3].twinx()
        ax2.plot(range(len(keys)), [abl[b]["selected_fraction"] for b in keys], "o-", color="#ff7f0e")
        ax2.set_ylabel("fraction of negative tokens selected (orange)")
        ax2.set_ylim(0, 1.05)
    return _save(plt, fig, path)


def plot_training(histories: list[dict], path) -> Path:
    """Held-out accuracy and rollout reward over steps: per method the mean over its runs (seeds), with
    a band from the lowest to the highest run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for method in dict.fromkeys(h["method"] for h in histories):
        runs = [h for h in histories if h["method"] == method]
        label = f"{_LABELS.get(method, method)} ({len(runs)} seeds)"
        c = _COLORS.get(method)
        for ax, key, xs in ((axes[0], "eval_acc", runs[0]["step"]),
                            (axes[1], "train_reward", range(1, len(runs[0]["train_reward"]) + 1))):
            cols = list(zip(*(h[key] for h in runs)))
            xs = list(xs)
            ax.plot(xs, [statistics.fmean(v) for v in cols], "-", label=label, color=c)
            ax.fill_between(xs, [min(v) for v in cols], [max(v) for v in cols], color=c, alpha=0.2, lw=0)
    axes[0].set_xlabel("GRPO step")
    axes[0].set_ylabel("held-out accuracy (T = 1 samples)")
    axes[1].set_xlabel("GRPO step")
    axes[1].set_ylabel("mean reward of the rollout batch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    axes[0].set_title("mean over seeds; band: lowest to highest seed")
    return _save(plt, fig, path)
