"""Fuzz (hypothesis, deterministic): malformed calls on every CPU backend in a subprocess
(tests/fuzz_calls.py), so that a signal or a hang is caught rather than fatal.

Every call must end in a ValueError/TypeError naming an argument, or in the reference's answer with no
NaN (a finite result where the caller switched a check off): never a signal, a hang (the subprocess
timeout) or anything else. The counts are printed
(``pytest -s``) and written to ``$NTHR_FUZZ_REPORT`` when set.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from _helpers import backends

pytest.importorskip("hypothesis")

EXAMPLES = 150  # per backend: about 10 s for all four on an idle 2-core machine
TIMEOUT_S = 55  # a hang; the test stays under a minute
DRIVER = Path(__file__).with_name("fuzz_calls.py")
BACKENDS = ["reference"] + backends()


def _last_call(log: str) -> str:
    calls = [line for line in log.splitlines() if line.startswith("CALL ")]
    return calls[-1] if calls else "(none)"


@pytest.fixture(scope="module")
def outcomes():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(DRIVER.parent.parent)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    with tempfile.TemporaryFile("w+") as log:
        try:
            p = subprocess.run([sys.executable, str(DRIVER), str(EXAMPLES), *BACKENDS], stdout=subprocess.PIPE,
                               stderr=log, text=True, env=env, timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log.seek(0)
            pytest.fail(f"hang: no result within {TIMEOUT_S} s; last call: {_last_call(log.read())}")
        log.seek(0)
        text = log.read()
    if p.returncode != 0:
        pytest.fail(f"exit status {p.returncode} (negative: killed by that signal); last call: {_last_call(text)}\n"
                    f"{text[-2000:]}")
    out = json.loads(p.stdout.strip().splitlines()[-1])
    summary = {be: {k: v for k, v in r.items() if k != "others"} for be, r in out.items()}
    print("fuzz outcomes:", json.dumps(summary))
    if os.environ.get("NTHR_FUZZ_REPORT"):
        Path(os.environ["NTHR_FUZZ_REPORT"]).write_text(json.dumps(out, indent=1))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_malformed_calls_fail_clearly_or_match_the_reference(outcomes, backend):
    r = outcomes[backend]
    assert r["tried"] >= EXAMPLES and r["clear"] + r["answer"] + r["opted_out"] == r["tried"], "\n".join(r["others"])
    assert r["clear"] > 0 and r["answer"] > 0  # both outcomes are exercised: the test can fail either way
