"""The one benchmark runner: a benchmarked op is a setup function and a list of providers, nothing else.

An :class:`Op` says how to build its inputs from a shape's synthetic batch (``setup``), which
implementations to time (``providers``: backends, the naive baseline), how to check an output against
the float64 reference (``reference`` + ``check``) and how many FLOPs its floor and its algorithm need
(``flops``). :func:`measure` does the rest for every case, identically: the inputs (one batch per
shape and device, shared by every op), timing through pytest-benchmark (``ROUNDS``: measured and
warm-up rounds, the same for every row of a shape), the correctness check of the timed output, the
peak scratch of one more call, and the record in ``benchmark.extra_info`` from which
``benchmarks/report.py`` builds the summary table, the JSON (pytest-benchmark's own
``--benchmark-json``), the markdown and the chart. :func:`time_call`, :func:`synced`,
:func:`peak_scratch` and :func:`matmul_operands` serve scripts outside pytest (the GPU suite) alike.
Outside smoke runs every round of an op follows one run of the matrix unit's products (:class:`Paired`), whose
best rate at that moment the report divides by as well.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import pytest
import torch

from benchmarks.shapes import Shape
from nthr_kernels.ops import native_lib
from nthr_kernels.registry import available_backends, native_available
from nthr_kernels.synthetic import RolloutBatch
from nthr_kernels.testing import peak_rss_rise

# (measured rounds, warm-up rounds) per shape: every provider of a shape is timed with these.
# medium: 5 rounds, not 3: the native row sits within its run-to-run noise (about 2 %) of its floor.
# 3 warm-up rounds, not 1: a process's first calls page-fault their scratch in while glibc adapts its mmap
# threshold to the sizes (measured, native with old log-probs at medium: 400 to 1,500 minor faults on each
# of calls 2 to 6, about 1 ms each, then none); a trainer calls thousands of times, so the rows time the
# steady state.
ROUNDS = {"small": (7, 3), "medium": (5, 3)}
DEFAULT_ROUNDS = (3, 3)
SMOKE_GROUPS = 2  # groups per shape under --benchmark-disable (the CI smoke run)


@dataclass(frozen=True)
class Provider:
    """One implementation of an op. ``call(inputs, with_logprobs)`` returns the zero-argument call to
    time; ``configs(shape)`` the old-log-prob settings it is timed with on a shape (``None``: the op
    has no such setting); ``requires`` says why it cannot run here, or returns None."""

    name: str
    call: Callable[[Any, Optional[bool]], Callable[[], Any]]
    device: str = "cpu"
    configs: Callable[[str], tuple] = lambda shape: (True, False)
    requires: Callable[[], Optional[str]] = lambda: None


def backend_missing(name: str) -> Callable[[], Optional[str]]:
    """``requires`` of a library backend: why it cannot be timed here (triton: on a CUDA device only)."""

    def why_not() -> Optional[str]:
        if name == "triton" and not torch.cuda.is_available():
            return "triton is timed on a CUDA device only"
        if name not in available_backends():
            return f"backend {name!r} not available" + (
                f": {native_lib.unavailable_reason() or 'unknown'}" if name == "native" else "")
        return None

    return why_not


@dataclass(frozen=True)
class Op:
    """A benchmarked op: inputs per shape, providers, the float64 reference and its check, FLOP counts.

    ``flops(inputs, with_logprobs)`` returns ``{"floor": ..., "algorithm": ...}`` (FLOPs of the
    floor the targets are stated against, and of the algorithm the library runs)."""

    name: str
    setup: Callable[[RolloutBatch], Any]
    providers: tuple[Provider, ...]
    reference: Callable[[Any], Any]
    check: Callable[[Any, Any, Any], None]
    flops: Callable[[Any, Optional[bool]], dict]

    def provider(self, name: str) -> Provider:
        return next(p for p in self.providers if p.name == name)


@dataclass(frozen=True)
class Case:
    op: str
    shape: str
    provider: str
    with_logprobs: Optional[bool]

    @property
    def id(self) -> str:
        lp = {True: "-logprobs", False: "-no-logprobs", None: ""}[self.with_logprobs]
        return f"{self.shape}-{self.provider}{lp}"


def cases(op: Op, shapes: tuple[str, ...]) -> list:
    """``pytest.param`` per (shape, provider, old-log-prob setting), with readable ids."""
    out = []
    for shape in shapes:
        for p in op.providers:
            for lp in p.configs(shape):
                c = Case(op.name, shape, p.name, lp)
                out.append(pytest.param(c, id=c.id))
    return out


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def synced(fn: Callable[[], Any], device: str) -> Callable[[], Any]:
    """``fn`` followed by a device synchronisation, so a timer around it sees the whole call."""
    if device != "cuda":
        return fn

    def run():
        out = fn()
        torch.cuda.synchronize()
        return out

    return run


def peak_scratch(fn: Callable[[], Any], device: str) -> Optional[int]:
    """Bytes one call of ``fn`` needs above what was resident when it started: the rise of the
    process's peak resident set on CPU (every allocation of every thread, outputs included), the
    rise of the caching allocator's peak on CUDA; None where it cannot be measured."""
    if device != "cuda":
        return peak_rss_rise(fn)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def time_call(fn: Callable[[], Any], device: str = "cpu", rounds: int = 3, warmup: int = 1) -> list[float]:
    """Seconds of ``rounds`` calls after ``warmup`` calls (outside pytest; pytest uses the fixture)."""
    fn = synced(fn, device)
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def matmul_operands(device: str, n: int):
    """The matrix unit's workload: float32 (sgemm) on CPU, bfloat16 on CUDA, ``n x n`` each."""
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    g = torch.Generator().manual_seed(n)
    a, b = (torch.randn(n, n, generator=g).to(device=device, dtype=dtype) for _ in range(2))
    return a, b


