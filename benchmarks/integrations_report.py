"""The README's measured figures for the trainer integrations (section "Use it in your trainer"), written
from the results file of ``benchmarks/test_integrations.py``.

    python -m benchmarks.integrations_report                      # run the benchmark into
                                                                  #   benchmarks/results/integrations-<date>.json,
                                                                  #   then write the README's two blocks
    python -m benchmarks.integrations_report --render FILE.json   # only write the README's blocks from FILE.json
    python -m benchmarks.integrations_report --check              # exit 1 if the README differs from the file it names

The file is pytest-benchmark's own JSON (``--benchmark-json``): every figure is in a benchmark's
``extra_info`` (``test_trl_step[<mode>]``, ``test_verl_driver_vs_worker``); machine, versions and load
average in ``machine_info["nthr"]`` (``benchmarks/report.py``'s :func:`~benchmarks.report.machine_info`).
Each block sits between HTML-comment markers; ``tests/test_integrations_readme.py`` checks that the README
holds exactly what this module writes from the file the first block names.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import re
import textwrap
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"
BENCH = "benchmarks/test_integrations.py"
_WHO = "written by python -m benchmarks.integrations_report; tests/test_integrations_readme.py checks it"
BLOCKS = ("trl-integration-figures", "verl-integration-figures")


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}: begin ({_WHO}) -->", f"<!-- {name}: end -->"


def load(path: Path) -> tuple[dict, dict]:
    """``({benchmark name: extra_info}, machine_info["nthr"])`` of a results file."""
    data = json.loads(Path(path).read_text())
    return {b["name"]: b["extra_info"] for b in data["benchmarks"]}, data["machine_info"]["nthr"]


def _ms(s: float) -> str:
    x = 1e3 * s
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _gb(b: float) -> str:
    return f"{b / 1e9:.2f} GB"


def _mb(b: float) -> str:
    return f"{b / 1e6:.1f} MB" if b >= 1e6 else f"{b / 1e6:.2f} MB"


def _load_text(m: dict) -> str:
    return f"load average {m['load_avg_start']:.1f} at the start, {m['load_avg_end']:.1f} at the end"


def _wrap(text: str) -> str:
    """A paragraph wrapped at the README's width (never inside a word, a link or a table row)."""
    return textwrap.fill(text, width=105, break_long_words=False, break_on_hyphens=False)


def _rel(path: Path) -> str:
    path = Path(path).resolve()
    return path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.as_posix()


TRL_MODES = ("generate", "old_logps", "forward")
_MODE_TEXT = {"generate": "`generate`", "old_logps": "`old_logps`", "forward": "`forward` (extra forward)"}


