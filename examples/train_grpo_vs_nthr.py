"""A short training run: GRPO vs GRPO + NTHR from the same weights and seed on the addition task.

    python examples/train_grpo_vs_nthr.py --steps 40 --out train_results

Both runs start from the embedded tiny model, see the same problems at each step (the responses
differ once the policies do), and are evaluated on the same 128 held-out problems (4 samples each,
temperature 1). Writes the accuracy curves to PNG and the histories to JSON.
"""

import argparse
import copy
import json
from pathlib import Path

from nthr_kernels.grpo import load_default_model, train
from nthr_kernels.grpo.plots import plot_training

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--steps", type=int, default=40)
parser.add_argument("--prompts", type=int, default=16, help="prompts per step (8 responses each)")
parser.add_argument("--lr", type=float, default=2e-4)
parser.add_argument("--eval-every", type=int, default=5)
parser.add_argument("--seed", type=int, default=0)
parser.add_argument("--out", default="train_results")
args = parser.parse_args()

base, task = load_default_model()
histories = []
for method in ("grpo", "nthr"):
    h = train(copy.deepcopy(base), task, method=method, steps=args.steps, prompts_per_step=args.prompts,
              lr=args.lr, eval_every=args.eval_every, seed=args.seed)
    histories.append(h)
    print(f"{method:>5}: held-out accuracy {h['eval_acc'][0]:.3f} -> {h['final_acc']:.3f} "
          f"(mean rollout reward {h['mean_train_reward']:.3f}, {h['seconds'][-1]:.0f} s)")
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)
plot_training(histories, out / "accuracy.png")
(out / "histories.json").write_text(json.dumps(histories, indent=1) + "\n")
print(f"wrote {out / 'accuracy.png'} and {out / 'histories.json'}")
