"""The benchmark report: one summary table per shape, from pytest-benchmark's records, and the command
that regenerates the committed CPU results and the README's table from them.

    python -m benchmarks.report                      # run the suite (medium, 2 threads), then write
                                                     #   benchmarks/results/cpu-<date>.{json,md,png}
                                                     #   and the README's CPU table
    python -m benchmarks.report --render FILE.json   # only the .md, .png and README table of FILE.json

The same :func:`summary` ends ``pytest benchmarks --benchmark-only`` (``benchmarks/conftest.py``).
The records are pytest-benchmark's own (``--benchmark-json``): each benchmark's ``stats`` and the
``extra_info`` that ``benchmarks/runner.py`` fills in; machine, threads and versions sit in the
file's ``machine_info["nthr"]`` (:func:`machine_info`).
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional

from benchmarks.provenance import changed, library_sources, stale_note

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
README_BEGIN = "<!-- cpu-benchmark-table: begin (written by python -m benchmarks.report; tests/test_bench_readme.py checks it) -->"
README_END = "<!-- cpu-benchmark-table: end -->"

# Issue 14's targets, "x floor" at most, stated for the medium shape at 2 threads:
# (shape, backend, with old log-probs) -> bound. Printed only on the rows they apply to.
TARGET_SHAPE, TARGET_THREADS = "medium", 2
TARGETS = {("native", True): 1.0, ("native", False): 1.2, ("torch", True): 2.0, ("torch", False): 2.0}
UNCHECKED = ("native-unchecked", "native")  # the row with check_finite=False, check_logprobs=False; its default row
VERDICT_BACKENDS = ("torch", "native", UNCHECKED[0], "triton")  # rows of nthr_advantages with a plain-words line


def machine_info(load_at_start: Optional[float] = None) -> dict:
    """Machine, thread count, versions and load average, as stored in the JSON and printed on top."""
    import torch

    from nthr_kernels.demo_synthetic import machine_description

    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "not installed"
    import pytest_benchmark

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {
        "description": machine_description(),
        "native_gemm": _native_gemm(),
        "cpus": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "python": platform.python_version(),
        "pytest_benchmark": pytest_benchmark.__version__,
        "load_avg_start": load if load_at_start is None else load_at_start,
        "load_avg_end": load,
        "library_sources": library_sources(),  # which code this run measured (the README notes a change)
    }


def _native_gemm() -> Optional[str]:
    """The native ops' GEMM engine on this machine (None where the native backend is not available)."""
    from nthr_kernels.ops import native_lib
    from nthr_kernels.registry import native_available

    return native_lib.gemm_engine() if native_available() else None


def _ms(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _mib(b: Optional[int]) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.1f} MiB"


def _info(r: dict) -> dict:
    return r["extra_info"]


def matmul_rates(records: list[dict]) -> dict[str, dict]:
    """Per device the best matrix-unit rate (FLOP/s) of the run, with the engine, size and dtype that gave
    it, under ``"engines"`` each engine's best ``(rate, n)`` (records without an engine: ``torch``), and under
    ``"passes"`` the rates of every pass of each ``(engine, n)``."""
    best: dict[str, dict] = {}
    for r in records:
        x = _info(r)
        if x.get("op") == "matmul":
            rate, engine = x["flops"] / r["stats"]["median"], x.get("engine", "torch")
            dev = best.setdefault(x["device"], {"rate": 0.0, "engines": {}, "passes": {}})
            dev["passes"].setdefault((engine, x["n"]), []).append(rate)
            if rate > dev["engines"].get(engine, (0.0, 0))[0]:
                dev["engines"][engine] = (rate, x["n"])
            if rate > dev["rate"]:
                dev.update(rate=rate, n=x["n"], dtype=x["dtype"], engine=engine)
    return best


_ENGINE_TEXT = {"torch": "torch.mm (the BLAS torch ships)", "native": "the native ops' GEMM (`nthr::native_mm`)",
                "onednn": "oneDNN's inner product (a rate only: no backend uses it)"}


def _lp_text(x: dict) -> str:
    return {True: "given", False: "none", None: "-"}[x["logprobs"]]


