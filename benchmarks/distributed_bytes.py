"""Bytes per rank of the distributed path (groups split over ranks) at the qwen1.5b-step shape, from the
formula :func:`nthr_kernels.ops.advantages.distributed.payload_bytes` (which tests/test_distributed.py
checks against the bytes the collectives actually send), and the README's figures from them.

    python -m benchmarks.distributed_bytes            # evaluate, write benchmarks/results/distributed-bytes.json
    python -m benchmarks.distributed_bytes --readme   # the same, then write the README's block from the file
    python -m benchmarks.distributed_bytes --check    # write nothing; exit 1 if the README differs from the
                                                      #   file or the file from a fresh evaluation

Nothing is timed: the bytes follow from the token ids, rewards and placement. The ids and rewards are
those of ``SHAPES["qwen1.5b-step"].batch()`` (:func:`nthr_kernels.synthetic.sample_tokens` draws them
without the hidden states and ``old_logprobs``, whose exact log-probabilities would take many CPU minutes);
``d`` is the shape's. Two ranks, three placements of the 512 responses (:data:`PLACEMENTS`). The block
sits between HTML-comment markers; ``tests/test_distributed_bytes_readme.py`` checks it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from benchmarks.integrations_report import _rel, _wrap
from benchmarks.shapes import SHAPES
from nthr_kernels.ops.advantages.distributed import STAGES, payload_bytes
from nthr_kernels.synthetic import sample_tokens

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "distributed-bytes.json"
README = ROOT / "README.md"
SHAPE = "qwen1.5b-step"
WORLD = 2
BLOCK = "distributed-bytes"
_WHO = "written by python -m benchmarks.distributed_bytes --readme; tests/test_distributed_bytes_readme.py checks it"
# Seed of the random placement: the one that gives the figures quoted before this command existed.
RANDOM_SEED = 1


def _random(n_resp: int, group_size: int) -> torch.Tensor:
    return torch.randint(0, WORLD, (n_resp,), generator=torch.Generator().manual_seed(RANDOM_SEED))


def _cut_inside_group(n_resp: int, group_size: int) -> torch.Tensor:
    # rank 0 holds the first n_resp / 2 - G / 2 responses: the cut falls in the middle of one group
    return (torch.arange(n_resp) >= n_resp // 2 - group_size // 2).to(torch.int64)


def _whole_groups(n_resp: int, group_size: int) -> torch.Tensor:
    n_groups = n_resp // group_size
    return (torch.arange(n_resp) // group_size >= n_groups // 2).to(torch.int64)


# name -> (rule, description): owner rank of each response
PLACEMENTS = {
    "random": (_random, f"each response on a rank drawn at random (torch.randint, seed {RANDOM_SEED})"),
    "cut-inside-group": (
        _cut_inside_group,
        "contiguous halves cut inside one group: rank 0 holds responses [0, R/2 - G/2), rank 1 the rest "
        "(TRL's layout when the per-process batch is not a multiple of the group size G)",
    ),
    "whole-groups": (_whole_groups, "contiguous halves at a group boundary: whole groups per rank"),
}


def evaluate() -> dict:
    """The results file's content (plain JSON types)."""
    s = SHAPES[SHAPE]
    lens, rewards, ids = sample_tokens(s.n_groups, s.group_size, s.lengths, s.vocab, seed=s.seed)
    cu = torch.zeros(lens.numel() + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0)
    n_resp = lens.numel()
    gid = torch.arange(n_resp) // s.group_size
    out = {
        "formula": "nthr_kernels.ops.advantages.distributed.payload_bytes",
        "command": "python -m benchmarks.distributed_bytes",
        "torch": torch.__version__.split("+")[0],
        "shape": {
            "name": s.name, "n_groups": s.n_groups, "group_size": s.group_size, "lengths": list(s.lengths),
            "vocab": s.vocab, "d": s.d, "seed": s.seed, "ids": "Zipf (nthr_kernels.synthetic.sample_tokens)",
            "n_tokens": int(lens.sum()),
        },
        "world_size": WORLD,
        "placements": {},
    }
    for name, (rule, text) in PLACEMENTS.items():
        owner = rule(n_resp, s.group_size)
        p = payload_bytes(ids, gid, rewards, owner, s.d, s.vocab, cu_seqlens=cu)
        out["shape"]["n_active"] = p.n_active
        out["placements"][name] = {
            "description": text,
            "responses_per_rank": torch.bincount(owner, minlength=WORLD).tolist(),
            "shared_active_groups": p.n_shared,
            "vstar_shared": p.vstar_shared,
            "k_shared": p.k_shared,
            "key_bytes": p.key_bytes,
            "max_local_groups": p.max_local_groups,
            "bytes_by_stage": {k: p.stages[k] for k in STAGES},
            "bytes_per_rank": p.total,
        }
    return out


