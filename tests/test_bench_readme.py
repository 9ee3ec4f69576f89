"""The README's CPU benchmark table is the committed results file, rendered (``benchmarks/report.py``)."""
from __future__ import annotations

import copy
import re
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import report  # noqa: E402


def test_readme_table_equals_results_file():
    readme = report.README.read_text()
    path = report.readme_results(readme)
    assert path.is_file(), f"README.md names {path}, which does not exist"
    assert report.readme_block_text(readme) == report.readme_block(path), (
        "README.md's CPU table differs from its results file: run `python -m benchmarks.report --render "
        f"{path.relative_to(report.ROOT)}`")
    records, machine = report.load(path)
    assert path.with_suffix(".md").read_text() == report.summary(records, machine)
    assert path.with_suffix(".png").is_file()


def test_an_edited_number_is_caught():
    readme = report.README.read_text()
    path = report.readme_results(readme)
    records, _ = report.load(path)
    edited = copy.deepcopy(records)
    row = next(r for r in edited if r["extra_info"].get("backend") == "native")
    row["stats"]["median"] *= 1.5
    machine = report.load(path)[1]
    assert report.body(edited, machine["threads"]) != report.body(records, machine["threads"])


def _row(shape, backend, logprobs, median, floor_flops, threads=2):
    info = dict(op="nthr_advantages", shape=shape, shape_text=shape, backend=backend, device="cpu",
                logprobs=logprobs, rounds=3, warmup=1, threads=threads, peak_scratch_bytes=2**20,
                floor_flops=floor_flops, algorithm_flops=int(0.8 * floor_flops))
    return {"stats": {"median": median, "min": median, "max": median}, "extra_info": info}


MATMUL = {"stats": {"median": 1.0, "min": 1.0, "max": 1.0},
          "extra_info": dict(op="matmul", device="cpu", dtype="float32", n=1000, flops=10**9)}


def test_targets_and_verdicts_where_they_apply():
    # 1 GFLOP/s: a floor of 10**9 FLOPs is 1 s
    recs = [MATMUL, _row("small", "native", True, 0.9, 10**9), _row("medium", "native", True, 0.9, 10**9),
            _row("medium", "torch", False, 2.5, 10**9), _row("medium", "naive", False, 5.0, 10**9)]
    lines = report.body(recs, threads=2)
    small = next(ln for ln in lines if ln.startswith("- `native`") and "Target" not in ln)
    assert "0.90x its FLOP floor: 10 % below it" in small
    medium = [ln for ln in lines if "Target" in ln]
    assert len(medium) == 2
    assert "Target <= 1.0x (issue 14): met" in medium[0]
    assert "2.50x its FLOP floor" in medium[1] and "Target <= 2.0x (issue 14): missed" in medium[1]
    assert any("| nthr_advantages | torch | none | 2,500 |" in ln and "2.0x faster" in ln for ln in lines)
    # at another thread count the target is named but not judged
    other = report.body([MATMUL, _row("medium", "native", True, 0.9, 10**9, threads=1)], threads=1)
    assert any("is stated at 2 threads; this run used 1" in ln for ln in other)
    assert not any("met" in ln.split("Target")[-1] for ln in other if "Target" in ln)


def test_checks_cost_line():
    """With both native rows (default checks, checks off) the report says what the checks cost."""
    on, off = _row("medium", "native", True, 0.050, 10**9), _row("medium", report.UNCHECKED[0], True, 0.040, 10**9)
    lines = report.body([MATMUL, on, off], threads=2)
    cost = [ln for ln in lines if ln.startswith("- Input checks")]
    assert len(cost) == 1 and "takes 10.0 ms more than with both off (20 % of the call" in cost[0]
    assert not any(ln.startswith("- Input checks") for ln in report.body([MATMUL, on], threads=2))


def test_checks_cost_line_when_the_unchecked_row_is_slower():
    """Where noise makes the unchecked row the slower one, the line says so instead of 'takes -2.44 ms more
    (-25 % of the call)' (what a loaded small run printed)."""
    on, off = _row("medium", "native", True, 0.040, 10**9), _row("medium", report.UNCHECKED[0], True, 0.050, 10**9)
    cost = [ln for ln in report.body([MATMUL, on, off], threads=2) if ln.startswith("- Input checks")]
    assert len(cost) == 1 and not re.search(r"-\d", cost[0]), cost[0]
    assert "took 10.0 ms less than with both off" in cost[0] and "does not measure what the checks cost" in cost[0]


