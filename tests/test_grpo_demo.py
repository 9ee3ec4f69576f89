"""The demo end to end (``python -m nthr_kernels demo --quick``): report schema, files, verdict, atomic
outputs; the statistics; and the README's study block against the committed results."""

from __future__ import annotations

import json
import math
import os

import pytest

from nthr_kernels.grpo import METHODS
from nthr_kernels.grpo.demo import QUICK_STUDY, format_table, run_demo, verdict
from nthr_kernels.grpo.files import atomic_path, write_text_atomic
from nthr_kernels.grpo.highlight import ANSI_OFF, use_colour
from nthr_kernels.grpo.stats import BOOTSTRAP_RESAMPLES, paired, summarize


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """One quick demo run; its output paths were symlinks to a victim file beforehand."""
    import nthr_kernels.grpo.model as model_mod

    tmp = tmp_path_factory.mktemp("demo")
    out = tmp / "out"
    out.mkdir()
    victim = tmp / "victim.txt"
    victim.write_text("not to be overwritten")
    for name in ("report.json", "lld_deltas.png", "highlight.html"):
        (out / name).symlink_to(victim)
    table = {"rows": [], "machine": "test"}

    def no_training(*a, **k):
        raise AssertionError("the demo must not train")

    mp = pytest.MonkeyPatch()
    mp.setattr(model_mod, "_pretrain", no_training)
    try:
        rep = run_demo(str(out), True, str(tmp / "r.json"), backend_table=table, progress=False)
    finally:
        mp.undo()
    return rep, tmp, out, victim


def test_quick_demo_writes_a_consistent_report(quick, capsys):
    from nthr_kernels import available_backends

    rep, tmp, out, _ = quick
    for name in ("report.json", "lld_deltas.png", "highlight.html"):
        assert (out / name).is_file() and not (out / name).is_symlink() and (out / name).stat().st_size > 0
    assert sorted(p.name for p in out.iterdir()) == ["highlight.html", "lld_deltas.png", "report.json"]  # no model
    on_disk = json.loads((tmp / "r.json").read_text())
    assert on_disk == json.loads((out / "report.json").read_text()) == json.loads(json.dumps(rep))
    n = rep["questions"]
    assert rep["seeds"] == list(QUICK_STUDY.seeds) and n == len(QUICK_STUDY.seeds) * QUICK_STUDY.questions_per_seed
    assert set(rep["methods"]) == set(METHODS) and set(rep["paired_vs_grpo"]) == set(METHODS) - {"grpo"}
    for m, s in rep["methods"].items():
        d = s["deltas"]
        assert len(d) == n and all(math.isfinite(x) for x in d)
        assert s["mean_delta"] == pytest.approx(sum(d) / n)
        assert s["lld_fraction"] == pytest.approx(sum(x <= 0 for x in d) / n)
        for key, (lo, hi) in s["ci95"].items():
            assert lo <= s[key] <= hi
    for m, p in rep["paired_vs_grpo"].items():
        diffs = [a - b for a, b in zip(rep["methods"][m]["deltas"], rep["methods"]["grpo"]["deltas"])]
        assert p["mean_diff"] == pytest.approx(sum(diffs) / n)
        assert p["win_rate"] == pytest.approx(sum(x > 0 for x in diffs) / n)
        assert p["ci95"][0] <= p["mean_diff"] <= p["ci95"][1]
    # NTHR with eta = 0 and beta = -inf zeroes every negative token: exactly Pos Only
    assert rep["beta_ablation"]["-inf"]["deltas"] == rep["methods"]["pos_only"]["deltas"]
    assert rep["beta_ablation"]["-inf"]["selected_fraction"] == 1.0
    assert rep["beta_ablation"]["1.0"]["deltas"] == rep["methods"]["nthr"]["deltas"]
    assert rep["kernel_agreement"] >= 0.99  # strict equality: tests/test_grpo.py
    assert rep["backend"] in available_backends() and rep["backend_requested"] == "auto"
    assert rep["backend_table"] == {"rows": [], "machine": "test"}
    assert rep["machine"] and rep["nthr_ms"] > 0
    assert len(rep["gwhes"]["scores"]) == n
    assert rep["setup"]["mixed_found"] == n and set(rep["per_seed"]) == {str(s) for s in QUICK_STUDY.seeds}
    html = (out / "highlight.html").read_text()
    assert "class='sel'" in html  # some selected token is highlighted
    assert "GRPO + NTHR" in format_table(rep)


