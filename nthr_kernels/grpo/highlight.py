"""Token highlighting (the paper's figure 3): incorrect responses with NTHR's selected tokens marked.

Selected tokens are the negative tokens whose penalty would most lower the likelihood of the group's
correct responses; NTHR down-weights them. :func:`render_html` writes a self-contained HTML page,
:func:`render_ansi` returns the same view for a terminal (ANSI colours, or brackets without them).
"""

from __future__ import annotations

import html
import os
import sys
from pathlib import Path
import torch

from .files import write_text_atomic
from .rollout import Rollout
from .task import AdditionTask

__all__ = ["highlight_groups", "render_html", "render_ansi", "use_colour"]


def highlight_groups(task: AdditionTask, rollout: Rollout, selected: torch.Tensor, groups=None,
                     max_negatives: int | None = None) -> list[dict]:
    """Plain data for the views: per group, the prompt, the reference solution and each response as
    ``[(token_text, selected), ...]``."""
    if selected.shape != rollout.mask.shape or selected.dtype != torch.bool:
        raise ValueError(f"selected must be a bool tensor of shape {tuple(rollout.mask.shape)}")
    tok, G = task.tokenizer, rollout.group_size
    groups = range(rollout.n_groups) if groups is None else groups
    out = []
    for g in groups:
        if not 0 <= int(g) < rollout.n_groups:
            raise ValueError(f"group {g} out of range [0, {rollout.n_groups})")
        prob = rollout.problems[g]
        responses = []
        for i in range(g * G, (g + 1) * G):
            n = int(rollout.mask[i].sum())
            toks = [(tok.token_str(t), bool(s)) for t, s in zip(rollout.completion_ids[i, :n].tolist(),
                                                                   selected[i, :n].tolist())]
            responses.append({"correct": bool(rollout.rewards[i] > 0.5), "tokens": toks})
        negs = [r for r in responses if not r["correct"]]
        out.append({"prompt": task.prompt_text(prob), "solution": task.solution_text(prob),
                    "correct": [r for r in responses if r["correct"]],
                    "incorrect": negs[:max_negatives] if max_negatives else negs})
    return out


_CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:70em}
.q{margin:1.5em 0;padding:1em;border:1px solid #ddd;border-radius:6px}
.r{font-family:ui-monospace,monospace;font-size:1.05em;margin:.25em 0;white-space:pre}
.ok{color:#2a7a2a}.sel{background:#ffb347;font-weight:bold;border-radius:2px}
.lab{display:inline-block;width:6.5em;color:#666;font-family:system-ui,sans-serif;font-size:.85em}"""


def render_html(task: AdditionTask, rollout: Rollout, selected: torch.Tensor, path, *, groups=None,
                title: str = "NTHR: selected tokens in incorrect responses", note: str = "") -> Path:
    """Write an HTML page: per question, correct responses (green) and incorrect ones with the
    selected tokens highlighted (orange)."""
    data = highlight_groups(task, rollout, selected, groups)
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title)}</h1>",
             "<p>Highlighted: the negative tokens NTHR selects (their penalty is down-weighted because "
             "pushing them down would also lower the likelihood of the correct responses).</p>"]
    if note:
        parts.append(f"<p>{html.escape(note)}</p>")
    for k, q in enumerate(data):
        parts.append(f"<div class='q'><b>Question {k}:</b> <code>{html.escape(q['prompt'])}</code> "
                     f"&nbsp; reference <code>{html.escape(q['solution'])}</code>")
        for r in q["correct"][:1]:
            text = "".join(html.escape(t) for t, _ in r["tokens"])
            parts.append(f"<div class='r ok'><span class='lab'>correct</span>{text}</div>")
        for r in q["incorrect"]:
            text = "".join(f"<span class='sel'>{html.escape(t)}</span>" if s else html.escape(t)
                           for t, s in r["tokens"])
            parts.append(f"<div class='r'><span class='lab'>incorrect</span>{text}</div>")
        parts.append("</div>")
    return write_text_atomic(path, "\n".join(parts) + "\n")


def use_colour(stream=None) -> bool:
    """ANSI colours only on a terminal, and never when ``NO_COLOR`` is set (https://no-color.org)."""
    stream = sys.stdout if stream is None else stream
    return "NO_COLOR" not in os.environ and bool(getattr(stream, "isatty", lambda: False)())


ANSI_SELECTED, ANSI_CORRECT, ANSI_OFF = "\x1b[1;30;48;5;215m", "\x1b[32m", "\x1b[0m"


def render_ansi(task: AdditionTask, rollout: Rollout, selected: torch.Tensor, *, groups=None,
                max_negatives: int | None = 3, colour: bool = True) -> str:
    """The same view for a terminal: selected tokens on an orange background, correct responses green;
    ``colour=False`` (a log file, ``NO_COLOR``): no escape codes, selected tokens in brackets."""
    if not isinstance(colour, bool):
        raise TypeError(f"colour must be a bool, got {type(colour).__name__}")
    sel_on, ok_on, off = (ANSI_SELECTED, ANSI_CORRECT, ANSI_OFF) if colour else ("[", "", "]")
    ok_off = off if colour else ""
    lines = []
    for k, q in enumerate(highlight_groups(task, rollout, selected, groups, max_negatives)):
        lines.append(f"question {k}: {q['prompt']}   reference {q['solution']}")
        for r in q["correct"][:1]:
            lines.append(f"  correct    {ok_on}{''.join(t for t, _ in r['tokens'])}{ok_off}")
        for r in q["incorrect"]:
            lines.append("  incorrect  " + "".join(f"{sel_on}{t}{off}" if s else t for t, s in r["tokens"]))
    return "\n".join(lines)