def test_checks_cost_from_the_paired_ratios():
    """With paired rounds on both rows the checks' share comes from the paired ratios, so that a slow spell of the
    machine during the checked row is not reported as what the checks cost."""
    on, off = _row("medium", "native", True, 0.100, 10**9), _row("medium", report.UNCHECKED[0], True, 0.080, 10**9)
    on["extra_info"].update(paired_rates=[0.9e9] * 3, paired_times=[1.0] * 3)  # a slow spell: 0.90x
    off["extra_info"].update(paired_rates=[1.0e9] * 3, paired_times=[0.8] * 3)  # 0.80x
    cost = [ln for ln in report.body([MATMUL, on, off], threads=2) if ln.startswith("- Input checks")]
    assert len(cost) == 1 and "about 11 % of the call, from the two rows' paired ratios (0.90x with the checks, " \
        "0.80x without" in cost[0], cost[0]
    off["extra_info"]["paired_times"] = [0.95] * 3  # 0.95x: above the checked row's
    cost = [ln for ln in report.body([MATMUL, on, off], threads=2) if ln.startswith("- Input checks")]
    assert "the difference is noise" in cost[0] and not re.search(r"-\d", cost[0]), cost[0]


def test_floor_at_the_best_engine_and_each_backends_own_engine():
    """Where the native GEMM beats torch.mm, every floor is at the native rate, and a backend that multiplies
    with torch.mm also gets its ratio at torch.mm's rate (the target judged at both, never hidden)."""
    fast = copy.deepcopy(MATMUL)
    fast["extra_info"]["engine"] = "native"
    slow = copy.deepcopy(MATMUL)
    slow["stats"]["median"] = 2.0  # torch.mm at half the native rate
    rates = report.matmul_rates([slow, fast])
    assert rates["cpu"]["engine"] == "native" and rates["cpu"]["rate"] == 1e9
    assert rates["cpu"]["engines"] == {"native": (1e9, 1000), "torch": (5e8, 1000)}
    assert "every floor below is at this best rate" in " ".join(report.header(
        {"description": "x", "threads": 2, "triton": "-", "python": "-", "pytest_benchmark": "-",
         "load_avg_start": 0.0, "load_avg_end": 0.0}, rates))
    lines = report.body([slow, fast, _row("medium", "torch", True, 3.0, 10**9),
                         _row("medium", "native", True, 0.9, 10**9)], threads=2)
    torch_line = next(ln for ln in lines if ln.startswith("- `torch`"))
    assert "3.00x its FLOP floor" in torch_line and "1.50x the floor at the rate of torch.mm" in torch_line
    assert "Target <= 2.0x (issue 14): missed at the best rate; met at its own engine's rate" in torch_line
    native_line = next(ln for ln in lines if ln.startswith("- `native`"))
    assert "at the rate of" not in native_line and "Target <= 1.0x (issue 14): met" in native_line


def test_header_states_how_far_apart_the_best_products_passes_were():
    """The best rate is one product's fastest pass; its other pass says how much a shared machine's spells move
    the floors between runs (the reason to compare backends within one run)."""
    first, last = copy.deepcopy(MATMUL), copy.deepcopy(MATMUL)
    first["extra_info"]["when"], last["extra_info"]["when"] = "first", "last"
    last["stats"]["median"] = 1.25  # the same product at 0.8x in the other pass
    machine = {"description": "x", "threads": 2, "triton": "-", "python": "-", "pytest_benchmark": "-",
               "load_avg_start": 0.0, "load_avg_end": 0.0}
    text = " ".join(report.header(machine, report.matmul_rates([first, last])))
    assert "1.0 GFLOP/s (torch.mm" in text
    assert "The same product's passes ran at 0.8 and 1.0 GFLOP/s" in text and "(1.25x here)" in text
    assert "passes ran at" not in " ".join(report.header(machine, report.matmul_rates([first])))


