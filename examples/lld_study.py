"""The paper's Lazy Likelihood Displacement study on the embedded tiny model (sections 3 and 5.3).

    python examples/lld_study.py --questions 64 --out lld_results

For each question with a mixed group and each method (GRPO, Pos Only, GRPO + Random, GRPO + NTHR with
eta = 0), copy the parameters, take one update on that group alone and record Delta(x), the mean
change of the correct responses' sequence log-likelihood. Also: GWHES vs Delta top-K overlap, and a
beta ablation. The first run pretrains and caches the model (a few minutes on 2 CPU cores).
"""

import argparse
import json
from pathlib import Path

from nthr_kernels.grpo import load_default_model
from nthr_kernels.grpo.demo import format_table, json_safe
from nthr_kernels.grpo.lld import run_lld_study
from nthr_kernels.grpo.plots import plot_lld

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--questions", type=int, default=64)
parser.add_argument("--lr", type=float, default=1e-4)
parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw")
parser.add_argument("--backend", default="auto")
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="lld_results")
args = parser.parse_args()

model, task = load_default_model()
report, _ = run_lld_study(model, task, n_questions=args.questions, lr=args.lr, optimizer=args.optimizer,
                          backend=args.backend, seed=args.seed)
print(format_table(report))
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
plot_lld(report, out / "lld_deltas.png")
(out / "lld_report.json").write_text(json.dumps(json_safe(report), indent=1) + "\n")
print(f"wrote {out / 'lld_deltas.png'} and {out / 'lld_report.json'}")
