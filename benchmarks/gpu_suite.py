"""The GPU suite: correctness at realistic shapes, then triton vs torch vs the naive pipeline.

    python benchmarks/gpu_suite.py                 # every config, writes benchmarks/results/<card>-<date>.json
    python benchmarks/gpu_suite.py --out $OUT      # results elsewhere (the device tool's folder)

One process, one GPU. For each config it

1. checks ``backend="triton"`` against the float64 reference (``backend="reference"`` computed on the
   GPU in float64): scores relative to each group's largest score, selection agreement on negative
   tokens, and whether every disagreement lies within the stated margin of tau;
2. times ``triton``, ``torch`` and the naive per-group pipeline (``benchmarks/naive.py``) on the same
   inputs (``triton.testing.do_bench`` medians after warm-up; CUDA events for the slow naive runs);
3. puts each time beside the FLOP floor ``sum_g 2 |V*| d (2 T + T+)`` (plus ``2 N |V| d`` without old
   log-probs; ``sum_g 2 |V*| d (T + T+)`` with logits given: :func:`floor_of`) over the matmul rate of the
   config's own dtype, measured in the same run (:func:`floor_rate`: bf16 and fp16 on the tensor cores,
   float32 at the precision the kernels multiply float32 tiles with, IEEE; recorded as ``floor_rate``), and beside
   the forward+backward time of a Qwen2.5-1.5B-shaped model (random weights) on the batch's tokens,
   measured per token in the same run (the ``6 * 1.5e9 * N`` FLOPs estimate is recorded too);
4. counts the host synchronisations of one call (``host_syncs``: the Triton implementation on a
   validated batch; ``host_syncs_public_call``: validation included) and profiles one call; where the
   torch backend is timed, its host synchronisations and profile too (``torch_host_syncs``,
   ``torch_kernel_breakdown_ms``).

The results record ``kernel_sources`` (sha256 of the Triton path's files), so anyone can tell which
code was measured. ``--compile-only ARCH`` compiles every kernel variant for ``sm_ARCH`` without a GPU.
It prints a short table last and writes JSON and a markdown table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import nthr_kernels as nk  # noqa: E402
from naive import naive_nthr  # noqa: E402
from provenance import file_hashes  # noqa: E402
from shapes import SHAPES, Shape, batch_work  # noqa: E402

# Margin of tau within which a selection may differ from the float64 reference, relative to the
# group's largest |score|: the one tolerance table (nthr_kernels/core/rules.py).
from nthr_kernels.core.rules import SCORE_TOLERANCE as MARGIN  # noqa: E402
from nthr_kernels.core.rules import SCRATCH_BYTES, TOKEN_BYTES  # noqa: E402

CONFIGS = {
    # name: (shape, with old_logprobs, extra nthr_advantages kwargs, time torch/naive too)
    "qwen1.5b-step": (SHAPES["qwen1.5b-step"], True, {}, True),
    "qwen1.5b-step-no-logprobs": (SHAPES["qwen1.5b-step"], False, {}, False),
    "mid-fp16-others": (Shape("mid-fp16", 16, 8, (32, 700), 1024, 32000, dtype=torch.float16, seed=3), True, {"anchor": "others"}, False),
    "mid-fp32-logits": (Shape("mid-fp32", 8, 8, (16, 400), 512, 16000, dtype=torch.float32, seed=4), False, {"use_logits": True, "beta": 0.0}, False),
}


# --smoke runs the whole suite on the CPU (Triton interpreter, tiny shapes) so CI exercises it.
DEVICE = "cuda"
SMOKE_CONFIGS = {
    "smoke-bf16": (Shape("smoke-bf16", 3, 4, (1, 24), 32, 300, dtype=torch.bfloat16, seed=5), True, {}, True),
    "smoke-fp16-others": (Shape("smoke-fp16", 2, 4, (0, 20), 16, 200, dtype=torch.float16, seed=6), False, {"anchor": "others"}, False),
    # float32 and logits, like mid-fp32-logits: its floor takes the float32 (IEEE) matmul rate
    "smoke-fp32-logits": (Shape("smoke-fp32", 3, 4, (1, 16), 16, 150, dtype=torch.float32, seed=7), False, {"use_logits": True, "beta": 0.0}, False),
}


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


# Triton's input_precision of float32 products -> torch's float32 matmul precision for the same products
_TORCH_PRECISION = {"ieee": "highest", "tf32": "high"}


def matmul_tflops(dtype: torch.dtype = torch.bfloat16, precision=None) -> float:
    """TFLOP/s of ``torch.matmul`` on ``n x n`` operands of ``dtype`` (n = 8192 on the GPU, 512 in smoke mode);
    float32 products at ``precision`` (Triton's ``input_precision``: "ieee" is torch's "highest", no TF32)."""
    n = 8192 if DEVICE == "cuda" else 512
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    before = torch.get_float32_matmul_precision()
    if precision is not None:
        torch.set_float32_matmul_precision(_TORCH_PRECISION[precision])
    try:
        ms = bench(lambda: a @ b, 500)
    finally:
        torch.set_float32_matmul_precision(before)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def floor_rate(wd: torch.dtype, rates: dict | None = None) -> dict:
    """The matmul rate a FLOP floor of inputs in the work dtype ``wd`` is divided by: ``torch.matmul`` in that
    dtype, float32 at the precision of the kernels' float32 products (``triton_kernels.product_precision``).
    ``{"dtype", "precision", "tflops"}``, measured once per dtype and kept in ``rates`` (by dtype name)."""
    from nthr_kernels.ops.triton_kernels import product_precision

    key = str(wd).replace("torch.", "")
    rates = {} if rates is None else rates
    if key not in rates:
        precision = product_precision(wd)
        rates[key] = {"dtype": key, "precision": precision, "tflops": matmul_tflops(wd, precision)}
    return rates[key]


# The model NTHR runs beside: Qwen2.5-1.5B's architecture (random weights); --smoke uses a tiny one.
MODEL = dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
             num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True, rope_theta=1e6)
MODEL_SMOKE = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=300, tie_word_embeddings=True)


def model_fwd_bwd_ms_per_token(log) -> dict:
    """Forward+backward of the model (bf16 on the GPU, sdpa attention, loss on every token, no optimizer
    step), measured on micro-batches of ``8 x 1024`` tokens (``2 x 16`` in smoke mode); per token."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    smoke = DEVICE != "cuda"
    cfg = Qwen2Config(**(MODEL_SMOKE if smoke else MODEL), max_position_embeddings=4096)
    dtype = torch.float32 if smoke else torch.bfloat16
    with torch.device(DEVICE):
        model = Qwen2ForCausalLM(cfg).to(dtype)
    n_seq, seq_len = (2, 16) if smoke else (8, 1024)
    ids = torch.randint(0, cfg.vocab_size, (n_seq, seq_len), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(0))

    def step():
        model(input_ids=ids, labels=ids).loss.backward()
        model.zero_grad(set_to_none=True)

    ms = bench_events(step, 3)
    n_params = sum(p.numel() for p in model.parameters())
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    log(f"model fwd+bwd: {ms:.1f} ms per {n_seq} x {seq_len} tokens ({n_params / 1e9:.2f}B parameters)")
    return {"ms_per_token": ms / (n_seq * seq_len), "micro_batch": [n_seq, seq_len], "parameters": n_params,
            "dtype": str(dtype).replace("torch.", "")}