def test_engine_faster_than_every_backends_own():
    """Where an engine no backend uses (oneDNN) is the fastest, the floors are at its rate and the native rows
    too get their ratio at their own GEMM's rate, with the target judged at both."""
    onednn = copy.deepcopy(MATMUL)
    onednn["extra_info"]["engine"] = "onednn"
    native = copy.deepcopy(MATMUL)
    native["extra_info"]["engine"] = "native"
    native["stats"]["median"] = 1.25  # the native GEMM at 0.8x oneDNN's rate
    rates = report.matmul_rates([native, onednn])
    assert rates["cpu"]["engine"] == "onednn" and rates["cpu"]["engines"]["native"] == (8e8, 1000)
    lines = report.body([native, onednn, _row("medium", "native", True, 1.1, 10**9)], threads=2)
    native_line = next(ln for ln in lines if ln.startswith("- `native`"))
    assert "1.10x its FLOP floor" in native_line and "0.88x the floor at the rate of the native ops' GEMM" in native_line
    assert "Target <= 1.0x (issue 14): missed at the best rate; met at its own engine's rate" in native_line


def test_figures_of_other_code_are_flagged(monkeypatch):
    """The results record the hashes of the library's sources; where the checkout's differ, the README's block
    says so and names the files (the table had gone on describing code that later commits changed)."""
    path = report.readme_results(report.README.read_text())
    recorded = dict(report.load(path)[1].get("library_sources") or {})
    assert recorded, "the results file records no library_sources"
    monkeypatch.setattr(report, "library_sources", lambda: dict(recorded))
    assert "These figures predate" not in report.readme_block(path)
    monkeypatch.setattr(report, "library_sources", lambda: {**recorded, "nthr_kernels/api.py": "0" * 64})
    block = report.readme_block(path)
    assert "These figures predate the current library sources" in block and "`nthr_kernels/api.py`" in block


def test_paired_ratio_from_each_rounds_own_rate():
    """With paired rounds (benchmarks/runner.py, Paired) each round's time is divided by the floor at the matrix
    rate measured right before it: the column and the verdict give the median over the rounds, and the target is
    judged on it as well as at the run's best rate; a record without paired rounds shows n/a."""
    row = _row("medium", "native", True, 1.2, 10**9)
    # the best rate of the run 1 GFLOP/s (MATMUL), the rounds ran at 1.2 s when the rate was 0.8 GFLOP/s
    row["extra_info"].update(paired_rates=[0.8e9, 0.9e9, 0.75e9], paired_times=[1.2, 1.1, 1.3],
                             paired_products=[["torch", 1000]] * 3)
    assert report.paired_ratios(row["extra_info"]) == pytest.approx([0.96, 0.99, 0.975])
    lines = report.body([MATMUL, row], threads=2)
    assert any(ln.startswith("| nthr_advantages | native | given | 1,200 |") and "| 1.20 | 0.97 |" in ln for ln in lines)
    verdict = next(ln for ln in lines if ln.startswith("- `native`"))
    assert "paired with the matrix rate of its own rounds: 0.97x (rounds 0.96..0.99, at 0.8..0.9 GFLOP/s)" in verdict
    assert "Target <= 1.0x (issue 14): missed; met paired" in verdict
    plain = report.body([MATMUL, _row("medium", "native", True, 1.2, 10**9)], threads=2)
    assert any("| 1.20 | n/a |" in ln for ln in plain)
    assert "paired" not in next(ln for ln in plain if ln.startswith("- `native`"))
    # rates and times that do not pair up are not paired
    row["extra_info"]["paired_times"] = [1.2]
    assert report.paired_ratios(row["extra_info"]) is None


def test_benchmark_json_option_as_a_path_or_an_open_file(tmp_path):
    """pytest-benchmark 5.2 hands ``--benchmark-json`` over as the open file (argparse.FileType), later
    releases as its path: the chart goes beside it either way (the summary crashed on 5.2.3 on the GPU)."""
    target = tmp_path / "run.json"
    assert report.json_path(str(target)) == target
    with open(target, "wb") as fh:
        assert report.json_path(fh) == target
    assert report.json_path(None) is None


def test_rows_of_a_device_without_a_measured_rate_say_why():
    cuda = _row("quarter", "triton", True, 0.02, 10**12)
    cuda["extra_info"]["device"] = "cuda"
    lines = report.body([MATMUL, cuda, _row("quarter", "native", True, 2.0, 10**9)], threads=2)
    table = [ln for ln in lines if ln.startswith("| nthr_advantages | triton")]
    assert len(table) == 1 and "| n/a | n/a |" in table[0]
    assert [ln for ln in lines if ln.startswith("- No matrix product")] == [
        "- No matrix product was timed on cuda in this run, so its rows have no floor: `benchmarks/test_matmul.py` "
        "measures the rate in the same session (`pytest benchmarks --benchmark-only` runs it)."]
