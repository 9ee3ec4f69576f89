"""The README's GPU figures, rendered from the newest committed GPU results (``benchmarks/gpu_suite.py``).

    python -m benchmarks.gpu_readme            # rewrite the README block from the newest results file
    python -m benchmarks.gpu_readme --check    # exit 1 if the README block differs

``tests/test_gpu_readme.py`` checks that the README block equals the rendering of that file, so every
GPU figure in the README comes from a results file.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from benchmarks.report import README, RESULTS, _ms  # noqa: E402  (one millisecond format for both README blocks)
from gpu_suite import CONFIGS, kernel_sources, rate_label  # noqa: E402
from provenance import changed, stale_note  # noqa: E402
from nthr_kernels.testing import HOST_SYNCS_PER_CALL  # noqa: E402
BEGIN, END = "<!-- gpu-results: begin (python -m benchmarks.gpu_readme) -->", "<!-- gpu-results: end -->"

# The targets of issue 12, stated once for the verdicts.
QWEN = "qwen1.5b-step"
FLOOR_TARGET = 2.0  # x the FLOP floor at qwen1.5b-step
SHARE_TARGET = 0.005  # of the 1.5B model's forward+backward
SYNC_TARGET = HOST_SYNCS_PER_CALL  # host synchronisations per public call
CONFIG_TARGET = (5.0, 2.0)  # every config within max(5x floor, 2 ms)


def gpu_results() -> list:
    """Committed GPU results files (those with a ``configs`` table and a CUDA ``device``), oldest first
    (by date, then name; the test of ``kernel_sources`` orders them the same way). The newest run of a
    date is ``<card>-<date>.json``; when a later run replaces it, it becomes ``<card>-<date>-r<N>-<commit>``
    with N its run number that date, so that names sort in run order."""
    out = []
    for p in RESULTS.glob("*.json"):
        d = json.loads(p.read_text())
        if isinstance(d, dict) and isinstance(d.get("configs"), dict) and d.get("device", "cpu") != "cpu" \
                and "interpreter" not in str(d.get("device")):
            out.append((d.get("date", ""), p.name, p))
    return [p for _, _, p in sorted(out)]


def _old_logits_floor(r: dict) -> bool:
    """A logits config of a run from before ``floor_formula`` was recorded: its floor counted the lm_head
    products that the given logits hold (``2 N |V| d`` and ``2 |V*| d T``)."""
    return bool(r.get("logits_input")) and "floor_ms" in r and "floor_formula" not in r


def _rate_dtype(r: dict) -> str:
    """The dtype of the matmul rate a config's floor is over: recorded in ``floor_rate`` (its own dtype's) since
    the suite measures one per dtype; the bf16 rate, the run's only one, before."""
    return r["floor_rate"]["dtype"] if "floor_rate" in r else "bfloat16"


def _bf16_rate_floor(r: dict) -> bool:
    """A float32 config of a run from before ``floor_rate`` was recorded: its floor is over the bf16 matmul rate,
    far above the rate of the kernels' float32 (IEEE) products."""
    return "floor_ms" in r and "floor_rate" not in r and str(r.get("shape", "")).endswith(", float32")


def _note(lines: list, names: list, text: str) -> None:
    """A paragraph under the table about the configs ``names`` (none: no paragraph); ``{}`` in ``text`` names them."""
    if names:
        lines += ["", text.format(", ".join(f"`{n}`" for n in names))]


def _verdict(ok: bool) -> str:
    return "met" if ok else "missed"