def trl_block(path: Path) -> str:
    info, m = load(path)
    rows = {mode: info[f"test_trl_step[{mode}]"] for mode in TRL_MODES}
    x0 = rows["generate"]
    rel = _rel(path)
    lines = [
        f"Measured (`pytest {BENCH} --benchmark-only`, results file [`{rel}`]({rel}), written by "
        f"`python -m benchmarks.integrations_report`): CPU ({m['description'].split(',')[0]}, {m['cpus']} cores, "
        f"torch {m['torch']}), the tiny model of `examples/trl_train.py`, 8 prompts x 4 generations, up to 24 new "
        f"tokens; one training step = generate, score, advantages, one loss forward/backward; NTHRGRPOTrainer "
        f"over GRPOTrainer, same config, same batch, medians of {x0['rounds']} interleaved rounds in one run, "
        f"{x0['threads']} thread; a shared machine ({_load_text(m)}), so compare ratios only:",
        "",
        "| capture | GRPOTrainer step | NTHRGRPOTrainer step | ratio | `nthr_advantages` | NTHR's work after TRL's batch |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for mode, x in rows.items():
        lines.append(f"| {_MODE_TEXT[mode]} | {_ms(x['grpo_s'])} ms | {_ms(x['nthr_s'])} ms | {x['ratio']:.2f} | "
                     f"{_ms(x['kernel_s'])} ms | {_ms(x['after_batch_s'])} ms |")
    lines += [
        "",
        "The last two columns are medians over the same rounds, timed inside NTHRGRPOTrainer's step: the "
        "kernel call, and the trainer's work once TRL's batch is ready (reading the capture, the kernel, "
        "bookkeeping; in `forward` mode also the extra forward). With a model this small (32-wide, 2 layers) "
        "every fixed cost is a visible share; the rest of the step difference lies inside TRL's own passes "
        "(the capture hooks, where a mode has them) or is this machine's noise; rounds this few do not separate "
        "the two.",
    ]
    return "\n".join(line if line.startswith("|") else _wrap(line) for line in lines)


def verl_block(path: Path) -> str:
    info, m = load(path)
    x = info["test_verl_driver_vs_worker"]
    q, f, s = x["qwen_shape"], x["qwen_formula"], x["verl_shape"]
    driver_lo = f["driver_hidden_unpadded"] + f["driver_weight"]
    driver_hi = f["driver_hidden_padded"] + f["driver_weight"]
    rel = _rel(path)
    lines = [
        f"Bytes the workers send the driver per step at qwen1.5b-step (64 groups x 8 responses, lengths "
        f"256..1792, d = {q['d']}, |V| = {q['vocab']}, bf16; computed from the formula, `transfer_bytes_per_step` "
        f"in the benchmark, not measured): driver side {_gb(f['driver_hidden_unpadded'])} of hidden states "
        f"({_gb(f['driver_hidden_padded'])} as verl's padded `[bs, R, d]`) plus {_mb(f['driver_weight'])} of "
        f"weight, {_gb(driver_lo)} to {_gb(driver_hi)} in all; worker side {_mb(f['worker_scale'])} "
        f"(`nthr_scale`, float32, padded). Among the workers the distributed path moves about "
        f"`4 * d * sum |V*|` bytes over the groups that straddle workers: verl's default "
        f"`trainer.balance_batch=True` reorders the batch by length before its contiguous dispatch, so most "
        f"groups straddle (the \"responses at random\" row below); with `balance_batch=False` at most one "
        f"group per cut does.",
        f"Measured on CPU (`test_verl_driver_vs_worker`, results file [`{rel}`]({rel}): {s['n_groups']} groups "
        f"x {s['group_size']}, lengths {s['lengths'][0]}..{s['lengths'][1]}, d = {s['d']}, |V| = {s['vocab']}, "
        f"one thread per process, groups cut at the rank boundary, medians of {x['rounds']} rounds, "
        f"{_load_text(m)}): the driver side ships {_mb(x['bytes_driver_tiny'])} (bf16 hidden states and "
        f"weight, serialised) and takes {_ms(x['driver_s'])} ms (native backend; {_ms(x['driver_torch_s'])} ms "
        f"with the torch backend); the worker side ships {_mb(x['bytes_worker_tiny'])} and takes "
        f"{_ms(x['worker_s'])} ms on {x['world']} gloo ranks (the distributed path runs the torch backend), so "
        f"driver/worker = {x['ratio']:.2f} ({x['ratio_torch']:.2f} with the torch backend on both).",
    ]
    if x["ratio"] < 1:
        lines.append("On CPU the worker side buys no compute; what it removes is the transfer and the driver's "
                     "CPU work, which on verl's GPU workers becomes GPU work (not measured here: no GPU in this run).")
    else:
        lines.append("What the worker side removes is the transfer and the driver's CPU work, which on verl's GPU "
                     "workers becomes GPU work (not measured here: no GPU in this run).")
    return _wrap(" ".join(lines))


def blocks(path: Path) -> dict[str, str]:
    return {"trl-integration-figures": trl_block(path), "verl-integration-figures": verl_block(path)}


def block_text(readme: str, name: str) -> str:
    begin, end = markers(name)
    if begin not in readme or end not in readme:
        raise ValueError(f"README.md: no {name} markers")
    return readme.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def readme_results(readme: str) -> Path:
    """The results JSON the README's blocks were written from (the file the TRL block names)."""
    found = re.search(r"\[`(benchmarks/results/integrations-[^`]+\.json)`\]", block_text(readme, BLOCKS[0]))
    if found is None:
        raise ValueError("README.md: the TRL integration figures name no results file")
    return ROOT / found.group(1)


def render_readme(readme: str, path: Path) -> str:
    for name, text in blocks(path).items():
        begin, end = markers(name)
        head, rest = readme.split(begin, 1)
        _, tail = rest.split(end, 1)
        readme = f"{head}{begin}\n{text}\n{end}{tail}"
    return readme


def differences(readme: str, path: Path) -> list[str]:
    """Names of the blocks whose README text differs from what ``path`` gives."""
    return [name for name, text in blocks(path).items() if block_text(readme, name) != text]


def run(out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / BENCH), "--benchmark-only", "-s",
           f"--benchmark-json={out}"]
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--render", type=Path, help="only write the README's blocks from this results JSON")
    ap.add_argument("--check", action="store_true", help="compare the README with the file it names; exit 1 if not")
    args = ap.parse_args(argv)
    readme = README.read_text()
    if args.check:
        path = readme_results(readme)
        diff = differences(readme, path)
        print(f"README.md differs from {_rel(path)} in: {', '.join(diff)}" if diff
              else f"README.md agrees with {_rel(path)}")
        return 1 if diff else 0
    path = args.render or run(RESULTS / f"integrations-{_dt.datetime.now(_dt.timezone.utc).date().isoformat()}.json")
    README.write_text(render_readme(readme, path))
    print(f"README.md: {', '.join(BLOCKS)} written from {_rel(path)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
