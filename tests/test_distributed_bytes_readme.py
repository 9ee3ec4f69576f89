"""The README's bytes per rank of the distributed path (section "Groups split over ranks") are the committed
results file of ``benchmarks/distributed_bytes.py``, rendered; the file is the formula
(``payload_bytes``, checked against the collectives in tests/test_distributed.py) evaluated afresh."""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import distributed_bytes as db  # noqa: E402
from nthr_kernels.synthetic import make_batch, sample_tokens  # noqa: E402


def test_readme_block_equals_results_file():
    readme = db.README.read_text()
    assert db.block_text(readme) == db.block(db.RESULTS), (
        "README.md's distributed-bytes block differs from benchmarks/results/distributed-bytes.json: run "
        "`python -m benchmarks.distributed_bytes --readme`")


def test_results_file_equals_formula():
    fresh, saved = db.evaluate(), db.load()
    fresh.pop("torch"), saved.pop("torch")
    assert fresh == saved, "the formula or the shape changed: run `python -m benchmarks.distributed_bytes --readme`"
    assert db.differences(db.README.read_text()) == []
    assert db.main(["--check"]) == 0


def test_placements_are_what_they_say():
    p = db.load()["placements"]
    assert p["random"]["shared_active_groups"] == db.load()["shape"]["n_active"]
    assert p["cut-inside-group"]["shared_active_groups"] == 1 and p["cut-inside-group"]["max_local_groups"] == 33
    assert p["whole-groups"]["shared_active_groups"] == 0 and p["whole-groups"]["bytes_by_stage"]["M"] == 0
    for x in p.values():
        assert sum(x["bytes_by_stage"].values()) == x["bytes_per_rank"]


def _edited(tmp_path, edit) -> Path:
    data = copy.deepcopy(db.load())
    edit(data["placements"])
    out = tmp_path / db.RESULTS.name
    out.write_text(json.dumps(data))
    return out


@pytest.mark.parametrize("edit", [
    lambda p: p["random"].update(bytes_per_rank=p["random"]["bytes_per_rank"] + 1000),
    lambda p: p["cut-inside-group"]["bytes_by_stage"].update(M=10**7),
    lambda p: p["whole-groups"].update(shared_active_groups=1),
])
def test_an_edited_number_is_caught(tmp_path, edit):
    readme = db.README.read_text()
    edited = _edited(tmp_path, edit)
    assert db.block(edited).replace(db._rel(edited), db._rel(db.RESULTS)) != db.block_text(readme)
    assert "results" in db.differences(readme, edited)


@pytest.mark.parametrize("shown", ["802,435,676", "16,967,280", "3,328 (3.3 kB)"])
def test_an_edited_readme_is_caught(shown):
    readme = db.README.read_text()
    begin, _ = db.markers()
    head, rest = readme.split(begin, 1)
    assert shown in rest.split("<!-- distributed-bytes: end -->")[0]
    edited = head + begin + rest.replace(shown, shown.replace("2", "9").replace("3", "8"), 1)
    assert db.differences(edited) == ["README"]


@pytest.mark.parametrize("kw", [
    dict(n_groups=3, group_size=4, lengths=(0, 30), vocab=500, seed=3),
    dict(n_groups=2, group_size=3, lengths=[1, 5, 0, 2, 7, 3], vocab=50, seed=1, success=[0.5, 1.0]),
])
def test_sample_tokens_are_make_batch_draws_whatever_d(kw):
    lens, rewards, ids = sample_tokens(**kw)
    for d, extra in ((1, {}), (16, dict(packed=True)), (8, dict(holes=True, dtype=torch.bfloat16))):
        b = make_batch(kw["n_groups"], kw["group_size"], kw["lengths"], d, kw["vocab"], seed=kw["seed"],
                       success=kw.get("success"), **extra)
        assert torch.equal(b.rewards, rewards)
        if b.cu_seqlens is not None:
            assert torch.equal(b.token_ids, ids) and torch.equal(b.cu_seqlens[1:] - b.cu_seqlens[:-1], lens.int())
        else:
            assert torch.equal(b.token_ids[b.mask], ids) and torch.equal(b.mask.sum(1), lens)