def _row_label(x: dict) -> str:
    lp = {True: " with old log-probs", False: " without old log-probs", None: ""}[x["logprobs"]]
    return f"`{x['backend']}`{lp}"


def _ratio(r: float) -> str:
    return f"{r:.2f}" if r < 10 else f"{r:.1f}" if r < 100 else f"{r:,.0f}"


def _engine(x: dict) -> str:
    """The matrix engine a row's backend multiplies with (test_matmul's engines): the native GEMM for the
    native backend's rows (UNCHECKED's two), torch.mm for the others."""
    return "native" if x["backend"] in UNCHECKED else "torch"


def paired_ratios(x: dict) -> Optional[list[float]]:
    """Each measured round's time over the floor at the matrix rate measured right before that round
    (``runner.Paired``); None for a record without paired rounds (smoke runs, older results files)."""
    rates, times = x.get("paired_rates"), x.get("paired_times")
    if not rates or not times or len(rates) != len(times) or "floor_flops" not in x:
        return None
    return [t * rate / x["floor_flops"] for t, rate in zip(times, rates)]


def _paired_text(x: dict, ps: Optional[list[float]]) -> str:
    """The verdict's clause on the row's paired ratios ``ps`` (:func:`paired_ratios`)."""
    if ps is None:
        return ""
    rates = x["paired_rates"]
    return (f"; paired with the matrix rate of its own rounds: {_ratio(statistics.median(ps))}x (rounds "
            f"{_ratio(min(ps))}..{_ratio(max(ps))}, at {min(rates) / 1e9:,.1f}..{max(rates) / 1e9:,.1f} GFLOP/s)")


def _verdict(x: dict, ps: Optional[list[float]], median: float, floor_s: float, alg_s: float, threads: int,
             unit: dict) -> str:
    r = median / floor_s
    r_paired = statistics.median(ps) if ps else None
    # where the best rate is another engine's: the ratio at the rate of the engine this backend can use
    own = unit["engines"].get(_engine(x)) if unit.get("engine") != _engine(x) else None
    r_own = median / (floor_s * unit["rate"] / own[0]) if own else None
    if r >= 2:
        text = f"{_ratio(r)}x its FLOP floor: the matrix unit would do the floor's FLOPs in 1/{r:.0f} of this time"
    elif r >= 1:
        text = (f"{r:.2f}x its FLOP floor: {100 * (r - 1):.0f} % above the time this machine's matrix unit needs "
                f"for the floor's FLOPs (every token scored, issue 14's definition; its own algorithm needs fewer)")
    else:
        text = (f"{r:.2f}x its FLOP floor: {100 * (1 - r):.0f} % below it, which only an algorithm doing fewer "
                f"FLOPs allows (its algorithm: {alg_s / floor_s:.2f}x the floor's FLOPs)")
    text += f"; {_ratio(median / alg_s)}x the time the FLOPs of its own algorithm need" + _paired_text(x, ps)
    if r_own is not None:
        text += (f"; {_ratio(r_own)}x the floor at the rate of {_ENGINE_TEXT[_engine(x)]}, the matrix engine it "
                 f"multiplies with ({own[0] / 1e9:,.0f} GFLOP/s)")
    bound = TARGETS.get((x["backend"], x["logprobs"])) if x["shape"] == TARGET_SHAPE else None
    if bound is not None:
        if threads == TARGET_THREADS:
            met = "met" if r <= bound else "missed"
            if r_own is not None and r > bound:
                met += f" at the best rate; {'met' if r_own <= bound else 'missed'} at its own engine's rate"
            if r_paired is not None:
                met += f"; {'met' if r_paired <= bound else 'missed'} paired"
            text += f". Target <= {bound:.1f}x (issue 14): {met}"
        else:
            text += f". (Target <= {bound:.1f}x is stated at {TARGET_THREADS} threads; this run used {threads})"
    return f"- {_row_label(x)}: {text}."


