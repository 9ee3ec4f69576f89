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
