"""Where the Triton path's time goes: each stage of one chunk against its FLOP floor, and the host side.

    python benchmarks/gpu_stages.py --out $OUT          # on the GPU (benchmarks/gpu_check.sh runs it)
    python benchmarks/gpu_stages.py --smoke --out DIR   # CPU self-test: Triton interpreter, tiny shapes

On the ``qwen1.5b-step`` batch (``benchmarks/shapes.py``) it plans the call as the Triton implementation
does and times, on the first chunk of factored groups (``triton.testing.do_bench`` medians):

- the error kernel (the positive tokens' errors on ``V*``), floor ``2 |V*| d T+`` per group;
- the anchor pass (M kernel per positive response, then ``_anchor_kernel``) and the plain ``M`` GEMM
  alone, floor ``2 |V*| d T+``;
- the negative tokens' scores (``z`` and ``q`` per token), floor ``2 * 2 |V*| d T-``;

each floor at the matmul rate of the shape's dtype (bf16), measured in the same run (``gpu_suite.floor_rate``); then candidate tiles of the anchor, M and
score kernels (``ANCHOR_SWEEP``, ``M_SWEEP``, ``SCORE_SWEEP``) on the same chunk, and of validation's two
kernels (``NORM_SWEEP``, ``IMPLIED_SWEEP``) on the whole batch's ``value_checks``. Then the whole public
call, the implementation alone and validation alone, on that batch and on ``mid-fp16-others``; and cProfile of
the host side (validation of the big batch, the whole mid call), so that the host's share is visible.
Writes ``stages.json``, ``stages.md`` and ``stages-profile.txt`` to ``--out``.
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))


# Tiles tried for two kernels beside the tables' own (``nthr_kernels/ops/triton_kernels.py``), timed on the
# chunk: (blocks in the table's order, num_warps, num_stages). The anchor kernel has one fixed tile and is
# bandwidth-bound (float32 N_i read twice); the score kernel is the largest in the profile.
ANCHOR_SWEEP = [(32, 128, 4, 2), (32, 128, 4, 3), (32, 128, 8, 3), (64, 128, 4, 2), (64, 128, 4, 3), (64, 128, 8, 2),
                (64, 256, 8, 2), (128, 128, 8, 2), (32, 256, 4, 2), (32, 256, 8, 3)]
M_SWEEP = [(128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 128, 32, 4, 4), (64, 256, 64, 8, 3), (256, 128, 32, 8, 3),
           (128, 128, 64, 4, 4), (128, 256, 32, 8, 4), (256, 256, 32, 8, 3)]
SCORE_SWEEP = [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4),
               (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 128, 64, 8, 4)]


NORM_SWEEP = [(32, 128, 4, 2), (64, 128, 4, 2), (64, 256, 8, 2), (128, 128, 8, 2), (32, 256, 4, 3), (128, 256, 8, 2)]
IMPLIED_SWEEP = [(16, 64, 64, 4, 3), (16, 128, 64, 4, 3), (32, 64, 64, 4, 3), (16, 64, 128, 4, 2), (32, 128, 64, 8, 3),
                 (64, 64, 64, 4, 3)]


class forced:
    """Within the block, launches of kernel ``name`` use the given blocks, warps and stages instead of the
    table (``launch`` replaced in ``nthr_kernels.ops.triton_kernels`` and in every module of the package
    that imported it; other kernels unchanged)."""

    def __init__(self, tk, name, blocks, warps, stages):
        self.tk, self.name, self.blocks, self.opts = tk, name, blocks, dict(num_warps=warps, num_stages=stages)

    def __enter__(self):
        tk, name, blocks, opts = self.tk, self.name, self.blocks, self.opts
        self.orig = tk.launch
        self.users = [m for n, m in list(sys.modules.items())
                      if n.startswith("nthr_kernels") and getattr(m, "launch", None) is self.orig]

        def launch(kernel, grid, dtype, *args, **flags):
            if kernel != name:
                return self.orig(kernel, grid, dtype, *args, **flags)
            extra = {} if tk.interpreting() else opts
            tk._KERNELS[kernel][grid(blocks)](*args, **flags, **blocks, **extra)

        for m in self.users:
            m.launch = launch
        return self

    def __exit__(self, *exc):
        for m in self.users:
            m.launch = self.orig


def validated(rb, kw):
    """The validation the public Triton call runs (its ``value_checks`` kernels), on the batch ``rb``."""
    from gpu_suite import validated_batch
    from nthr_kernels.ops.advantages import triton_impl

    return validated_batch(rb, kw, value_checks=triton_impl.value_checks)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--smoke", action="store_true", help="CPU self-test: Triton interpreter, tiny shapes")
    args = ap.parse_args(argv)
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
    elif not torch.cuda.is_available():
        print("gpu_stages: no CUDA device (use --smoke for the CPU self-test)", file=sys.stderr)
        return 2
    import gpu_suite
    import nthr_kernels as nk
    from nthr_kernels.core.checks import logprob_sample
    from nthr_kernels.core.rules import SCRATCH_BYTES
    from nthr_kernels.ops import triton_kernels as tk
    from nthr_kernels.ops.advantages import triton_impl as ti
    from shapes import SHAPES, Shape

    cuda = not args.smoke
    validated_batch = validated

    dev = torch.device("cuda" if cuda else "cpu")
    gpu_suite.DEVICE = dev.type
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    res: dict = {"device": torch.cuda.get_device_name() if cuda else "cpu-interpreter-smoke", "stages": {}, "calls": {}}

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def bench(fn, rep=200) -> float:
        return gpu_suite.bench(fn, rep) if cuda else gpu_suite.bench_events(fn, 1)

    # ---- the first chunk of the big batch, stage by stage ----------------------------------------------
    shape = SHAPES["qwen1.5b-step"] if cuda else Shape("smoke", 3, 4, (8, 40), 32, 300, dtype=torch.bfloat16, seed=5)
    rb = shape.batch(device=dev)
    kw = rb.kwargs(with_logprobs=True)
    batch = validated_batch(rb, kw)
    res["shape"] = shape.describe()
    h, w = batch.hidden, batch.lm_head_weight
    wd = tk.work_dtype(h, w)
    res["floor_rate"] = gpu_suite.floor_rate(wd)  # the stages' floors at the rate of the shape's own dtype
    rate = res["matmul_tflops"] = res["floor_rate"]["tflops"]
    print(f"[stages] matmul {gpu_suite.rate_label(res['floor_rate'])}", flush=True)
    plan = ti.plan_on_device(batch)
    order = plan.order
    k = ti.plan_kernels(batch, plan, h, w, wd)  # as the call builds them (the shape's dtype is wd: no cast)
    paths = ti.choose_paths([g.nv for g in plan.groups], [g.npos for g in plan.groups], [g.n for g in plan.groups], k.d,
                            batch.opts.score_positive, batch.opts.anchor == "others")
    elem, m_elem = (torch.empty(0, dtype=t).element_size() for t in (wd, tk.m_dtype(wd)))
    chunk = next(c for c in ti._plan_chunks(plan, paths, k.d, elem, m_elem, SCRATCH_BYTES) if c.kind == "factored")
    staging = ti._Staging()
    parts = staging.segments(chunk.pos), staging.segments(chunk.neg), staging.segments(chunk.resp)
    dev_parts = staging.upload(dev)
    pos, neg, resp = (tk.Segments(dev_parts[i].view(-1, int(tk.SEG_WIDTH)), rows)
                      for i, rows in zip(parts, (chunk.pos, chunk.neg, chunk.resp)))
    d = k.d
    floors = {
        "errors": sum(2 * r.nv * d * r.npos for r in chunk.pos),
        "anchor pass (N_i, then M and the sums)": sum(2 * r.nv * d * r.npos for r in chunk.pos),
        "M alone": sum(2 * r.nv * d * r.npos for r in chunk.pos),
        "negative scores": sum(4 * r.nv * d * r.nsc for r in chunk.neg),
    }
    gp = k.errors(pos)
    m, _ = k.build_m(pos, gp, resp=resp)
    scores = torch.zeros(order.numel(), dtype=torch.float32, device=dev)
    sync()
    runs = {
        "errors": lambda: k.errors(pos, gp),
        "anchor pass (N_i, then M and the sums)": lambda: k.build_m(pos, gp, resp=resp),
        "M alone": lambda: k.build_m(pos, gp),
        "negative scores": lambda: k.scores(neg, m, scores),
    }
    res["chunk"] = {"groups": len(chunk.pos), "positive_responses": len(chunk.resp), "V*": [r.nv for r in chunk.pos],
                    "positive_tokens": [r.npos for r in chunk.pos], "negative_tokens": [r.nsc for r in chunk.neg]}
    for name, fn in runs.items():
        ms = bench(fn)
        floor_ms = floors[name] / (rate * 1e12) * 1e3
        res["stages"][name] = {"ms": ms, "floor_ms": floor_ms, "x_floor": ms / floor_ms}
        print(f"[stages] {name}: {ms:.3f} ms, {ms / floor_ms:.2f}x its floor", flush=True)
    # ---- other tiles for the anchor and score kernels (the tables' candidates for the next change) -----
    idx = logprob_sample(batch.tok_ids.numel(), dev)
    runs["value checks (norm and implied kernels)"] = lambda: ti.value_checks(batch, False, idx)
    res["sweeps"], res["swept"] = {}, {}
    for name, stage, configs in (("anchor", "anchor pass (N_i, then M and the sums)", ANCHOR_SWEEP),
                                 ("m", "M alone", M_SWEEP), ("score", "negative scores", SCORE_SWEEP),
                                 ("norm", "value checks (norm and implied kernels)", NORM_SWEEP),
                                 ("implied", "value checks (norm and implied kernels)", IMPLIED_SWEEP)):
        keys = (tk._TUNE_16 if wd != torch.float32 else tk._TUNE_32)[name][0]
        res["swept"][name] = stage
        for cfg in (configs if cuda else [tuple(16 for _ in keys) + (4, 1)]):
            label = ", ".join(f"{k}={v}" for k, v in zip(keys, cfg)) + f", warps={cfg[-2]}, stages={cfg[-1]}"
            if name in ("anchor", "norm") and any(b < tk.block_range(name, wd, k)[0] for k, b in zip(keys, cfg)):
                res["sweeps"].setdefault(name, {})[label] = "skipped: smaller than the table's tile (outputs sized for it)"
                continue  # the partial-sum slots / per-block outputs are sized for the table's tile
            try:
                with forced(tk, name, dict(zip(keys, cfg[:-2])), cfg[-2], cfg[-1]):
                    ms = bench(runs[stage])
            except Exception as e:  # a config that does not fit (shared memory, registers) is reported
                res["sweeps"].setdefault(name, {})[label] = f"{type(e).__name__}: {str(e)[:120]}"
                continue
            res["sweeps"].setdefault(name, {})[label] = ms
            print(f"[stages] {name} with {label}: {ms:.3f} ms", flush=True)
    del gp, m, scores

    # ---- whole calls: public, implementation alone, validation alone -----------------------------------
    mid = Shape("mid-fp16", 16, 8, (32, 700), 1024, 32000, dtype=torch.float16, seed=3) if cuda else \
        Shape("smoke-fp16", 2, 4, (0, 20), 16, 200, dtype=torch.float16, seed=6)
    rb2 = mid.batch(device=dev)
    kw2 = dict(rb2.kwargs(with_logprobs=True), anchor="others")
    b2 = validated_batch(rb2, kw2)
    for label, r, kwargs, vb in (("qwen1.5b-step", rb, kw, batch), ("mid-fp16-others", rb2, kw2, b2)):
        call = lambda: nk.nthr_advantages(r.hidden, r.token_ids, r.rewards, r.advantages, backend="triton", **kwargs)  # noqa: E731
        call()
        row = {"public call": bench(call), "implementation": bench(lambda: ti.nthr_advantages(vb)),
               "validation": bench(lambda: validated_batch(r, kwargs))}
        res["calls"][label] = row
        print(f"[stages] {label}: " + ", ".join(f"{k} {v:.2f} ms" for k, v in row.items()), flush=True)

    # ---- the host side -------------------------------------------------------------------------------
    text = []
    for label, fn in (("validation of qwen1.5b-step", lambda: validated_batch(rb, kw)),
                      ("public call, mid-fp16-others", lambda: nk.nthr_advantages(rb2.hidden, rb2.token_ids, rb2.rewards,
                                                                                  rb2.advantages, backend="triton", **kw2))):
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            fn()
        sync()
        prof.disable()
        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(40)
        text.append(f"# {label}: cProfile of 5 calls, by cumulative time\n{buf.getvalue()}")
    (out_dir / "stages-profile.txt").write_text("\n".join(text))
    (out_dir / "stages.json").write_text(json.dumps(res, indent=2))
    md = [f"# Triton stages on {res['device']}", "", f"{res['shape']}; matmul {gpu_suite.rate_label(res['floor_rate'])} (same run); first factored "
          f"chunk: {res['chunk']['groups']} groups, {res['chunk']['positive_responses']} positive responses", "",
          "| stage | ms | floor ms | x floor |", "|---|---|---|---|"]
    md += [f"| {k} | {v['ms']:.3f} | {v['floor_ms']:.3f} | {v['x_floor']:.2f} |" for k, v in res["stages"].items()]
    for name, rows in res["sweeps"].items():
        md += ["", f"| {name} kernel tiles | ms ({res['swept'][name]}) |", "|---|---|"]
        md += [f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in rows.items()]
    md += ["", "| batch | public call ms | implementation ms | validation ms |", "|---|---|---|---|"]
    md += [f"| {k} | {v['public call']:.2f} | {v['implementation']:.2f} | {v['validation']:.2f} |" for k, v in res["calls"].items()]
    (out_dir / "stages.md").write_text("\n".join(md) + "\n")
    print("\n".join(md), flush=True)
    return 0


if __name__ == "__main__":
    t0 = time.time()
    rc = main()
    print(f"[stages] done in {time.time() - t0:.0f}s")
    sys.exit(rc)
