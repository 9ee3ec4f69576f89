"""The paper's Lazy Likelihood Displacement study on the embedded tiny model (sections 3 and 5.3).

    python examples/lld_study.py --seeds 0 1 2 3 4 --questions 52 --out lld_results

For each question with a mixed group and each method (GRPO, Pos Only, GRPO + Random, GRPO + NTHR with
eta = 0), copy the parameters, take one update on that group alone and record Delta(x), the mean
change of the correct responses' sequence log-likelihood. The questions of all seeds are pooled: bootstrap
intervals per method, each method paired with GRPO question by question, a verdict in plain words. Also:
GWHES vs Delta top-K overlap, and a beta ablation. The model's weights ship with the package.
"""

import argparse
import json
from pathlib import Path

from nthr_kernels.grpo import load_default_model
from nthr_kernels.grpo.demo import format_table, json_safe, verdict
from nthr_kernels.grpo.files import write_text_atomic
from nthr_kernels.grpo.lld import run_lld_study
from nthr_kernels.grpo.plots import plot_lld

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
parser.add_argument("--questions", type=int, default=52, help="mixed-group questions per seed")
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
parser.add_argument("--backend", default="auto")
parser.add_argument("--out", default="lld_results")
args = parser.parse_args()

model, task = load_default_model()
report, _ = run_lld_study(model, task, seeds=args.seeds, questions_per_seed=args.questions, lr=args.lr,
                          optimizer=args.optimizer, backend=args.backend)
print(format_table(report))
out = Path(args.out)
plot_lld(report, out / "lld_deltas.png")
write_text_atomic(out / "lld_report.json", json.dumps(json_safe(report), indent=1) + "\n")
print(f"wrote {out / 'lld_deltas.png'} and {out / 'lld_report.json'}")
print(verdict(report))
