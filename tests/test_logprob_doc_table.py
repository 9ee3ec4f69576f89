"""docs/NTHR.md's table of the ``old_logprobs`` check is what ``benchmarks/logprob_check.py`` measures (the
script had gone stale once, importing names that no longer existed, while the page still quoted it)."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import logprob_check  # noqa: E402

HEADER = "| log-probs passed | q99 m_t | max m_t | tokens > 0.5 | sample > 0.5 | check |"


def _doc_rows() -> list:
    text = (ROOT / "docs" / "NTHR.md").read_text()
    lines = text[text.index(HEADER):].splitlines()[2:]
    rows = []
    for line in lines:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows, text


def test_docs_table_is_the_scripts_measurement():
    doc, text = _doc_rows()
    rows, n_tokens = logprob_check.measure(16)
    assert f"{n_tokens:,} completion tokens" in text, "docs/NTHR.md quotes another token count"
    assert len(doc) == len(rows), f"docs/NTHR.md has {len(doc)} cases, the script {len(rows)}"
    for d, (name, _, _, q99, top, frac_all, n_bad, k, verdict) in zip(doc, rows):
        got = [f"{q99:.3f}", f"{top:.3f}", f"{100 * frac_all:.1f} %", f"{n_bad}/{k}"]
        assert d[1:5] == got, f"docs/NTHR.md row {d[0]!r} differs from the script's {name!r}: {got}"
        assert re.sub(r"[*]", "", d[5]).split()[0] == verdict.lower(), (d, verdict)
