"""Every file path named in the docs, the README, docstrings and comments exists in the repository."""
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PATH_RE = re.compile(r"(?<![\w./:$-])((?:\.\./)*(?:[\w.-]+/)+[\w.-]+\.(?:py|md|cpp|h|sh|json|toml|png|log))\b")
# not repository paths: files of other projects, of the installed packages, or generated at run time
EXTERNAL = ("trl/", "verl/", "transformers/", "torch/", "fla/", "src/liger_kernel", "benchmark/scripts",
            "csrc/flash_attn", "flash_attn/", "ATen/", "c10/", "tests/ops/", "site-packages/", "nthr_results/", "/tmp/", "out/", "OUT/")


def _tracked() -> list:
    out = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    files = [p for p in out.split() if p.endswith((".py", ".md", ".cpp", ".h", ".sh", ".toml")) or p == ".ci/run"]
    return [ROOT / p for p in files if p != "CHANGELOG.md"]  # the changelog names files that were removed


def _exists(ref: str, where: Path) -> bool:
    if any(ch in ref for ch in "*<>{}"):
        return True
    for base in (ROOT, where.parent, ROOT / "nthr_kernels"):  # the README lists the package tree
        if (base / ref).exists():
            return True
    return False


@pytest.mark.parametrize("path", _tracked(), ids=lambda p: str(p.relative_to(ROOT)))
def test_named_files_exist(path):
    text = path.read_text(errors="replace")
    missing = sorted({m for m in PATH_RE.findall(text) if not m.startswith(EXTERNAL) and not _exists(m, path)})
    assert not missing, f"{path.relative_to(ROOT)} names files that do not exist: {missing}"