def matmul_flops(n: int) -> int:
    return 2 * n**3


# The matrix unit's products: every size on every engine of this machine (benchmarks/test_matmul.py times them in
# two passes, measure() once each before every round of an op). Engines: ``torch`` (``a @ b``: the BLAS torch
# ships, MKL on x86) everywhere, and on CPU ``native`` (``nthr::native_mm``, the GEMM of the native ops,
# csrc/gemm.cpp) where that backend is built, and ``onednn`` (oneDNN's fp32 inner product,
# ``torch.ops.mkldnn._linear_pointwise``, where torch has it).
MATMUL_SIZES = (512, 1024, 2048)


def _onednn_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def matmul_engines() -> list[tuple[str, str]]:
    """``(device, engine)`` of every matrix engine this machine has."""
    return ([("cpu", "torch")] + ([("cpu", "native")] if native_available() else [])
            + ([("cpu", "onednn")] if _onednn_available() else [])
            + ([("cuda", "torch")] if torch.cuda.is_available() else []))


def engine_mm(engine: str, b: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
    """``f(a) = a @ b`` on the engine (oneDNN's inner product takes ``b^T``, transposed here, untimed)."""
    if engine == "native":
        return lambda a: torch.ops.nthr.native_mm(a, b)
    if engine == "onednn":
        bt = b.t().contiguous()
        return lambda a: torch.ops.mkldnn._linear_pointwise(a, bt, None, "none", [], "")
    return lambda a: torch.mm(a, b)


class Paired:
    """The matrix unit's rate at the moment of each round of an op ("paired" rounds).

    On a shared machine the matrix rate moves by up to 1.5x between spells of a few seconds, and the ops move
    with it, so a floor at the best rate of other moments of the run says as much about the spells as about the
    op. Here every product of :data:`MATMUL_SIZES` on every engine of the op's device runs once right before
    each round (pytest-benchmark's ``setup``: untimed, warm-up rounds included, so that oneDNN's per-shape
    compilation is behind it), the best of them is that round's rate, and :meth:`timed` records the round's
    own time. A round's ratio to the floor at its own rate is then a ratio of two things measured within a
    second of each other; the report gives the median over the measured rounds."""

    def __init__(self, device: str, warmup: int):
        self.warmup, self.calls = warmup, 0
        self.rates: list[float] = []  # FLOP/s, one per measured round
        self.best: list[list] = []  # [engine, n] of the product that gave each rate
        self.times: list[float] = []  # seconds of each measured round
        self._products = []
        for dev, engine in matmul_engines():
            if dev == device:
                for n in MATMUL_SIZES:
                    a, b = matmul_operands(device, n)
                    self._products.append((engine, n, synced(lambda a=a, f=engine_mm(engine, b): f(a), device)))

    def before_round(self) -> None:
        """Every product once; the best rate is recorded for a measured round."""
        self.calls += 1
        best = (0.0, None)
        for engine, n, run in self._products:
            t0 = time.perf_counter()
            run()
            best = max(best, (matmul_flops(n) / (time.perf_counter() - t0), [engine, n]), key=lambda x: x[0])
        if self.calls > self.warmup:
            self.rates.append(best[0])
            self.best.append(best[1])

    def timed(self, fn: Callable[[], Any]) -> Callable[[], Any]:
        """``fn``, its time recorded for the measured rounds (those after the warm-up ones)."""

        def run():
            t0 = time.perf_counter()
            out = fn()
            if self.calls > self.warmup:
                self.times.append(time.perf_counter() - t0)
            return out

        return run

    def info(self) -> dict:
        return {"paired_rates": self.rates, "paired_products": self.best, "paired_times": self.times}


def to_cpu(out):
    """A result (tensor, dataclass or NamedTuple of tensors) with every tensor on the CPU."""
    if isinstance(out, torch.Tensor):
        return out.cpu()
    if dataclasses.is_dataclass(out):
        return dataclasses.replace(out, **{f.name: to_cpu(getattr(out, f.name)) for f in dataclasses.fields(out)})
    if isinstance(out, tuple) and hasattr(out, "_fields"):
        return out._make(to_cpu(x) for x in out)
    return out


@dataclass
class Session:
    """Per pytest session: shapes (reduced in smoke runs), inputs and reference results, built once."""

    smoke: bool
    shapes: dict[str, Shape]
    _batches: dict = field(default_factory=dict)
    _inputs: dict = field(default_factory=dict)
    _refs: dict = field(default_factory=dict)

    def shape(self, name: str) -> Shape:
        s = self.shapes[name]
        return dataclasses.replace(s, n_groups=min(s.n_groups, SMOKE_GROUPS)) if self.smoke else s

    def rounds(self, shape: str) -> tuple[int, int]:
        return ROUNDS.get(shape, DEFAULT_ROUNDS)

    def batch(self, shape: str, device: str = "cpu") -> RolloutBatch:
        if (shape, device) not in self._batches:
            self._batches[shape, device] = self.shape(shape).batch(device=device)
        return self._batches[shape, device]

    def inputs(self, op: Op, shape: str, device: str = "cpu"):
        key = (op.name, shape, device)
        if key not in self._inputs:
            self._inputs[key] = op.setup(self.batch(shape, device))
        return self._inputs[key]

    def reference(self, op: Op, shape: str):
        """The float64 reference result of an op on a shape's CPU inputs (computed once)."""
        key = (op.name, shape)
        if key not in self._refs:
            self._refs[key] = op.reference(self.inputs(op, shape))
        return self._refs[key]


def measure(benchmark, session: Session, op: Op, case: Case) -> Any:
    """Time one case, check its output against the float64 reference, measure its peak scratch and
    record everything the report needs in ``benchmark.extra_info``. Returns the timed output."""
    prov = op.provider(case.provider)
    why_not = prov.requires()
    if why_not:
        pytest.skip(why_not)
    inputs = session.inputs(op, case.shape, prov.device)
    fn = synced(prov.call(inputs, case.with_logprobs), prov.device)
    rounds, warmup = session.rounds(case.shape)
    benchmark.group = f"{op.name} {case.shape}"
    # smoke runs (one call, the CI check that every body runs) pair nothing
    paired = None if session.smoke else Paired(prov.device, warmup)
    timed = lambda: benchmark.pedantic(  # noqa: E731
        paired.timed(fn) if paired else fn, setup=paired.before_round if paired else None, rounds=rounds,
        warmup_rounds=warmup, iterations=1)
    if session.smoke:  # pytest-benchmark calls fn once: that call's peak is the peak scratch
        outs = []
        peak = peak_scratch(lambda: outs.append(timed()), prov.device)
        out = outs[0]
    else:
        out = timed()
        peak = peak_scratch(fn, prov.device)
    op.check(to_cpu(out), session.reference(op, case.shape), session.inputs(op, case.shape))
    shape = session.shape(case.shape)
    benchmark.extra_info.update(
        op=op.name,
        shape=case.shape,
        shape_text=shape.describe(),
        backend=case.provider,
        device=prov.device,
        logprobs=case.with_logprobs,
        rounds=rounds,
        warmup=warmup,
        threads=torch.get_num_threads(),
        peak_scratch_bytes=peak,
        **{f"{k}_flops": v for k, v in op.flops(inputs, case.with_logprobs).items()},
        **(paired.info() if paired else {}),
    )
    return out