def test_outputs_replace_symlinks_instead_of_following_them(quick, tmp_path):
    _, _, _, victim = quick
    assert victim.read_text() == "not to be overwritten"
    link = tmp_path / "link.txt"
    link.symlink_to(victim)
    write_text_atomic(link, "new")
    assert not link.is_symlink() and link.read_text() == "new" and victim.read_text() == "not to be overwritten"
    with pytest.raises(RuntimeError):  # a failed write leaves the old file and no temporary behind
        with atomic_path(link) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert link.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["link.txt"]
    with pytest.raises(TypeError, match="text"):
        write_text_atomic(link, b"bytes")


def test_console_has_a_verdict_and_no_colour_codes_off_a_terminal(quick, capsys, monkeypatch, tmp_path):
    rep = quick[0]
    v = verdict(rep)
    assert v.startswith(f"Verdict ({rep['questions']} questions, {len(rep['seeds'])} seeds)")
    assert "GRPO" in v and "%" in v
    monkeypatch.setenv("NO_COLOR", "1")

    class Tty:
        def isatty(self):
            return True

    assert not use_colour(Tty())
    monkeypatch.delenv("NO_COLOR")
    assert use_colour(Tty()) and not use_colour(open(os.devnull, "w"))


def test_demo_console_output(tmp_path, capsys):
    """The printed output (captured, so not a terminal): table, marked tokens without escape codes, verdict last."""
    from nthr_kernels.grpo.demo import StudySize

    run_demo(str(tmp_path), size=StudySize(seeds=(3,), questions_per_seed=2), progress=False)
    printed = capsys.readouterr().out
    assert "LLD study" in printed and "\x1b[" not in printed and ANSI_OFF not in printed
    assert printed.strip().splitlines()[-1].startswith("Verdict (2 questions, 1 seeds)")