def _own_algorithm_flops(x: dict) -> int:
    """The FLOPs of the algorithm the row's backend runs (the native backend's own per-group paths)."""
    native = _engine(x) == "native" and "native_algorithm_flops" in x
    return x["native_algorithm_flops"] if native else x["algorithm_flops"]


def _checks_cost(rows: list[dict]) -> list[str]:
    """The plain-words line on what the default input checks cost (UNCHECKED's two rows, old log-probs given):
    from the two rows' paired ratios where both have them (each round against the matrix rate of its own moment,
    so a slow spell during one row does not count as the checks' cost), else from their medians."""
    lp_rows = {_info(r)["backend"]: r for r in rows if _info(r)["op"] == "nthr_advantages" and _info(r)["logprobs"] is True}
    med = {b: r["stats"]["median"] for b, r in lp_rows.items()}
    off, on = (med.get(b) for b in UNCHECKED)
    if off is None or on is None:
        return []
    head = f"- Input checks: `{UNCHECKED[1]}` with old log-probs and the default checks (`check_finite`, `check_logprobs`)"
    p_off, p_on = (paired_ratios(_info(lp_rows[b])) for b in UNCHECKED)
    if p_off and p_on:
        p_off, p_on = statistics.median(p_off), statistics.median(p_on)
        medians = (f"their medians, {_ms(1e3 * on)} and {_ms(1e3 * off)} ms, also differ by the machine's spells "
                   f"during each row")
        if p_on < p_off:
            return [f"{head}: its paired ratio, {_ratio(p_on)}x, is below the `{UNCHECKED[0]}` row's "
                    f"{_ratio(p_off)}x in this run: the difference is noise, so this run does not measure what the "
                    f"checks cost ({medians})."]
        return [f"{head}: about {100 * (1 - p_off / p_on):.0f} % of the call, from the two rows' paired ratios "
                f"({_ratio(p_on)}x with the checks, {_ratio(p_off)}x without, the `{UNCHECKED[0]}` row; "
                f"{medians})."]
    if on < off:  # checks cannot save time: the two medians differ by the run's noise, not by the checks
        return [f"{head} took {_ms(1e3 * (off - on))} ms less than with both off (the `{UNCHECKED[0]}` row) in this "
                f"run: the difference is noise, so this run does not measure what the checks cost."]
    return [f"{head} takes {_ms(1e3 * (on - off))} ms more than with both off ({100 * (on - off) / on:.0f} % "
            f"of the call; the `{UNCHECKED[0]}` row)."]


