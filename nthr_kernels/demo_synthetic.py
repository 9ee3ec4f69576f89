"""The demo's main job: NTHR on a synthetic rollout batch shaped like a GRPO step, every backend.

:func:`run_backend_table` builds the batch (Zipf token ids, ``old_logprobs`` given, as a trainer has
them), times :func:`nthr_advantages` with every backend of :func:`available_backends`, checks each against
the float64 reference and prints one table. The reference runs on the whole batch when that is
estimated to take under ``REFERENCE_BUDGET_S`` seconds, else on the first groups (a sub-batch); the
comparison of every backend is then made on that sub-batch.
"""
from __future__ import annotations

import platform
import statistics
import time
from dataclasses import dataclass
from typing import Optional

import torch

from .api import available_backends, nthr_advantages
from .synthetic import RolloutBatch, make_batch

REFERENCE_BUDGET_S = 20.0


@dataclass(frozen=True)
class DemoShape:
    n_groups: int
    group_size: int
    lengths: tuple[int, int]
    d: int
    vocab: int
    repeats: int


FULL = DemoShape(16, 8, (64, 192), 256, 32000, repeats=3)
QUICK = DemoShape(4, 8, (16, 64), 64, 4000, repeats=3)


def _sub_batch(rb: RolloutBatch, g0: int, g1: int) -> RolloutBatch:
    """Groups ``g0 .. g1-1`` of a padded batch."""
    r = slice(g0 * rb.group_size, g1 * rb.group_size)
    return RolloutBatch(
        rb.hidden[r], rb.token_ids[r], rb.mask[r], None, rb.rewards[r], rb.advantages[r],
        rb.lm_head_weight, rb.old_logprobs[r], rb.group_size, rb.temperature,
    )


def _mixed_groups(rb: RolloutBatch) -> list[int]:
    n_pos = (rb.rewards.cpu() > 0.5).view(-1, rb.group_size).sum(1)
    return [g for g, k in enumerate(n_pos.tolist()) if 0 < k < rb.group_size]


def _to(rb: RolloutBatch, device: torch.device) -> RolloutBatch:
    mv = lambda x: None if x is None else x.to(device)  # noqa: E731
    return RolloutBatch(
        mv(rb.hidden), mv(rb.token_ids), mv(rb.mask), mv(rb.cu_seqlens), mv(rb.rewards), mv(rb.advantages),
        mv(rb.lm_head_weight), mv(rb.old_logprobs), rb.group_size, rb.temperature,
    )


def _call(rb: RolloutBatch, backend: str):
    return nthr_advantages(rb.hidden, rb.token_ids, rb.rewards, rb.advantages, backend=backend, **rb.kwargs())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(rb: RolloutBatch, backend: str, device: torch.device):
    _sync(device)
    t0 = time.perf_counter()
    out = _call(rb, backend)
    _sync(device)
    return time.perf_counter() - t0, out


def _compare(out, ref, rb: RolloutBatch) -> dict:
    """Selection agreement on the negative tokens of active groups; max score error / max |score|."""
    neg = (rb.rewards.cpu() <= 0.5)[:, None] & rb.mask.cpu()
    act = ref.active.repeat_interleave(rb.group_size)[:, None]
    neg_act = neg & act
    n_neg = int(neg_act.sum())
    sel, rsel = out.selected.cpu(), ref.selected.cpu()
    agree = float((sel == rsel)[neg_act].float().mean()) if n_neg else 1.0
    scale = float(ref.scores.abs().max()) or 1.0
    err = float((out.scores.cpu() - ref.scores.cpu()).abs().max()) / scale
    return dict(agreement=agree, max_rel_score_err=err)


def _frac_selected(out, rb: RolloutBatch) -> float:
    neg_act = ((rb.rewards.cpu() <= 0.5) & out.active.cpu().repeat_interleave(rb.group_size))[:, None] & rb.mask.cpu()
    n = int(neg_act.sum())
    return float(out.selected.cpu()[neg_act].sum()) / n if n else 0.0


def _plan(backends: list[str]) -> list[tuple[str, torch.device]]:
    """(backend, device) rows: torch on CPU (and CUDA when present), Triton on CUDA, native on CPU."""
    from .core.rules import interpreting

    cuda = torch.device("cuda") if torch.cuda.is_available() else None
    cpu = torch.device("cpu")
    rows = []
    for b in backends:
        if b == "reference":
            continue
        if b == "triton":
            rows.append((b, cuda if (cuda is not None and not interpreting()) else cpu))
        elif b == "torch":
            rows.append((b, cpu))
            if cuda is not None:
                rows.append((b, cuda))
        else:
            rows.append((b, cpu))
    return rows


