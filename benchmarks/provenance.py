"""Which code a results file measured: sha256 of source files, recorded with the results (``gpu_suite``'s
``kernel_sources``, ``report``'s ``library_sources``), and the README's note when the code has changed since."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Iterable, Optional

ROOT = Path(__file__).resolve().parents[1]


def file_hashes(files: Iterable[Path], root: Path = ROOT) -> dict:
    """``{path relative to root: sha256 of its bytes}``, sorted by path."""
    return {str(f.relative_to(root)): hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(files)}


def library_sources(root: Path = ROOT) -> dict:
    """Every source file of the library (``nthr_kernels/**/*.py``, ``csrc/*.cpp|h``): the code whose speed the
    CPU report measures (validation, the backends, the native kernels, the GRPO loop of its share row)."""
    files = list((root / "nthr_kernels").rglob("*.py")) + [f for f in (root / "csrc").iterdir()
                                                          if f.suffix in (".cpp", ".h")]
    return file_hashes(files, root)


def changed(recorded: Optional[dict], current: dict) -> list[str]:
    """The files whose hash differs (added or removed included); every file when nothing was recorded."""
    recorded = recorded or {}
    return sorted(f for f in set(recorded) | set(current) if recorded.get(f) != current.get(f))


def stale_note(what: str, key: str, by: str, files: list[str], limit: int = 8) -> str:
    """The README's sentence for figures measured on other code than the checkout's (``by``: the module that
    computes the hashes)."""
    names = ", ".join(f"`{f}`" for f in files[:limit]) + (f" and {len(files) - limit} more" if len(files) > limit else "")
    return (f"These figures predate the current {what}: the `{key}` recorded in the results differ from the "
            f"code's (`{by}` computes them) in {names}.")
