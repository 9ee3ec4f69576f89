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