def load(path: Path = RESULTS) -> dict:
    return json.loads(Path(path).read_text())


def markers() -> tuple[str, str]:
    return f"<!-- {BLOCK}: begin ({_WHO}) -->", f"<!-- {BLOCK}: end -->"


def _mb(b: int) -> str:
    return f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e3:.1f} kB"


_ROW_TEXT = {
    "random": "responses at random",
    "cut-inside-group": "contiguous halves, cut inside one group ({cut})",
    "whole-groups": "whole groups per rank",
}


def block(path: Path = RESULTS) -> str:
    data = load(path)
    s, rel = data["shape"], _rel(path)
    lo, hi = s["lengths"]
    lines = [
        f"Bytes each rank sends per step at {s['name']} ({s['n_groups']} groups x {s['group_size']} responses, "
        f"lengths {lo}..{hi}, Zipf ids over |V| = {s['vocab']}, {s['n_active']} active groups, d = {s['d']}), "
        f"{data['world_size']} ranks: computed by `payload_bytes` in `nthr_kernels/ops/advantages/distributed.py` "
        f"(the formula; `tests/test_distributed.py` checks it against what the collectives send), not measured; "
        f"results file [`{rel}`]({rel}), written by `python -m benchmarks.distributed_bytes`. The `M` rows of the "
        f"groups that straddle ranks dominate; the rest is bookkeeping:",
        "",
        "| placement | shared active groups | `M` rows | the rest | per rank |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, x in data["placements"].items():
        n0 = x["responses_per_rank"][0]
        text = _ROW_TEXT[name].format(cut=f"rank 0: responses 0..{n0 - 1}; TRL's layout when the per-process "
                                            f"batch is not a multiple of G")
        m = x["bytes_by_stage"]["M"]
        lines.append(f"| {text} | {x['shared_active_groups']} of {s['n_active']} | {m:,} | "
                     f"{x['bytes_per_rank'] - m:,} | {x['bytes_per_rank']:,} ({_mb(x['bytes_per_rank'])}) |")
    return "\n".join(line if line.startswith("|") or not line else _wrap(line) for line in lines)


def block_text(readme: str) -> str:
    begin, end = markers()
    if begin not in readme or end not in readme:
        raise ValueError(f"README.md: no {BLOCK} markers")
    return readme.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def render_readme(readme: str, path: Path = RESULTS) -> str:
    begin, end = markers()
    head, rest = readme.split(begin, 1)
    _, tail = rest.split(end, 1)
    return f"{head}{begin}\n{block(path)}\n{end}{tail}"


def differences(readme: str, path: Path = RESULTS) -> list[str]:
    """What disagrees: ``"README"`` (its block differs from what ``path`` renders), ``"results"`` (``path``'s
    figures differ from a fresh evaluation of the formula)."""
    out = []
    if block_text(readme) != block(path):
        out.append("README")
    fresh, saved = evaluate(), load(path)
    if {k: v for k, v in fresh.items() if k != "torch"} != {k: v for k, v in saved.items() if k != "torch"}:
        out.append("results")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--readme", action="store_true", help="also write the README's block from the results file")
    ap.add_argument("--check", action="store_true",
                    help="write nothing; exit 1 if the README or the results file is out of date")
    args = ap.parse_args(argv)
    if args.check:
        diff = differences(README.read_text())
        print(f"out of date: {', '.join(diff)} (run python -m benchmarks.distributed_bytes --readme)" if diff
              else f"README.md and {_rel(RESULTS)} agree with the formula")
        return 1 if diff else 0
    data = evaluate()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(RESULTS)
    for name, x in data["placements"].items():
        print(f"{name}: {x['bytes_per_rank']:,} bytes per rank ({x['shared_active_groups']} shared active groups)")
    print(f"wrote {_rel(RESULTS)}")
    if args.readme:
        README.write_text(render_readme(README.read_text()))
        print(f"README.md: {BLOCK} written from {_rel(RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