def shape_section(records: list[dict], shape: str, rates: dict, threads: int) -> list[str]:
    """Markdown lines of one shape: FLOP counts, the table (every op and provider), plain-words verdicts."""
    rows = [r for r in records if _info(r).get("shape") == shape and "floor_flops" in _info(r)]
    x0 = _info(rows[0])
    lines = [f"### {x0['shape_text']}", ""]
    adv = {_info(r)["logprobs"]: _info(r) for r in rows if _info(r)["op"] == "nthr_advantages"}
    if True in adv:
        a = adv[True]
        unit = rates.get(a["device"])
        ms = (lambda f: f" = {_ms(1e3 * f / unit['rate'])} ms at the matrix rate") if unit else (lambda f: "")
        lines.append(
            f"FLOP floor with old log-probs (`sum_g 2 |V*| d (2T + T+)`, every token scored): "
            f"{a['floor_flops'] / 1e9:.2f} GFLOP{ms(a['floor_flops'])}. The algorithm with "
            f"`score_positive=False` (`sum_g 2 |V*| d (T + T+ + T-) + 2 n+ |V*| d`): "
            f"{a['algorithm_flops'] / 1e9:.2f} GFLOP ({a['algorithm_flops'] / a['floor_flops']:.2f}x)."
            + (f" The native backend's, with its per-group pairwise path (groups with few positive tokens): "
               f"{a['native_algorithm_flops'] / 1e9:.2f} GFLOP ({a['native_algorithm_flops'] / a['floor_flops']:.2f}x)."
               if "native_algorithm_flops" in a else "")
        )
        if False in adv:
            lse = adv[False]["floor_flops"] - a["floor_flops"]
            lines.append(f"Without old log-probs both add `2 N |V| d` = {lse / 1e9:.1f} GFLOP (the full-vocabulary "
                         f"normaliser): floor {adv[False]['floor_flops'] / 1e9:.1f} GFLOP{ms(adv[False]['floor_flops'])}.")
        lines.append("")
    lines += [
        "| op | backend | old log-probs | median ms | min..max ms | vs naive | floor ms | x floor | x floor, paired | peak scratch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    # each row against the naive pipeline in the same setting (old log-probs given or not): the same work
    naive = {(_info(r)["op"], _info(r)["logprobs"]): r["stats"]["median"] for r in rows if _info(r)["backend"] == "naive"}
    verdicts = []
    for r in rows:
        x, st = _info(r), r["stats"]
        rate = rates.get(x["device"], {}).get("rate")
        floor_s = x["floor_flops"] / rate if rate else None
        vs = naive.get((x["op"], x["logprobs"]))
        x_floor = _ratio(st["median"] / floor_s) if floor_s else "n/a"
        ps = paired_ratios(x)
        x_paired = _ratio(statistics.median(ps)) if ps else "n/a"
        vs_text = "1" if x["backend"] == "naive" else "-" if vs is None else (
            f"{vs / st['median']:.1f}x faster" if vs >= st["median"] else f"{st['median'] / vs:.2f}x slower")
        lines.append(
            f"| {x['op']} | {x['backend']}{'' if x['device'] == 'cpu' else ' (' + x['device'] + ')'} | "
            f"{_lp_text(x)} | {_ms(1e3 * st['median'])} | {_ms(1e3 * st['min'])}..{_ms(1e3 * st['max'])} | "
            f"{vs_text} | {_ms(1e3 * floor_s) if floor_s else 'n/a'} | "
            f"{x_floor} | {x_paired} | "
            f"{_mib(x['peak_scratch_bytes'])} |"
        )
        if floor_s and x["op"] == "nthr_advantages" and x["backend"] in VERDICT_BACKENDS:
            verdicts.append(_verdict(x, ps, st["median"], floor_s, _own_algorithm_flops(x) / rate, threads,
                                     rates[x["device"]]))
    verdicts += _checks_cost(rows)
    unrated = sorted({_info(r)["device"] for r in rows} - set(rates))
    verdicts += [f"- No matrix product was timed on {dev} in this run, so its rows have no floor: "
                 f"`benchmarks/test_matmul.py` measures the rate in the same session (`pytest benchmarks "
                 f"--benchmark-only` runs it)." for dev in unrated]
    rounds = {(_info(r)["rounds"], _info(r)["warmup"]) for r in rows}
    timing = ", ".join(f"median of {n} rounds after {w} warm-up" for n, w in sorted(rounds))
    lines += ["", f"Every row: {timing}, {x0['threads']} threads; peak scratch = rise of the peak resident "
                  "memory during one more call (buffers that stay allocated from the warm-up on, such as the native "
                  "GEMM's per-thread packing buffers, are not in it); x floor = median / (FLOP floor / matrix rate); "
                  "x floor, paired = the median over the measured rounds of each round's time / (FLOP floor / the "
                  "best rate of the matrix products timed right before that round: every size and engine of the "
                  "header, once each), so that the time and the rate come from the same spell of a shared machine.",
              ""]
    return lines + verdicts + ([""] if verdicts else [])


def _interval(xs: list[float], scale: float, fmt: str) -> str:
    return f"{format(scale * statistics.median(xs), fmt)} (range {format(scale * min(xs), fmt)}..{format(scale * max(xs), fmt)})"


def grpo_section(records: list[dict]) -> list[str]:
    steps = {_info(r)["method"]: r for r in records if _info(r).get("op") == "grpo_step"}
    if "nthr" not in steps:
        return []
    x = _info(steps["nthr"])
    n = len(x["nthr_share"])
    line = (f"{x['responses']} responses ({x['tokens']:,} tokens), small untrained Qwen2, {x['threads']} threads: "
            f"NTHR takes {_interval(x['nthr_s'], 1e3, '.2f')} ms of a step whose rollout takes "
            f"{_interval(x['rollout_s'], 1e3, '.0f')} ms and update {_interval(x['update_s'], 1e3, '.0f')} ms: "
            f"a share of {_interval(x['nthr_share'], 100, '.2f')} % over {n} rounds")
    if "grpo" in steps:
        line += (f"; whole step {_ms(1e3 * steps['nthr']['stats']['median'])} ms with NTHR, "
                 f"{_ms(1e3 * steps['grpo']['stats']['median'])} ms without (medians)")
    return ["### NTHR's share of a step of the reference GRPO loop (`nthr_kernels.grpo`)", "",
            line + ". The paper: 22 s of a 522 s step, about 4 %, on Qwen2.5-Math-1.5B with 256 x 8 rollouts.", ""]


def header(machine: dict, rates: dict) -> list[str]:
    m = machine
    lines = [
        f"Machine: {m['description']}.",
        f"Threads: {m['threads']}; triton {m['triton']}, Python {m['python']}, pytest-benchmark "
        f"{m['pytest_benchmark']}; load average {m['load_avg_start']:.1f} at the start, {m['load_avg_end']:.1f} "
        f"at the end (on a shared machine other processes compete for the cores)."
        + (f" Native GEMM engine: `{m['native_gemm']}`." if m.get("native_gemm") else ""),
    ]
    for dev, r in sorted(rates.items()):
        each = "; ".join(f"{_ENGINE_TEXT.get(e, e)} {rate / 1e9:,.1f} at {n}^3" for e, (rate, n) in sorted(r["engines"].items()))
        lines.append(f"Matrix unit ({dev}, {r['dtype']}, best of the sizes, engines and passes (before and after "
                     f"the ops) timed in this run): "
                     f"{r['rate'] / 1e9:,.1f} GFLOP/s ({each}); every floor below is at this best rate."
                     + _passes_text(r))
    return lines + [""]


def _passes_text(r: dict) -> str:
    """How far apart the passes of the best rate's own product were: the machine's spells, in words."""
    passes = sorted(r["passes"].get((r["engine"], r["n"]), []))
    if len(passes) < 2 or passes[0] <= 0:
        return ""
    return (f" The same product's passes ran at {' and '.join(f'{p / 1e9:,.1f}' for p in passes)} GFLOP/s: on a "
            f"shared machine this best rate, and with it every \"x floor\", moves between runs "
            f"({passes[-1] / passes[0]:.2f}x here); compare backends within one run.")


def shapes_of(records: list[dict]) -> list[str]:
    return list(dict.fromkeys(_info(r)["shape"] for r in records if "floor_flops" in _info(r)))


def body(records: list[dict], threads: int) -> list[str]:
    """One section per shape, then the GRPO-step share."""
    rates = matmul_rates(records)
    lines = []
    for s in shapes_of(records):
        lines += shape_section(records, s, rates, threads)
    return lines + grpo_section(records)


def summary(records: list[dict], machine: dict) -> str:
    """The whole report as markdown: header (machine, threads, versions, load, matrix rate), body."""
    lines = ["# nthr-kernels benchmarks", ""] + header(machine, matmul_rates(records)) + body(records, machine["threads"])
    return "\n".join(lines).rstrip() + "\n"


def load(path: Path) -> tuple[list[dict], dict]:
    data = json.loads(Path(path).read_text())
    return data["benchmarks"], data["machine_info"]["nthr"]


def readme_block(path: Path) -> str:
    """The README's CPU table: the shape sections of a results file, under a line naming it."""
    records, machine = load(path)
    rel = Path(path).resolve().relative_to(ROOT).with_suffix(".md").as_posix()
    lines = [f"Results file [`{rel}`]({rel}), written by `python -m benchmarks.report`; "
             f"{machine['description']}."] + header(machine, matmul_rates(records))[1:]
    stale = changed(machine.get("library_sources"), library_sources())
    if stale:
        lines += [stale_note("library sources", "library_sources", "benchmarks/provenance.py", stale), ""]
    return "\n".join(lines + body(records, machine["threads"])).rstrip()


def readme_block_text(readme: str) -> str:
    """What the README holds between its table markers."""
    return readme.split(README_BEGIN, 1)[1].split(README_END, 1)[0].strip("\n")


def readme_results(readme: str) -> Path:
    """The results JSON the README's CPU table was written from (the file its first line names)."""
    m = re.search(r"\[`(benchmarks/results/[^`]+)\.md`\]", readme_block_text(readme))
    if m is None:
        raise ValueError("README.md: the CPU benchmark table names no results file")
    return ROOT / f"{m.group(1)}.json"


def write_readme(path: Path, readme: Path = README) -> None:
    text = readme.read_text()
    head, rest = text.split(README_BEGIN, 1)
    _, tail = rest.split(README_END, 1)
    readme.write_text(f"{head}{README_BEGIN}\n{readme_block(path)}\n{README_END}{tail}")


def chart(records: list[dict], out: Path) -> None:
    """A PNG bar chart per shape: each row's median beside its FLOP floor (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = matmul_rates(records)
    shapes = shapes_of(records)
    fig, axes = plt.subplots(len(shapes), 1, figsize=(9, 0.45 * len(records) + 1.5), squeeze=False)
    for ax, s in zip(axes[:, 0], shapes):
        rows = [r for r in records if _info(r).get("shape") == s and "floor_flops" in _info(r)]
        words = {"given": ", old log-probs", "none": ", no old log-probs", "-": ""}
        labels = [f"{_info(r)['op']} {_info(r)['backend']}{words[_lp_text(_info(r))]}" for r in rows]
        med = [1e3 * r["stats"]["median"] for r in rows]
        floor = [1e3 * _info(r)["floor_flops"] / rates[_info(r)["device"]]["rate"] if _info(r)["device"] in rates
                 else 0.0 for r in rows]
        y = range(len(rows))
        ax.barh([i + 0.2 for i in y], med, height=0.4, label="median")
        ax.barh([i - 0.2 for i in y], floor, height=0.4, label="FLOP floor at the measured matrix rate")
        ax.set_yticks(list(y), labels, fontsize=8)
        ax.set_xscale("log")
        ax.invert_yaxis()
        ax.set_xlabel("ms (log scale)")
        ax.set_title(f"{_info(rows[0])['shape_text']}, {_info(rows[0])['threads']} threads", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def json_path(option) -> Optional[Path]:
    """The file of pytest-benchmark's ``--benchmark-json``: the option holds its path in recent releases and
    the file itself, opened by argparse, in 5.2 and before (the GPU image's 5.2.3)."""
    return Path(getattr(option, "name", option)) if option else None


def render(path: Path, update_readme: bool = True) -> None:
    """Write ``<path>.md`` and ``<path>.png`` from a results JSON (and the README's table)."""
    path = Path(path)
    records, machine = load(path)
    path.with_suffix(".md").write_text(summary(records, machine))
    chart(records, path.with_suffix(".png"))
    if update_readme:
        write_readme(path)


def run(shapes: str, threads: int, out: Path) -> Path:
    """Run ``pytest benchmarks --benchmark-only`` on ``shapes`` at ``threads`` threads into ``out``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "NTHR_BENCH_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / "benchmarks"), "--benchmark-only",
           f"--benchmark-json={out}", f"--shapes={shapes}"]
    print("+ NTHR_BENCH_THREADS=%d %s" % (threads, " ".join(cmd)), flush=True)
    subprocess.run(cmd, cwd=ROOT, env=env, check=True)
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="medium", help="comma-separated shapes to run (default: medium)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    ap.add_argument("--render", type=Path, help="only render this results JSON")
    ap.add_argument("--no-readme", action="store_true", help="leave README.md alone")
    args = ap.parse_args(argv)
    path = args.render or run(args.shapes, args.threads,
                              RESULTS / f"cpu-{_dt.datetime.now(_dt.timezone.utc).date().isoformat()}.json")
    render(path, update_readme=not args.no_readme)
    print(path.with_suffix(".md").read_text())


if __name__ == "__main__":
    main()
