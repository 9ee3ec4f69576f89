"""The README's trainer-integration figures (section "Use it in your trainer") are the committed results
file of ``benchmarks/test_integrations.py``, rendered (``benchmarks/integrations_report.py``)."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import integrations_report as ir  # noqa: E402


def test_readme_figures_equal_results_file():
    readme = ir.README.read_text()
    path = ir.readme_results(readme)
    assert path.is_file(), f"README.md names {path}, which does not exist"
    for name, text in ir.blocks(path).items():
        assert ir.block_text(readme, name) == text, (
            f"README.md's {name} differ from {path.relative_to(ir.ROOT)}: run "
            f"`python -m benchmarks.integrations_report --render {path.relative_to(ir.ROOT)}`")
    assert ir.differences(readme, path) == []
    assert ir.main(["--check"]) == 0


def test_results_file_records_the_load_and_every_figure():
    path = ir.readme_results(ir.README.read_text())
    info, machine = ir.load(path)
    assert machine["load_avg_start"] is not None and machine["load_avg_end"] is not None
    for mode in ir.TRL_MODES:
        x = info[f"test_trl_step[{mode}]"]
        assert {"grpo_s", "nthr_s", "ratio", "kernel_s", "after_batch_s", "rounds"} <= set(x)
    v = info["test_verl_driver_vs_worker"]
    assert {"driver_s", "driver_torch_s", "worker_s", "ratio", "ratio_torch", "bytes_driver_tiny",
            "bytes_worker_tiny", "qwen_formula"} <= set(v)


def _edited(tmp_path, edit) -> Path:
    path = ir.readme_results(ir.README.read_text())
    data = json.loads(path.read_text())
    edit({b["name"]: b["extra_info"] for b in data["benchmarks"]})
    out = tmp_path / path.name
    out.write_text(json.dumps(data))
    return out


def _scale(bench, key, factor):
    def edit(info):
        info[bench][key] *= factor
    return edit


@pytest.mark.parametrize("where, edit", [
    ("trl-integration-figures", _scale("test_trl_step[old_logps]", "nthr_s", 1.5)),
    ("trl-integration-figures", _scale("test_trl_step[generate]", "kernel_s", 2.0)),
    ("verl-integration-figures", _scale("test_verl_driver_vs_worker", "worker_s", 1.5)),
    ("verl-integration-figures", lambda i: i["test_verl_driver_vs_worker"]["qwen_formula"].update(driver_weight=10**9)),
])
def test_an_edited_number_is_caught(tmp_path, where, edit):
    readme = ir.README.read_text()
    path = ir.readme_results(readme)
    edited = _edited(tmp_path, edit)
    # the edited file (its name aside) no longer renders to the README's text
    assert ir.blocks(edited)[where].replace(ir._rel(edited), ir._rel(path)) != ir.block_text(readme, where)
    assert ir.blocks(path)[where] == ir.block_text(readme, where)


@pytest.mark.parametrize("where, shown", [
    ("trl-integration-figures", lambda i: f"| {i['test_trl_step[forward]']['ratio']:.2f} |"),
    ("verl-integration-figures", lambda i: f"{i['test_verl_driver_vs_worker']['ratio']:.2f}"),
])
def test_an_edited_readme_is_caught(where, shown):
    readme = ir.README.read_text()
    path = ir.readme_results(readme)
    number = shown(ir.load(path)[0])
    begin, _ = ir.markers(where)
    head, block = readme.split(begin, 1)
    assert number in block
    edited = head + begin + block.replace(number, number.replace(number.strip("| "), "9.99"), 1)
    assert ir.differences(edited, path) == [where]