def bench(fn, rep_ms: int) -> float:
    """Median milliseconds: ``triton.testing.do_bench`` (CUDA events, warm-up) on the GPU."""
    if DEVICE != "cuda":
        return bench_events(fn, 3)
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms // 5), rep=rep_ms, return_mode="median"))


def bench_wall(fn, reps: int) -> float:
    """Median wall-clock milliseconds per synchronised call (host work included)."""
    fn()
    _sync()
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync()
        ts.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(ts)


def bench_events(fn, reps: int) -> float:
    """Median milliseconds of ``reps`` runs after one warm-up (CUDA events; wall clock on the CPU)."""
    fn()
    _sync()
    times = []
    for _ in range(reps):
        if DEVICE == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            _sync()
            times.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)  # with an even count the mean of the middle two, not the larger


# --------------------------------------------------------------------------------------------------
# host synchronisations and the measured code
# --------------------------------------------------------------------------------------------------
# The host-sync counter lives in nthr_kernels/testing.py (tests use it too).
from nthr_kernels.testing import count_host_syncs as _count_host_syncs  # noqa: E402


def count_host_syncs(fn) -> tuple:
    """:func:`nthr_kernels.testing.count_host_syncs` on this run's device (CUDA, or the CPU in smoke mode)."""
    return _count_host_syncs(fn, cuda=DEVICE == "cuda")


