"""The demo's quick mode end to end (``python -m nthr_kernels demo --quick``): report schema and files."""

from __future__ import annotations

import json
import math

import pytest

from nthr_kernels.grpo import METHODS
from nthr_kernels.grpo.demo import format_table, run_demo


def test_quick_demo_writes_a_consistent_report(tmp_path, monkeypatch, capsys):
    # a fresh model cache (not $NTHR_KERNELS_CACHE, which would also move the native backend's build cache)
    import nthr_kernels.grpo.model as model_mod

    monkeypatch.setattr(model_mod, "cache_dir", lambda: tmp_path / "cache")
    out = tmp_path / "out"
    rep = run_demo(str(out), True, str(tmp_path / "r.json"), progress=False)
    printed = capsys.readouterr().out
    assert "LLD study" in printed and str(out) in printed
    for name in ("report.json", "lld_deltas.png", "highlight.html"):
        assert (out / name).stat().st_size > 0
    on_disk = json.loads((tmp_path / "r.json").read_text())
    assert on_disk == json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    n = rep["questions"]
    assert n == 16
    assert set(rep["methods"]) == set(METHODS)
    for m, s in rep["methods"].items():
        d = s["deltas"]
        assert len(d) == n and all(math.isfinite(x) for x in d)
        assert s["mean_delta"] == pytest.approx(sum(d) / n)
        assert s["lld_fraction"] == pytest.approx(sum(x <= 0 for x in d) / n)
    # NTHR with eta = 0 and beta = -inf zeroes every negative token: exactly Pos Only
    assert rep["beta_ablation"]["-inf"]["deltas"] == rep["methods"]["pos_only"]["deltas"]
    assert rep["beta_ablation"]["-inf"]["selected_fraction"] == 1.0
    assert rep["beta_ablation"]["1.0"]["deltas"] == rep["methods"]["nthr"]["deltas"]
    assert rep["kernel_agreement"] >= 0.99  # strict equality: tests/test_grpo.py
    assert rep["nthr_ms"] > 0
    assert len(rep["gwhes"]["scores"]) == n
    assert rep["setup"]["mixed_found"] == n
    html = (out / "highlight.html").read_text()
    assert "class='sel'" in html  # some selected token is highlighted
    assert "GRPO + NTHR" in format_table(rep)
    assert len(list((tmp_path / "cache").glob("*.pt"))) == 1  # the quick model was trained and cached
