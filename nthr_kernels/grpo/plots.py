"""Matplotlib figures (Agg backend, PNG) for the LLD study and the training run."""

from __future__ import annotations

import math
from pathlib import Path

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
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_lld(report: dict, path) -> Path:
    """Per-question Delta(x) of each method (questions sorted by GRPO's Delta), the distributions with
    the LLD fraction, and the beta ablation."""
    plt = _plt()
    methods = [m for m in _LABELS if m in report["methods"]]
    n = report["questions"]
    order = sorted(range(n), key=lambda i: report["methods"]["grpo"]["deltas"][i])
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [2.2, 1.2, 1.2]})
    ax = axes[0]
    width = 0.8 / len(methods)
    for k, m in enumerate(methods):
        d = report["methods"][m]["deltas"]
        ax.bar([x + (k - (len(methods) - 1) / 2) * width for x in range(n)], [d[i] for i in order], width,
               color=_COLORS[m], label=_LABELS[m])
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlabel("question (sorted by GRPO's Delta)")
    ax.set_ylabel(r"$\Delta(x)$: mean change of ln $\pi(y^+|x)$")
    ax.set_title("Likelihood change of the correct responses after one update")
    ax.legend(fontsize=8)
    ax = axes[1]
    ax.boxplot([report["methods"][m]["deltas"] for m in methods], showfliers=True)
    ax.set_xticks(range(1, len(methods) + 1),
                  [f"{_LABELS[m]}\nLLD {100 * report['methods'][m]['lld_fraction']:.0f}%" for m in methods], fontsize=8)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_title(r"$\Delta(x)$ per method (fraction with $\Delta \leq 0$)")
    ax = axes[2]
    abl = report.get("beta_ablation", {})
    if abl:
        keys = sorted(abl, key=float)
        xs = range(len(keys))
        ax.bar(xs, [abl[b]["mean_delta"] for b in keys], color="#1f77b4", label=r"mean $\Delta$")
        ax.set_xticks(list(xs), [("-inf" if math.isinf(float(b)) else b) for b in keys])
        ax.axhline(0, color="black", lw=0.8)
        ax.set_xlabel(r"NTHR $\beta$ (same $\eta$)")
        ax.set_ylabel(r"mean $\Delta(x)$")
        ax2 = ax.twinx()
        ax2.plot(list(xs), [abl[b]["selected_fraction"] for b in keys], "o-", color="#ff7f0e",
                 label="selected fraction")
        ax2.set_ylabel("fraction of negative tokens selected")
        ax2.set_ylim(0, 1.05)
        ax.set_title(r"$\beta$ ablation")
    return _save(plt, fig, path)


def plot_training(histories: list[dict], path) -> Path:
    """Held-out accuracy over steps, one line per run."""
    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for h in histories:
        label = _LABELS.get(h["method"], h["method"])
        c = _COLORS.get(h["method"])
        axes[0].plot(h["step"], h["eval_acc"], "o-", label=label, color=c)
        axes[1].plot(range(1, len(h["train_reward"]) + 1), h["train_reward"], label=label, color=c, alpha=0.8)
    axes[0].set_xlabel("GRPO step")
    axes[0].set_ylabel("held-out accuracy (T = 1 samples)")
    axes[1].set_xlabel("GRPO step")
    axes[1].set_ylabel("mean reward of the rollout batch")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)