def kernel_sources(root: Path = ROOT) -> dict:
    """sha256 of every source file of the Triton path: the package files with ``@triton.jit``, the files
    that import them (their host code), and the package modules those import (the rules they apply).
    Recorded with the results, so that anyone can tell which code was measured."""
    import ast

    pkg = root / "nthr_kernels"
    files = sorted(pkg.rglob("*.py"))

    def imports(path: Path) -> set:
        mod = path.relative_to(root).with_suffix("").parts
        if mod[-1] == "__init__":
            mod = mod[:-1]
        out = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = list(mod[:len(mod) - node.level]) if node.level else []
                name = base + (node.module.split(".") if node.module else [])
                out.add(".".join(name))
                out.update(".".join(name + [a.name]) for a in node.names)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
        return out

    def name(path: Path) -> str:
        parts = path.relative_to(root).with_suffix("").parts
        return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)

    by_name = {name(f): f for f in files}
    jit = {f for f in files if "@triton.jit" in f.read_text()}
    host = {f for f in files if any(by_name.get(m) in jit for m in imports(f))}
    deps = {by_name[m] for f in jit | host for m in imports(f) if m in by_name and m != "nthr_kernels"}
    return file_hashes(jit | host | deps, root)


def compile_check(arch: int, quick: bool, all_configs: bool, log) -> dict:
    """Compile every kernel variant the Triton path launches for a CUDA target (``sm_<arch>``), without a
    GPU: the host code runs on CPU tensors with each launch replaced by a compile (first autotune config
    of the dtype's table, or every config), so kernels that only the interpreter has seen are known to
    build before GPU time is spent. Needs ``TRITON_INTERPRET`` unset. Returns ``{variant: seconds}``."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    from nthr_kernels.ops import triton_kernels as tk
    from nthr_kernels.ops.advantages import triton_impl
    from nthr_kernels.ops.score_tokens import triton_impl as st_triton
    from nthr_kernels.synthetic import make_batch

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    done = {}

    def compile_launch(name, wide, args, flags):
        kernel = tk._KERNELS[name]
        names, table = (tk._TUNE_16 if wide else tk._TUNE_32)[name]
        heuristics = kernel.values if isinstance(kernel, triton.runtime.Heuristics) else {}
        jit = kernel.fn if heuristics else kernel
        for c in table if all_configs else table[:1]:
            kw = dict(flags, **dict(zip(names, c[:-2])))
            for flag, rule in heuristics.items():
                kw[flag] = rule({**dict(zip(jit.arg_names, args)), **kw})
            opts = dict(num_warps=c[-2], num_stages=c[-1])
            bound, spec, options = create_function_from_signature(jit.signature, jit.params, backend)(*args, **kw, **opts)
            options, signature, constexprs, attrs = jit._pack_args(backend, {**kw, **opts}, bound, spec, options)
            flags_set = ",".join(f"{jit.arg_names[p[0]]}={v}" for p, v in constexprs.items() if v is not None)
            variant = (f"{name}[{flags_set}; {','.join(str(t) for t in signature.values() if t != 'constexpr')}; "
                       f"warps={c[-2]},stages={c[-1]}]")
            if variant not in done:
                t0 = time.time()
                triton.compile(ASTSource(jit, signature, constexprs, attrs), target=target, options=options.__dict__)
                done[variant] = time.time() - t0
                log(f"[compile sm_{arch}] {variant}: {done[variant]:.1f}s")

    class Compiler:  # stands in for the autotuned kernel: kernel[grid](*args, **flags) compiles
        def __init__(self, name, wide):
            self.name, self.wide = name, wide

        def __getitem__(self, grid):
            return lambda *args, **flags: compile_launch(self.name, self.wide, args, flags)

    tuned, tk._tuned = tk._tuned, Compiler
    try:
        dtypes = (torch.bfloat16,) if quick else (torch.bfloat16, torch.float16, torch.float32)
        sources = ("weight+logprobs",) if quick else ("weight+logprobs", "weight", "logits")
        for dtype in dtypes:
            rb = make_batch(3, 4, (1, 12), 64, 101, seed=1, dtype=dtype)
            for source in sources:
                kw = rb.kwargs(with_logprobs=source == "weight+logprobs")
                if source == "logits":
                    kw["logits"] = (rb.hidden.float() @ kw.pop("lm_head_weight").float().T).to(dtype)
                for anchor, score_positive in [("others", True)] + ([] if quick else [("all", False), ("all", True)]):
                    batch = validated_batch(rb, dict(kw, anchor=anchor, score_positive=score_positive))
                    for path in ("factored", "pairwise"):
                        triton_impl.nthr_advantages(batch, path=path)
                    if batch.lm_head_weight is not None:  # validation's arithmetic (the public call runs it)
                        for all_rows in (False, True):
                            triton_impl.value_checks(batch, all_rows, torch.arange(3) if batch.old_logprobs is not None else None)
            if not quick:
                x = torch.randn(20, 64, dtype=dtype)
                for path in ("factored", "pairwise"):
                    st_triton.score_tokens(x[:9], x[9:], x[:9, :40], x[9:, :40], path=path)
    finally:
        tk._tuned = tuned
    return done


def kernel_breakdown(fn) -> dict:
    """Device time per kernel name (ms) for one call, largest first (torch.profiler)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
        fn()
        _sync()
    rows, host = {}, {}
    for ev in prof.key_averages():
        t = getattr(ev, "device_time_total", None)
        if t is None:
            t = getattr(ev, "cuda_time_total", 0.0)
        if t and ev.device_type.name == "CUDA":
            rows[ev.key[:60]] = rows.get(ev.key[:60], 0.0) + t / 1e3
        if ev.self_cpu_time_total:
            host[f"{ev.key[:50]} x{ev.count}"] = ev.self_cpu_time_total / 1e3
    top = dict(sorted(rows.items(), key=lambda kv: -kv[1])[:12])
    top["host: " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(host.items(), key=lambda kv: -kv[1])[:10])] = 0.0
    return top