def test_statistics_are_deterministic_and_paired():
    d = [0.5, -1.0, 0.0, 2.0]
    s = summarize(d)
    assert s["mean_delta"] == pytest.approx(0.375) and s["median_delta"] == pytest.approx(0.25)
    assert s["lld_fraction"] == pytest.approx(0.5) and summarize(d) == s  # same deltas, same intervals
    lo, hi = s["ci95"]["mean_delta"]
    assert -1.0 <= lo < 0.375 < hi <= 2.0
    p = paired([x + 1 for x in d], d)  # better by exactly 1 on every question: a degenerate interval
    assert p["mean_diff"] == pytest.approx(1.0) and p["ci95"] == pytest.approx([1.0, 1.0])
    assert p["win_rate"] == 1.0 and p["tie_rate"] == 0.0
    assert p["lld_diff"] == pytest.approx(-0.25)  # LLD on 2 of 4 questions (-1.0, 0.0), then on 1 (0.0)
    assert BOOTSTRAP_RESAMPLES >= 1000
    with pytest.raises(ValueError, match="pair"):
        paired([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="deltas"):
        summarize([])
    with pytest.raises(ValueError, match="deltas"):
        summarize([1.0, float("nan")])


def _report(grpo, nthr, random=None):
    methods = {"grpo": summarize(grpo), "nthr": summarize(nthr), "random": summarize(random or grpo)}
    return {"questions": len(grpo), "seeds": [0, 1], "methods": methods,
            "paired_vs_grpo": {m: paired(methods[m]["deltas"], grpo) for m in ("nthr", "random")}}


def test_verdict_says_what_the_numbers_say():
    n = 200
    grpo = [(-1.0 if i % 4 == 0 else 1.0) + 0.001 * i for i in range(n)]  # 25 % LLD
    better = [abs(x) + 0.5 for x in grpo]  # no LLD, higher on every question
    v = verdict(_report(grpo, better))
    assert "NTHR lowered the share" in v and "from 25.0 % (GRPO) to 0.0 %" in v and "It raised" in v
    assert "made a difference" in v
    same = verdict(_report(grpo, list(grpo)))
    assert "did not measurably change" in same and "no clear effect" in same and "no clear difference" in same
    worse = verdict(_report(better, grpo))
    assert "NTHR raised the share" in worse and "It lowered" in worse


def _histories(final_nthr):
    return [{"method": m, "seed": s, "step": [0, 5, 10], "eval_acc": [0.3, 0.5, f], "final_acc": f}
            for s, fn in enumerate(final_nthr) for m, f in (("grpo", 0.7), ("nthr", fn))]


def test_training_text_says_what_the_seeds_can_show():
    from nthr_kernels.grpo.report import training_summary, training_text

    mixed = training_text(_histories([0.72, 0.69, 0.75]))
    assert "+0.020, -0.010, +0.050" in mixed and "sign changes" in mixed and "3 runs of 10 steps" in mixed
    assert "from 0.300 (0.300-0.300 over the seeds) to 0.700" in mixed
    same = training_text(_histories([0.72, 0.71, 0.75]))
    assert "same sign for every seed" in same and "probability 0.25" in same and "not a significant" in same
    with pytest.raises(ValueError, match="one GRPO and one NTHR run per seed"):
        training_summary(_histories([0.7])[:1])


def test_training_text_claims_no_more_than_the_seeds_show():
    """A sign change says there is no consistent difference, not that the methods train equally well; one sign on
    enough seeds is significant by the sign test (2 * 0.5**6 = 0.031), and a tie is no change of sign."""
    from nthr_kernels.grpo.report import training_text

    mixed = training_text(_histories([0.72, 0.69, 0.75]))
    assert "no consistent difference" in mixed and "trains as well as GRPO here" not in mixed
    six = training_text(_histories([0.71, 0.72, 0.73, 0.74, 0.75, 0.76]))
    assert "probability 0.031" in six and "not a significant" not in six and "below 5 %" in six
    tie = training_text(_histories([0.72, 0.70, 0.75]))  # +0.02, 0, +0.05: NTHR ahead or equal on every seed
    assert "sign changes" not in tie and "where they differ (2 of 3; equal on 1)" in tie and "probability 0.5" in tie
    equal = training_text(_histories([0.7, 0.7, 0.7]))
    assert "sign changes" not in equal and "none, on every seed" in equal


def test_readme_study_block_matches_the_committed_results():
    from nthr_kernels.grpo.report import COMPARED, RESULTS, ROOT, TRAIN_RESULTS, update_readme

    if not RESULTS.is_file():
        pytest.skip("not a source checkout")
    committed = json.loads(RESULTS.read_text())
    assert committed["questions"] >= 256 and len(committed["seeds"]) >= 5 and not committed["quick"]
    assert committed["backend"] != "auto" and committed["backend_table"]["rows"]
    assert all(p.is_file() for p in COMPARED)
    train = json.loads(TRAIN_RESULTS.read_text())
    assert len(train["settings"]["seeds"]) >= 3 and len(train["histories"]) == 2 * len(train["settings"]["seeds"])
    assert update_readme(ROOT / "README.md", check=True), "run: python -m nthr_kernels.grpo.report --readme"


@pytest.mark.parametrize("argv, message", [
    (["demo", "--out", "README.md"], "--out: cannot write there: 'README.md' exists and is not a folder"),
    (["demo", "--json", "benchmarks"], "--json: cannot write there: 'benchmarks' is a folder"),
    (["demo", "--json", ""], "--json: cannot write there: an empty path"),
    (["demo", "--skip-lld", "--json", "x.json"], "--json: the JSON report is the LLD study's"),
])
def test_cli_refuses_unwritable_outputs_before_any_work(argv, message, capsys):
    """The study ran for minutes and then died on an output path it could not write (or, with --skip-lld,
    wrote nothing and exited 0)."""
    from nthr_kernels.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_demo_without_the_dev_extra_says_what_to_install_before_any_work(monkeypatch, capsys):
    """After `pip install -e .` (no extras) the demo ran the backend table, then died with a traceback
    (ModuleNotFoundError: safetensors). Now one message, first, names what to install."""
    import sys

    from nthr_kernels import __main__ as cli

    monkeypatch.setitem(sys.modules, "safetensors", None)  # not importable, as without the dev extra
    monkeypatch.setattr("nthr_kernels.demo_synthetic.run_backend_table",
                        lambda **kw: pytest.fail("the backend table ran before the check"))
    assert cli.main(["demo", "--quick", "--out", "nthr_results"]) == 1
    err = capsys.readouterr().err
    assert "the LLD study needs safetensors, not installed here" in err and 'pip install -e ".[dev]"' in err, err


def test_thread_count_variable_is_checked(monkeypatch):
    from nthr_kernels.grpo.model import torch_threads

    for bad in ("abc", "0", "-2", "1.5"):
        monkeypatch.setenv("NTHR_KERNELS_THREADS", bad)
        with pytest.raises(ValueError, match="^NTHR_KERNELS_THREADS: expected a positive integer"):
            torch_threads()


def test_outputs_follow_the_umask(tmp_path):
    """Written files get 0666 less the umask, as open() would give (they were 0644 whatever the umask), without
    changing the process's umask on the way (another thread could create a file in that window)."""
    from nthr_kernels.grpo.files import write_text_atomic

    old = os.umask(0o077)
    try:
        assert (write_text_atomic(tmp_path / "a.txt", "x").stat().st_mode & 0o777) == 0o600
        os.umask(0o022)
        assert (write_text_atomic(tmp_path / "b.txt", "x").stat().st_mode & 0o777) == 0o644
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no temporary left behind


def test_readme_block_takes_the_group_size_from_the_results():
    """The block said "8 responses each" whatever the results file recorded."""
    from nthr_kernels.grpo.report import RESULTS, readme_block

    if not RESULTS.is_file():
        pytest.skip("not a source checkout")
    rep = json.loads(RESULTS.read_text())
    assert "8 responses each" in readme_block(rep, [])
    rep["setup"]["group_size"] = 4
    block = readme_block(rep, [])
    assert "4 responses each" in block and "8 responses each" not in block


def test_readme_block_says_what_the_gwhes_and_thread_numbers_are():
    """The GWHES sentence said "the questions where GRPO loses most likelihood" of the k lowest GRPO Deltas, most of
    which are positive (GRPO raised their likelihood, least); the threads table called the share of equal GRPO
    Deltas "same questions"."""
    from nthr_kernels.grpo.report import COMPARED, RESULTS, readme_block

    if not RESULTS.is_file():
        pytest.skip("not a source checkout")
    rep = json.loads(RESULTS.read_text())
    k = int(min(rep["gwhes"]["topk_overlap"], key=int))
    assert sum(d > 0 for d in sorted(rep["methods"]["grpo"]["deltas"])[:k]) > 0  # some of the k laziest gained
    block = readme_block(rep, [json.loads(p.read_text()) for p in COMPARED])
    assert "loses most likelihood" not in block and "raises least, or lowers" in block
    assert "same questions as row 1" not in block and "GRPO Delta as row 1's (to 1e-6)" in block