def render(path: Path, before: Path | None) -> str:
    d = json.loads(path.read_text())
    rel = path.relative_to(ROOT).with_suffix("")
    rates = d.get("matmul_rates")  # one per dtype, since each config's floor is over its own dtype's rate
    rate_basis = ("the matmul rate of each config's own dtype (float32 at the kernels' IEEE precision)" if rates
                  else "the bf16 matmul rate")
    lines = [
        f"GPU, `bash benchmarks/gpu_check.sh` (the CUDA tests, then `benchmarks/gpu_suite.py` in one process: "
        f"correctness against float64 on the GPU, then `triton.testing.do_bench` medians; {rate_basis} "
        f"measured in the same run gives the FLOP floor `sum_g 2 |V*| d (2T + T+)`, `sum_g 2 |V*| d (T + T+)` with "
        f"logits given). {d['device']}, torch "
        f"{d['torch']}, triton {d['triton']}, {d['date']} ([results]({rel}.md)); matmul "
        + (", ".join(rate_label(r) for r in rates.values()) if rates else f"{d['matmul_tflops']:.0f} TFLOP/s") + ".",
        "",
        "| config | floor | triton | x floor | vs torch | vs naive | selection agreement | outside margin "
        "| peak scratch (bound) | host syncs per call | share of 1.5B fwd+bwd |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in d["configs"].items():
        if "error" in r:
            lines.append(f"| {name} | error: {r['error']} |||||||||")
            continue
        vs = lambda k, f: f.format(r[k]) if k in r else "-"  # noqa: E731
        lines.append(
            f"| `{name}` | {_ms(r['floor_ms'])} ms{' (' + _rate_dtype(r) + ')' if 'floor_rate' in r else ''} | "
            f"{_ms(r['triton_ms'])} ms | {r['triton_vs_floor']:.2f} | "
            f"{vs('speedup_vs_torch', '{:.1f}x')} | {vs('speedup_vs_naive', '{:.0f}x')} | "
            f"{r['selection_agreement']:.5f} | {r['disagreements_outside_margin']} | "
            f"{r.get('triton_peak_scratch_mb', 0):,.0f} MB ({r.get('scratch_bound_mb', 0):,.0f}) | "
            f"{r.get('host_syncs_public_call', '-')} | {r['share_of_fwd_bwd']:.2%} |")
    lines.append("")
    q = d["configs"].get(QWEN, {})
    verdicts = []
    if "triton_vs_floor" in q:
        verdicts.append(f"`{QWEN}` at {q['triton_vs_floor']:.2f}x its floor (target <= {FLOOR_TARGET:g}x): "
                        f"{_verdict(q['triton_vs_floor'] <= FLOOR_TARGET)}")
        verdicts.append(f"its share of the 1.5B model's forward+backward, measured in the same run, "
                        f"{q['share_of_fwd_bwd']:.2%} (target <= {SHARE_TARGET:.1%}): "
                        f"{_verdict(q['share_of_fwd_bwd'] <= SHARE_TARGET)}")
    counts = [r["host_syncs_public_call"] for r in d["configs"].values() if "host_syncs_public_call" in r]
    syncs = max(counts) if counts else None
    if syncs is not None:
        verdicts.append(f"host synchronisations per public call, worst config: {syncs} (target <= {SYNC_TARGET}): "
                        f"{_verdict(syncs <= SYNC_TARGET)}")
    slow = [n for n, r in d["configs"].items()
            if "triton_ms" in r and r["triton_ms"] > max(CONFIG_TARGET[0] * r["floor_ms"], CONFIG_TARGET[1])]
    verdicts.append(f"every config within max({CONFIG_TARGET[0]:g}x floor, {CONFIG_TARGET[1]:g} ms): "
                    + ("met" if not slow else "missed by " + ", ".join(f"`{n}`" for n in slow)))
    over = [n for n, r in d["configs"].items()
            if r.get("triton_peak_scratch_mb", 0) > r.get("scratch_bound_mb", float("inf"))]
    verdicts.append("peak scratch within the stated bound: " + ("met" if not over else "missed by " + ", ".join(over)))
    lines.append("Verdicts: " + "; ".join(verdicts) + ".")
    older = [n for n, c in d["configs"].items() if "speedup_vs_naive" in c and "naive_old_logprobs" not in c]
    _note(lines, older, "`vs naive` in this run: the naive pipeline computed the full-vocabulary normaliser in {} while "
          "triton used the old log-probs (the suite now times it in each config's own setting).")
    # runs before floor_formula was recorded counted, with logits given, the lm_head products the logits hold
    _note(lines, [n for n, r in d["configs"].items() if _old_logits_floor(r)],
          "The floor of {} in this run counts `2 N |V| d` and `2 |V*| d T` for lm_head products that the given logits "
          "already hold, so its x floor reads lower than against its FLOP floor `sum_g 2 |V*| d (T + T+)`, which the "
          "suite now uses.")
    # runs before floor_rate was recorded divided every floor by the bf16 matmul rate
    _note(lines, [n for n, r in d["configs"].items() if _bf16_rate_floor(r)],
          "The floor of {} in this run is over the bf16 matmul rate, though its float32 products run in IEEE float32 "
          "at a fraction of it, so on that count its floor reads low and its x floor high; the suite now divides each "
          "floor by its own dtype's rate (`floor_rate`).")
    _note(lines, [n for n in CONFIGS if n not in d["configs"]],
          "Not in this run (see the log beside the results): {}.")
    stale = changed(d.get("kernel_sources"), kernel_sources())
    if stale:
        lines.append("")
        lines.append(stale_note("Triton sources", "kernel_sources", "benchmarks/gpu_suite.py", stale))
    if before is not None:
        b = json.loads(before.read_text())
        # each run's time over its own floor (its own matmul rate): two runs are two machines, so their
        # absolute times are not compared; a config bound by the host moves with the host all the same
        # (and only over the same floor and rate: not across the change of the logits configs' floor, nor of
        # the rate from bf16 for every config to each config's own dtype's)
        pairs = [(n, b["configs"][n]["triton_vs_floor"], r["triton_vs_floor"]) for n, r in d["configs"].items()
                 if "triton_vs_floor" in r and "triton_vs_floor" in b["configs"].get(n, {})
                 and _old_logits_floor(r) == _old_logits_floor(b["configs"][n])
                 and _rate_dtype(r) == _rate_dtype(b["configs"][n])]
        if pairs:
            lines.append("")
            lines.append(f"Before, the previous results ([{before.stem}]({before.relative_to(ROOT).with_suffix('')}.md), "
                         f"{b['device']}, {b['date']}, other code, maybe another machine; each time over its own run's "
                         f"floor, since absolute times of two machines do not compare): "
                         + "; ".join(f"`{n}` {x:.2f}x -> {y:.2f}x" for n, x, y in pairs)
                         + ". The host-bound configs (milliseconds of launches and checks) move with the host.")
    return "\n".join(lines)


def block(readme: str) -> str:
    if BEGIN not in readme or END not in readme:
        raise AssertionError(f"README.md lacks the markers {BEGIN} ... {END}")
    return readme.split(BEGIN, 1)[1].split(END, 1)[0].strip("\n")


def rendered() -> str:
    files = gpu_results()
    if not files:
        raise SystemExit("no GPU results in benchmarks/results")
    return render(files[-1], files[-2] if len(files) > 1 else None)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 if the README differs")
    args = ap.parse_args(argv)
    readme, text = README.read_text(), rendered()
    if args.check:
        ok = block(readme) == text
        print("README GPU figures " + ("agree with" if ok else "differ from") + f" {gpu_results()[-1].name}")
        return 0 if ok else 1
    head, rest = readme.split(BEGIN, 1)
    README.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])
    print(f"README GPU figures rendered from {gpu_results()[-1].name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
