"""Token highlighting (the paper's figure 3): which tokens of the incorrect responses NTHR selects.

    python examples/highlight_tokens.py --questions 6 --out highlight.html

Samples 8 responses per question from the embedded tiny model, keeps questions with both correct and
incorrect responses, and marks the negative tokens whose penalty NTHR down-weights (their gradient
would also push down the correct responses). Prints them (in colour on a terminal unless NO_COLOR is
set, in brackets otherwise) and writes an HTML page.
"""

import argparse

from nthr_kernels.grpo import load_default_model
from nthr_kernels.grpo.highlight import render_ansi, render_html, use_colour
from nthr_kernels.grpo.lld import collect_mixed_groups
from nthr_kernels.grpo.loop import nthr_result

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--questions", type=int, default=6)
parser.add_argument("--beta", type=float, default=1.0)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="highlight.html")
args = parser.parse_args()

model, task = load_default_model()
rollout, _ = collect_mixed_groups(model, task, args.questions, seed=args.seed)
selected = nthr_result(model, rollout, beta=args.beta).selected
neg = rollout.mask & (rollout.rewards <= 0.5).unsqueeze(1)
print(render_ansi(task, rollout, selected, colour=use_colour()))
print(f"\nselected {int(selected.sum())} of {int(neg.sum())} negative tokens (beta={args.beta})")
print(f"wrote {render_html(task, rollout, selected, args.out)}")
