"""scripts/setup.sh (``make setup``/``make test``/``make demo``) on a machine where ``python3 -m venv`` fails,
as Debian's Python does without the python3-venv package: it lays the environment out (``bin/python``), then
fails in ensurepip, leaving an environment without pip. No test here installs anything."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SETUP = REPO / "scripts" / "setup.sh"


def _setup(venv: Path, path_first: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env["VENV"] = str(venv)
    if path_first is not None:
        env["PATH"] = f"{path_first}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", str(SETUP)], env=env, capture_output=True, text=True, timeout=300,
                          stdin=subprocess.DEVNULL)


def _debian_python_without_venv_package(tmp_path: Path) -> Path:
    """A ``python3`` on PATH whose ``-m venv`` does what Debian's does without python3-venv."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stand_in = bin_dir / "python3"
    stand_in.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [ "$1" = -m ] && [ "$2" = venv ]; then
            "{sys.executable}" -m venv --without-pip "$3" || exit 1
            echo "The virtual environment was not created successfully because ensurepip is not available."
            exit 1
        fi
        exec "{sys.executable}" "$@"
    """))
    stand_in.chmod(0o755)
    return bin_dir


def test_failed_venv_creation_leaves_nothing_that_stops_the_next_run(tmp_path):
    """Before: the half-made .venv (python, no pip) stayed; after `apt install python3-venv` every later
    `make test` used it and stopped at 'No module named pip'."""
    venv = tmp_path / "venv"
    out = _setup(venv, _debian_python_without_venv_package(tmp_path))
    assert out.returncode == 1, out.stdout + out.stderr
    assert "apt install python3-venv" in out.stderr
    assert not venv.exists(), "the half-made environment must be removed"


def test_environment_without_pip_is_named_before_any_install(tmp_path):
    """An existing environment without pip (made by an older set-up, or by hand): one clear message, not
    pip's 'No module named pip' after 'installing torch'."""
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=120)
    out = _setup(venv)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "has no pip" in out.stderr and f"rm -r {venv}" in out.stderr, out.stderr
    assert "installing" not in out.stdout, out.stdout


def _venv_without_torch(tmp_path: Path) -> tuple[Path, Path]:
    """A stand-in environment: its ``python`` has pip, no torch, and records each ``pip install`` (then fails,
    which stops the set-up there)."""
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(textwrap.dedent(f"""\
        #!/usr/bin/env bash
        if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = --version ]; then echo "pip 24"; exit 0; fi
        if [ "$1" = -c ]; then exit 1; fi  # import torch fails
        if [ "$1" = -m ] && [ "$2" = pip ] && [ "$3" = install ]; then echo "$@" >> "{log}"; exit 1; fi
        exit 0
    """))
    py.chmod(0o755)
    return venv, log


def test_torch_index_url_is_used_and_the_default_index_is_named_for_what_it_gives(tmp_path, monkeypatch):
    """The set-up said it installed 'torch==2.13.0 (CPU build)' from pip's index, whose Linux wheel on PyPI is the
    CUDA build (several GB). It now says where torch comes from, and TORCH_INDEX_URL picks the index."""
    venv, log = _venv_without_torch(tmp_path)
    monkeypatch.delenv("TORCH_INDEX_URL", raising=False)
    out = _setup(venv)
    assert out.returncode != 0 and "CUDA build" in out.stdout and "TORCH_INDEX_URL" in out.stdout, out.stdout
    assert "--index-url" not in log.read_text()
    log.unlink()
    monkeypatch.setenv("TORCH_INDEX_URL", "https://download.pytorch.org/whl/cpu")
    out = _setup(venv)
    assert "--index-url https://download.pytorch.org/whl/cpu torch==2.13.0" in log.read_text(), out.stdout
