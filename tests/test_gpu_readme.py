"""The README's GPU figures are the newest committed GPU results file, rendered by
``benchmarks/gpu_readme.py`` (so no GPU figure in the README is typed by hand)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import gpu_readme  # noqa: E402


def test_readme_gpu_block_is_the_newest_results_rendered():
    assert gpu_readme.block(gpu_readme.README.read_text()) == gpu_readme.rendered(), (
        "README.md's GPU figures differ from the newest GPU results: run `python -m benchmarks.gpu_readme`")


def test_rendering_follows_the_file(tmp_path, monkeypatch):
    """A changed figure in the results file changes the rendered block (the test above can fail)."""
    newest = gpu_readme.gpu_results()[-1]
    d = json.loads(newest.read_text())
    name = next(iter(d["configs"]))
    d["configs"][name]["triton_ms"] = 12345.0
    (tmp_path / newest.name).write_text(json.dumps(d))
    monkeypatch.setattr(gpu_readme, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_readme, "ROOT", tmp_path)
    assert "12,345 ms" in gpu_readme.rendered()


def _two_runs(tmp_path, monkeypatch):
    """The newest committed run twice, to edit: as the previous run (dated before it) and as the newest."""
    newest = gpu_readme.gpu_results()[-1]
    monkeypatch.setattr(gpu_readme, "RESULTS", tmp_path)
    monkeypatch.setattr(gpu_readme, "ROOT", tmp_path)
    d = json.loads(newest.read_text())
    prev = json.loads(newest.read_text())
    prev["date"] = "2000-01-01"

    def write():
        (tmp_path / "h200-2000-01-01.json").write_text(json.dumps(prev))
        (tmp_path / newest.name).write_text(json.dumps(d))
        return gpu_readme.rendered()

    return prev, d, write


def _before(text: str) -> str:
    return text.split("Before, the previous results")[1]


def test_a_logits_floor_of_an_older_run_is_flagged(tmp_path, monkeypatch):
    """A run whose logits config's floor counted the lm_head products the logits hold (no ``floor_formula``
    recorded) says so under the table; a run with the suite's current floor does not, and its x floor of that
    config is not compared with the previous run's (over the old floor)."""
    prev, d, write = _two_runs(tmp_path, monkeypatch)
    name = next(n for n, r in d["configs"].items() if r.get("logits_input") and "floor_ms" in r)
    assert "triton_vs_floor" in prev["configs"][name]
    for run in (prev, d):
        run["configs"][name].pop("floor_formula", None)
    text = write()
    assert f"The floor of `{name}` in this run counts `2 N |V| d`" in text
    assert f"`{name}` " in _before(text)  # old floor against old floor
    d["configs"][name]["floor_formula"] = "sum_g 2 |V*| d (T + T+)"
    text = write()
    assert "in this run counts `2 N |V| d`" not in text
    assert f"`{name}` " not in _before(text)


def test_floors_over_each_dtypes_rate_are_rendered_and_older_ones_flagged(tmp_path, monkeypatch):
    """A run that records each config's ``floor_rate`` shows the rates and each floor's dtype; a float32 config
    of a run without it (every floor over the bf16 rate) is flagged under the table, and its x floor is not
    compared with a run over another rate."""
    prev, d, write = _two_runs(tmp_path, monkeypatch)
    name = next(n for n, r in d["configs"].items() if r.get("shape", "").endswith(", float32") and "floor_ms" in r)
    assert d["configs"][name]["floor_rate"]["dtype"] == "float32"
    rates = d["matmul_rates"]
    for run in (prev, d):  # both runs as they were before floor_rate: every floor over the bf16 rate
        run.pop("matmul_rates")
        for r in run["configs"].values():
            r.pop("floor_rate", None)
    text = write()
    assert f"The floor of `{name}` in this run is over the bf16 matmul rate" in text
    assert f"`{name}` " in _before(text)  # bf16 rate against bf16 rate
    d["matmul_rates"] = rates
    for n, r in d["configs"].items():
        if "floor_ms" in r:
            r["floor_rate"] = rates["float32"] if n == name else rates["bfloat16"]
    text = write()
    assert "in this run is over the bf16 matmul rate" not in text
    assert f"float32 (ieee) {rates['float32']['tflops']:.1f} TFLOP/s" in text
    assert f"| `{name}` | " in text and " ms (float32) | " in text
    assert f"`{name}` " not in _before(text)
