"""Short training runs: GRPO vs GRPO + NTHR from the same weights, several seeds each, on the addition task.

    python examples/train_grpo_vs_nthr.py --steps 40 --seeds 0 1 2 --out train_results
    python examples/train_grpo_vs_nthr.py --out benchmarks/results   # the committed run (the README's numbers)

Every run starts from the embedded tiny model; for one seed both methods see the same problems at each
step (the responses differ once the policies do) and are evaluated on the same 128 held-out problems
(4 samples each, temperature 1), none of which the model trained on (neither in its pretraining nor in the
run). Prints, per method, the held-out accuracy at the start and the end
(mean and range over the seeds) and the paired end-of-run difference per seed; plots the mean curve over
the seeds with a band from the lowest to the highest seed. A few seeds of a 40-step run can show a large,
consistent difference between the methods; they are too few to resolve small differences, or to show that
there is none, and the output says so.
Writes ``train-grpo-vs-nthr.json`` (the histories, the settings, the machine) and ``train-grpo-vs-nthr.png``
to ``--out``; ``python -m nthr_kernels.grpo.report --readme`` turns the committed JSON into the README's
paragraph.
"""

import argparse
import copy
import json
from pathlib import Path

from nthr_kernels.demo_synthetic import machine_description
from nthr_kernels.grpo import load_default_model, train
from nthr_kernels.grpo.files import write_text_atomic
from nthr_kernels.grpo.plots import plot_training
from nthr_kernels.grpo.report import TRAIN_NAME, training_text

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--prompts", type=int, default=16, help="prompts per step (8 responses each)")
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--eval-every", type=int, default=5)
parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
parser.add_argument("--out", default="train_results")
args = parser.parse_args()
if len(args.seeds) < 3:
    parser.error("--seeds: give at least 3 seeds (one run shows nothing about the spread)")
if len(set(args.seeds)) != len(args.seeds):
    parser.error("--seeds: each seed once")

base, task = load_default_model()
histories = []
for seed in args.seeds:
    for method in ("grpo", "nthr"):
        h = train(copy.deepcopy(base), task, method=method, steps=args.steps, prompts_per_step=args.prompts,
                  lr=args.lr, eval_every=args.eval_every, seed=seed)
        h["seed"] = seed
        histories.append(h)
        print(f"seed {seed} {method:>5}: held-out accuracy {h['eval_acc'][0]:.3f} -> {h['final_acc']:.3f} "
              f"({h['seconds'][-1]:.0f} s)")

print(f"\n{len(args.seeds)} seeds, {args.steps} steps: " + training_text(histories))
out = Path(args.out)
plot_training(histories, out / f"{TRAIN_NAME}.png")
settings = {"steps": args.steps, "prompts": args.prompts, "lr": args.lr, "eval_every": args.eval_every,
            "seeds": args.seeds}
write_text_atomic(out / f"{TRAIN_NAME}.json", json.dumps({"settings": settings, "machine": machine_description(),
                                                          "histories": histories}, indent=1) + "\n")
print(f"wrote {out / f'{TRAIN_NAME}.png'} and {out / f'{TRAIN_NAME}.json'}")