def tuned_configs() -> dict:
    """The block sizes the autotuner chose, per kernel and key."""
    from nthr_kernels.ops import triton_kernels as tb

    import triton

    tuners = {k: at.fn if isinstance(at, triton.runtime.Heuristics) else at for k, at in tb._tuned_cache.items()}
    return {f"{k[0]}{'' if k[1] else '-fp32'}": {str(key): str(cfg) for key, cfg in at.cache.items()}
            for k, at in tuners.items()}


def compare(res, ref, rb, dtype) -> dict:
    """Score error and selection agreement of ``res`` against the float64 ``ref``."""
    margin_rel = MARGIN[dtype]
    g_size = rb.group_size
    n_resp = rb.rewards.numel()
    grp = (torch.arange(n_resp, device=rb.rewards.device) // g_size)[:, None].expand_as(rb.mask)
    valid = rb.mask
    neg = valid & (rb.rewards == 0)[:, None] & ref.active[grp]
    n_groups = ref.group_ids.numel()
    s_ref, s = ref.scores.double(), res.scores.double()
    scale = torch.zeros(n_groups, dtype=torch.float64, device=s.device)
    scale = scale.scatter_reduce(0, grp[valid], s_ref[valid].abs(), reduce="amax")
    err = torch.zeros_like(scale).scatter_reduce(0, grp[valid], (s - s_ref)[valid].abs(), reduce="amax")
    rel = torch.where(scale > 0, err / scale.clamp_min(1e-300), torch.zeros_like(err))
    differ = neg & (res.selected != ref.selected)
    tau = ref.tau.double()[grp]
    near = (s_ref - tau).abs() <= margin_rel * scale[grp]
    n_neg = int(neg.sum())
    n_diff = int(differ.sum())
    return {
        "negative_tokens": n_neg,
        "selection_agreement": 1.0 - n_diff / max(n_neg, 1),
        "disagreements": n_diff,
        "disagreements_outside_margin": int((differ & ~near).sum()),
        "margin_rel": margin_rel,
        "max_score_err_rel": float(rel.max()) if n_groups else 0.0,
        "selected_fraction_ref": float((ref.selected & neg).sum()) / max(n_neg, 1),
        "tau_max_rel_err": float(((res.tau.double() - ref.tau.double()).abs() / scale.clamp_min(1e-300))[ref.active].max()) if bool(ref.active.any()) else 0.0,
    }


def rate_label(rate: dict) -> str:
    """A :func:`floor_rate` for the tables: ``bfloat16 694 TFLOP/s``, ``float32 (ieee) 51 TFLOP/s``."""
    precision = f" ({rate['precision']})" if rate.get("precision") else ""
    return f"{rate['dtype']}{precision} {rate['tflops']:.3g} TFLOP/s"


def floor_of(work, kw) -> tuple:
    """``(FLOPs, formula)`` of the FLOP floor of ``nthr_advantages(..., **kw)`` (``benchmarks/shapes.py``). With
    ``logits`` given, the errors on ``V*`` and the normaliser are read off them: no ``2 N |V| d`` (the
    lm_head product the logits already are) and no ``2 |V*| d T`` for the errors."""
    if kw.get("logits") is not None:
        return work.floor(True, logits=True), "sum_g 2 |V*| d (T + T+)"
    if kw.get("old_logprobs") is not None:
        return work.floor(True), "sum_g 2 |V*| d (2T + T+)"
    return work.floor(False), "sum_g 2 |V*| d (2T + T+) + 2 N |V| d"


def validated_batch(rb, kw, value_checks=None):
    """The validated batch of the public call ``nthr_advantages(rb..., **kw)`` (the Triton implementation's input)."""
    import dataclasses

    from nthr_kernels.core.checks import validate_batch
    from nthr_kernels.core.rules import Inputs, Options

    opt_names = {f.name for f in dataclasses.fields(Options)}
    opts = Options(backend="triton", **{k: v for k, v in kw.items() if k in opt_names})
    inputs = Inputs(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, **{k: v for k, v in kw.items() if k not in opt_names})
    return validate_batch(inputs, opts, value_checks=value_checks)


def run_config(name, shape, with_lp, extra, time_baselines, rates, model, args, log) -> dict:
    """One config's correctness, syncs and timings; ``rates``: :func:`floor_rate`'s measured rates (its floor's
    rate is added there when the run has not measured it yet)."""
    t0 = time.time()
    extra = dict(extra)
    use_logits = extra.pop("use_logits", False)
    rb = shape.batch(device=DEVICE)
    kw = rb.kwargs(with_logprobs=with_lp and not use_logits)
    if use_logits:
        w = kw.pop("lm_head_weight")
        kw["logits"] = (rb.hidden.float() @ w.float().T).to(rb.hidden.dtype)
    kw.update(extra)
    work = batch_work(rb)
    log(f"[{name}] batch built in {time.time() - t0:.1f}s: {shape.describe()}, N={rb.n_tokens}, "
        f"active tokens={work.n_active_tokens}")

    def call(backend):
        return nk.nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend=backend, **kw)

    out = {"shape": shape.describe(), "tokens": rb.n_tokens, "with_old_logprobs": with_lp and not use_logits,
           "logits_input": use_logits, "options": {k: v for k, v in extra.items()}}
    # ---- correctness -------------------------------------------------------------------------------
    t0 = time.time()
    res = call("triton")
    _sync()
    log(f"[{name}] triton first call (compile) {time.time() - t0:.1f}s")
    t0 = time.time()
    ref = call("reference")
    _sync()
    log(f"[{name}] float64 reference {time.time() - t0:.1f}s")
    out.update(compare(res, ref, rb, shape.dtype))
    res2 = call("triton")
    out["deterministic"] = bool(torch.equal(res.scores, res2.scores) and torch.equal(res.selected, res2.selected)
                                and torch.equal(res.token_advantages, res2.token_advantages))
    if time_baselines:
        tres = call("torch")
        out["torch_vs_reference"] = compare(tres, ref, rb, shape.dtype)
    del ref, res2
    # ---- host synchronisations (after the calls above: autotuning synchronises on first use) -------
    from nthr_kernels.ops.advantages import triton_impl

    batch = validated_batch(rb, kw)
    triton_impl.nthr_advantages(batch)
    out["host_syncs"], events = count_host_syncs(lambda: triton_impl.nthr_advantages(batch))
    out["host_sync_events"] = events[:8]
    out["host_syncs_public_call"], events = count_host_syncs(lambda: call("triton"))  # validation included
    out["host_sync_events_public_call"] = events[:8]
    log(f"[{name}] host syncs: {out['host_syncs']} in the Triton implementation, "
        f"{out.get('host_syncs_public_call', '-')} in the public call (validation included)")
    del batch
    # ---- timing ------------------------------------------------------------------------------------
    floor_flops, out["floor_formula"] = floor_of(work, kw)
    out["floor_flops"] = floor_flops
    from nthr_kernels.ops.triton_kernels import work_dtype

    # the rate of the products the call runs: its work dtype as the Triton implementation picks it
    out["floor_rate"] = dict(floor_rate(work_dtype(rb.hidden, kw.get("lm_head_weight")), rates))
    out["floor_ms"] = floor_flops / (out["floor_rate"]["tflops"] * 1e12) * 1e3
    out["triton_ms"] = bench(lambda: call("triton"), args.rep_ms)
    if DEVICE == "cuda":  # one plain call (do_bench holds a 256 MB cache-flush buffer of its own)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        call("triton")  # its outputs count in the peak while they live, within the call
        torch.cuda.synchronize()
        out["triton_peak_scratch_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
        # the documented bound (ops/triton_kernels.py): SCRATCH_BYTES plus TOKEN_BYTES per completion token
        out["scratch_bound_mb"] = (SCRATCH_BYTES + TOKEN_BYTES * rb.n_tokens) / 2**20
    kw_nocheck = dict(kw, check_finite=False)
    out["triton_ms_no_finite_check"] = bench(
        lambda: nk.nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend="triton", **kw_nocheck),
        args.rep_ms,
    )
    out["triton_vs_floor"] = out["triton_ms"] / out["floor_ms"]
    out["triton_wall_ms"] = bench_wall(lambda: call("triton"), 5)
    if DEVICE == "cuda":
        out["kernel_breakdown_ms"] = kernel_breakdown(lambda: call("triton"))
        log(f"[{name}] kernels: " + ", ".join(f"{k} {v:.2f}" for k, v in list(out["kernel_breakdown_ms"].items())[:8]))
    out["model_fwd_bwd_ms_estimate"] = 6 * 1.5e9 * rb.n_tokens / (floor_rate(torch.bfloat16, rates)["tflops"] * 1e12) * 1e3  # a bf16 model
    if "ms_per_token" in model:  # measured in this run, else the 6 * 1.5e9 * N FLOPs estimate
        out["model_fwd_bwd_ms"] = model["ms_per_token"] * rb.n_tokens
    else:
        out["model_fwd_bwd_ms"] = out["model_fwd_bwd_ms_estimate"]
    out["share_of_fwd_bwd"] = out["triton_ms"] / out["model_fwd_bwd_ms"]
    if time_baselines:
        out["torch_ms"] = bench_events(lambda: call("torch"), args.torch_reps)
        # where the torch backend's time goes on this device (it trails the naive pipeline on the H200):
        # its host synchronisations per public call, and on the GPU its kernels and host ops
        out["torch_host_syncs"], events = count_host_syncs(lambda: call("torch"))
        out["torch_host_sync_events"] = events[:8]
        if DEVICE == "cuda":
            out["torch_kernel_breakdown_ms"] = kernel_breakdown(lambda: call("torch"))
        log(f"[{name}] torch backend: {out['torch_host_syncs']} host syncs per call"
            + "".join(f", {k} {v:.2f}" for k, v in list(out.get("torch_kernel_breakdown_ms", {}).items())[:8]))
        # the naive pipeline in the config's own setting (with old log-probs it takes the shortcut too)
        naive_kw = {k: v for k, v in kw.items()
                    if k in ("lm_head_weight", "group_size", "mask", "temperature", "old_logprobs")}
        naive = lambda: naive_nthr(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, **naive_kw)  # noqa: E731
        nres = naive()
        out["naive_selection_agreement_with_triton"] = float((nres.selected == res.selected)[rb.mask].float().mean())
        del nres
        out["naive_ms"] = bench_events(naive, args.naive_reps)
        out["naive_old_logprobs"] = "old_logprobs" in naive_kw  # the same setting as triton's (the report says so)
        out["speedup_vs_torch"] = out["torch_ms"] / out["triton_ms"]
        out["speedup_vs_naive"] = out["naive_ms"] / out["triton_ms"]
    del res, rb
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def score_tokens_check(log) -> dict:
    """Dense ``score_tokens`` (one group): both Triton paths against float64, timed, and the cost model's pick."""
    from nthr_kernels.core.rules import cheaper_path
    from nthr_kernels.ops.score_tokens import reference, triton_impl

    big = DEVICE == "cuda"
    out = {}
    for tp, tn, v, d in ([(4096, 4096, 2726, 1536), (256, 256, 2726, 1536)] if big else [(40, 33, 50, 24), (7, 5, 90, 16)]):
        g = torch.Generator(device=DEVICE).manual_seed(tp + v)
        mk = lambda *shape: torch.randn(*shape, generator=g, device=DEVICE).to(torch.bfloat16)  # noqa: E731
        hp, hn, ep, en = mk(tp, d), mk(tn, d), mk(tp, v) * 0.1, mk(tn, v) * 0.1
        ref = reference.factored_scores(hp, hn, ep, en)
        scale = float(ref.abs().max())
        row = {"cost_model_pick": cheaper_path(tp, tn, v, d)}
        for path in ("factored", "pairwise"):
            s = triton_impl.score_tokens(hp, hn, ep, en, path=path)
            row[f"{path}_err_rel"] = float((s.double() - ref).abs().max()) / scale
            row[f"{path}_ms"] = bench(lambda: triton_impl.score_tokens(hp, hn, ep, en, path=path), 200)
        row["auto_ms"] = bench(lambda: nk.score_tokens(hp, hn, ep, en, backend="triton"), 200)
        out[f"T+={tp},T={tn},V={v},d={d}"] = row
        log(f"[score_tokens] T+={tp} T={tn} V={v} d={d}: {row}")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default=",".join(CONFIGS), help="comma-separated subset of " + ", ".join(CONFIGS))
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--rep-ms", type=int, default=400)
    ap.add_argument("--torch-reps", type=int, default=3)
    ap.add_argument("--naive-reps", type=int, default=2)
    ap.add_argument("--smoke", action="store_true", help="CPU self-test: Triton interpreter, tiny shapes")
    ap.add_argument("--no-baselines", action="store_true", help="skip the torch and naive timings (correctness + triton only)")
    ap.add_argument("--compile-only", type=int, metavar="ARCH", help="no GPU needed: compile every kernel variant for sm_ARCH (e.g. 90), then exit")
    ap.add_argument("--quick", action="store_true", help="with --compile-only: bf16 variants only")
    ap.add_argument("--all-configs", action="store_true", help="with --compile-only: every autotune config, not the first")
    args = ap.parse_args(argv)
    global DEVICE
    if args.compile_only:
        from nthr_kernels.core.rules import interpreting

        if interpreting():
            print("gpu_suite: --compile-only needs TRITON_INTERPRET unset", file=sys.stderr)
            return 2
        DEVICE = "cpu"
        t0 = time.time()
        done = compile_check(args.compile_only, args.quick, args.all_configs, print)
        print(f"compiled {len(done)} kernel variants for sm_{args.compile_only} in {time.time() - t0:.0f}s")
        return 0
    configs = CONFIGS
    if args.smoke:
        os.environ["TRITON_INTERPRET"] = "1"
        DEVICE, configs = "cpu", SMOKE_CONFIGS
        if args.configs == ",".join(CONFIGS):
            args.configs = ",".join(SMOKE_CONFIGS)
    elif not torch.cuda.is_available():
        print("gpu_suite: no CUDA device (use --smoke for the CPU self-test)", file=sys.stderr)
        return 2
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    import triton

    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu-interpreter-smoke"
    log = (lambda m: tqdm.write(m)) if tqdm else print
    log(f"device: {card}; torch {torch.__version__}; triton {triton.__version__}")
    rates: dict = {}  # by dtype: the floors' matmul rates, measured when a config first needs one
    rate = floor_rate(torch.bfloat16, rates)["tflops"]
    try:
        model = model_fwd_bwd_ms_per_token(log)
    except Exception as e:  # reported, and the share falls back to the FLOP estimate
        model = {"error": f"{type(e).__name__}: {e}"}
        log(f"model fwd+bwd not measured: {model['error']}")
    log(f"matmul rate: {rate:.1f} TFLOP/s (bf16)")
    results = {
        "device": card,
        "date": _dt.date.today().isoformat(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "matmul_tflops": rate,  # bf16; each config's floor records its own rate (floor_rate), all in matmul_rates
        "matmul_rates": rates,
        "model_fwd_bwd": model,
        "kernel_sources": kernel_sources(),
        "host_syncs_method": ("torch.cuda.set_sync_debug_mode" if DEVICE == "cuda"
                              else "CPU proxy: host reads and synchronising aten ops (count_host_syncs)"),
        "configs": {},
    }
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    slug = card.lower().replace("nvidia ", "").replace(" ", "-")
    path = out_dir / f"{slug}-{results['date']}.json"
    names = [c for c in args.configs.split(",") if c]
    it = tqdm(names, desc="configs") if tqdm else names
    for name in it:
        shape, with_lp, extra, baselines = configs[name]
        try:
            results["configs"][name] = run_config(name, shape, with_lp, extra, baselines and not args.no_baselines, rates, model, args, log)
        except Exception as e:  # keep the other configs' numbers; the failure is reported, not hidden
            import traceback

            traceback.print_exc()
            results["configs"][name] = {"error": f"{type(e).__name__}: {e}"}
        path.write_text(json.dumps(results, indent=2))  # after every config, in case of a time-out
    try:
        results["autotune"] = tuned_configs()
    except Exception as e:
        results["autotune"] = {"error": str(e)}
    try:
        results["score_tokens"] = score_tokens_check(log)
    except Exception as e:
        import traceback

        traceback.print_exc()
        results["score_tokens"] = {"error": f"{type(e).__name__}: {e}"}
    # per public call (validation included), worst config; and of the Triton implementation alone
    for key, field in (("host_syncs", "host_syncs_public_call"), ("host_syncs_implementation", "host_syncs")):
        counts = [r[field] for r in results["configs"].values() if field in r]
        results[key] = max(counts) if counts else None
    path.write_text(json.dumps(results, indent=2))
    md = [f"# GPU suite on {card} ({results['date']})", "",
          f"torch {results['torch']}, triton {results['triton']}, matmul (8192^3 on GPU, measured in the same run; each "
          f"config's floor at its own dtype's rate): " + ", ".join(rate_label(r) for r in rates.values()), "",
          "| config | floor ms | floor rate | triton ms | x floor | torch ms | naive ms | vs torch | vs naive | sel. agreement | outside margin | max score err | share of 1.5B fwd+bwd | host syncs per call |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results["configs"].items():
        if "error" in r:
            md.append(f"| {name} | error: {r['error']} |")
            continue
        f = lambda k, fmt="{:.2f}": fmt.format(r[k]) if k in r else "-"  # noqa: E731
        md.append(
            f"| {name} | {f('floor_ms')} | {rate_label(r['floor_rate']) if 'floor_rate' in r else '-'} | {f('triton_ms')} | {f('triton_vs_floor')} | {f('torch_ms')} | {f('naive_ms')} | "
            f"{f('speedup_vs_torch', '{:.1f}x')} | {f('speedup_vs_naive', '{:.0f}x')} | {f('selection_agreement', '{:.5f}')} | "
            f"{r.get('disagreements_outside_margin', '-')} | {f('max_score_err_rel', '{:.1e}')} | {f('share_of_fwd_bwd', '{:.2%}')} | {r.get('host_syncs_public_call', '-')} |"
        )
    (out_dir / f"{slug}-{results['date']}.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