def run_backend_table(quick: bool = False, *, seed: int = 0, shape: Optional[DemoShape] = None) -> dict:
    """Run NTHR with every available backend on a synthetic GRPO-step batch, check each against the
    float64 reference, print a table and return the numbers.

    ``quick``: a smaller batch (seconds). Returns ``dict(shape=..., machine=..., reference=...,
    rows=[dict(backend, device, time_ms, times_ms, agreement, max_rel_score_err, frac_selected,
    timed_on), ...])``. ``agreement``: fraction of the negative tokens of active groups whose selection
    matches the reference (on the reference's batch); ``frac_selected``: selected / negative tokens of
    active groups (on the timed batch).
    """
    from tqdm.auto import tqdm

    sh = shape or (QUICK if quick else FULL)
    t_build = time.perf_counter()
    rb = make_batch(sh.n_groups, sh.group_size, sh.lengths, sh.d, sh.vocab, seed=seed)
    t_build = time.perf_counter() - t_build
    n_tokens = int(rb.mask.sum())
    rows_plan = _plan(available_backends())
    interp = {b for b, dev in rows_plan if b == "triton" and dev.type == "cpu"}  # Triton interpreter: slow

    steps = 2 + sum(1 if b in interp else sh.repeats + 2 for b, _ in rows_plan)
    bar = tqdm(total=steps, desc="nthr demo", unit="run", leave=False)

    # The reference: a probe on one mixed group, then the whole batch if that is estimated to fit the
    # budget, else as many leading groups as fit.
    mixed = _mixed_groups(rb) or [0]
    probe = _sub_batch(rb, mixed[0], mixed[0] + 1)
    _call(probe, "reference")  # one-time costs (imports, lazy builds) stay out of the estimate
    t_probe, _ = _timed(probe, "reference", torch.device("cpu"))
    bar.update(1)
    fit = int(REFERENCE_BUDGET_S / max(t_probe, 1e-9))
    ref_groups = sh.n_groups if fit >= len(mixed) else max(1, min(sh.n_groups, mixed[max(fit, 1) - 1] + 1))
    ref_rb = rb if ref_groups == sh.n_groups else _sub_batch(rb, 0, ref_groups)
    t_ref, ref = _timed(ref_rb, "reference", torch.device("cpu"))
    bar.update(1)

    rows = []
    for backend, dev in rows_plan:
        bar.set_postfix_str(f"{backend}/{dev.type}")
        full = _to(rb, dev)
        if backend in interp:  # interpreted kernels: one run on the reference's batch only
            t, out = _timed(_to(ref_rb, dev), backend, dev)
            times, timed_on, cmp_out = [t], "reference batch", out
            bar.update(1)
        else:
            _timed(full, backend, dev)  # warm-up (kernel compilation, caches)
            bar.update(1)
            times = []
            for _ in range(sh.repeats):
                t, out = _timed(full, backend, dev)
                times.append(t)
                bar.update(1)
            timed_on = "whole batch"
            cmp_out = out if ref_rb is rb else _call(_to(ref_rb, dev), backend)
            bar.update(1)
        rows.append(
            dict(
                backend=backend,
                device=str(dev),
                time_ms=1e3 * statistics.median(times),
                times_ms=[1e3 * t for t in times],
                timed_on=timed_on,
                frac_selected=_frac_selected(out, full if timed_on == "whole batch" else ref_rb),
                **_compare(cmp_out, ref, ref_rb),
            )
        )
    bar.close()

    result = dict(
        shape=dict(
            n_groups=sh.n_groups, group_size=sh.group_size, lengths=list(sh.lengths), d=sh.d, vocab=sh.vocab,
            n_tokens=n_tokens, dtype="float32", old_logprobs=True, seed=seed,
        ),
        machine=machine_description(),
        build_s=t_build,
        reference=dict(
            n_groups=ref_groups, time_ms=1e3 * t_ref, frac_selected=_frac_selected(ref, ref_rb),
            timed_on="whole batch" if ref_rb is rb else f"first {ref_groups} of {sh.n_groups} groups",
        ),
        rows=rows,
    )
    _print_table(result)
    return result


def machine_description() -> str:
    """CPU model, CPU count, torch threads, CUDA device, torch version and load average (for reports)."""
    import os
    from pathlib import Path

    cpu = platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in info if ln.startswith("model name"))
        # the widest vector ISA: virtual machines often name every model "AMD EPYC", and the rates differ ~4x
        flags = set(next(ln.split(":", 1)[1].split() for ln in info if ln.startswith("flags")))
        isa = "AVX-512" if "avx512f" in flags else "AVX2" if {"avx2", "fma"} <= flags else ""
        cpu += f" ({isa})" if isa else ""
    except (OSError, StopIteration):
        pass
    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no CUDA device"
    load = f", load avg {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else ""
    return f"{cpu}, {os.cpu_count()} CPUs ({torch.get_num_threads()} torch threads), {dev}, torch {torch.__version__}{load}"


def _print_table(res: dict) -> None:
    s, ref = res["shape"], res["reference"]
    lo, hi = s["lengths"]
    print(
        f"NTHR demo: {s['n_groups']} groups x {s['group_size']} responses x {lo}..{hi} tokens "
        f"({s['n_tokens']} tokens), d={s['d']}, |V|={s['vocab']}, float32, old_logprobs given"
    )
    print(f"machine: {res['machine']}")
    print(f"reference (float64): {ref['time_ms']:.1f} ms on the {ref['timed_on']}; comparisons on that batch")
    head = f"{'backend':10s} {'device':7s} {'time ms':>10s} {'agreement':>10s} {'max |ds|/max|s|':>16s} {'selected':>9s}  timed on"
    print(head)
    print("-" * len(head))
    print(f"{'reference':10s} {'cpu':7s} {ref['time_ms']:10.1f} {1.0:10.4f} {0.0:16.2e} {ref['frac_selected']:9.3f}  {ref['timed_on']}")
    for r in res["rows"]:
        print(
            f"{r['backend']:10s} {r['device']:7s} {r['time_ms']:10.1f} {r['agreement']:10.4f} "
            f"{r['max_rel_score_err']:16.2e} {r['frac_selected']:9.3f}  {r['timed_on']}"
        )
    print("agreement: selection equal to the reference's on negative tokens of mixed groups; "
          "selected: fraction of those tokens selected")


if __name__ == "__main__":  # pragma: no cover
    import sys

    run_backend_table(quick="--quick" in sys.argv)
