"""The native build cache trusts nothing it did not write (``nthr_kernels/ops/native_lib.py``).

Each case prepares a cache folder, then runs a small NTHR call in a fresh process with
``NTHR_KERNELS_CACHE`` pointing there: a cache that is not ours, a library that is not the one recorded,
a truncated library or a symlinked lock must never be loaded or followed, never kill the process, and
leave one clear warning and the torch backend (or a repaired cache).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from nthr_kernels.ops import native_lib
from test_native import NATIVE, SMALL_RUN, _python

NOBODY = 65534
NO_CXX = "/nonexistent/c++"  # makes any rebuild fail fast: the process must then fall back, not crash

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="chown to another uid needs root")
needs_native = pytest.mark.skipif(not NATIVE, reason="native C++ ops not built here")


def _run(cache: Path, **env) -> subprocess.CompletedProcess:
    return _python(SMALL_RUN, {"NTHR_KERNELS_CACHE": str(cache), "NTHR_NATIVE": "1", **env})


def _fell_back(out: subprocess.CompletedProcess, reason: str) -> None:
    """The process ran to the end, with one warning naming ``reason`` and without the native backend."""
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr[-3000:]}"
    assert "WARNINGS 1" in out.stdout and reason in out.stdout, out.stdout + out.stderr
    assert "'native'" not in out.stdout.split("BACKENDS", 1)[1].splitlines()[0]
    assert "EQUAL True" in out.stdout


def _build_dir(root: Path) -> Path:
    return native_lib.build_dir(native_lib.source_dir(), root)


def _private(path: Path) -> Path:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


# --------------------------------------------------------------------------------------------------
# folders and files that are not ours
# --------------------------------------------------------------------------------------------------
@needs_root
def test_cache_owned_by_another_user_is_refused(tmp_path):
    cache = _private(tmp_path / "cache")
    os.chown(cache, NOBODY, NOBODY)
    _fell_back(_run(cache), f"owned by uid {NOBODY}")
    assert os.listdir(cache) == []


def test_group_writable_cache_is_refused(tmp_path):
    cache = _private(tmp_path / "cache")
    cache.chmod(0o770)
    _fell_back(_run(cache), "writable by group or others")
    assert os.listdir(cache) == []


def test_symlinked_cache_folder_is_refused(tmp_path):
    real = _private(tmp_path / "real")
    (tmp_path / "cache").symlink_to(real)
    _fell_back(_run(tmp_path / "cache"), "is not a folder")
    assert os.listdir(real) == []


@needs_root
def test_cache_under_a_folder_others_can_change_is_refused(tmp_path):
    shared = _private(tmp_path / "shared")
    os.chown(shared, NOBODY, NOBODY)
    _fell_back(_run(shared / "cache"), f"owned by uid {NOBODY}")


@needs_root
def test_symlink_above_the_cache_into_a_folder_of_another_user_is_refused(tmp_path):
    """NTHR_KERNELS_CACHE=.../link/cache with link -> a folder of ours inside a folder of another user: the
    check followed the link and saw only the target (ours), so the cache was used although that user can
    replace the target at any time; the folders above the target are now checked too."""
    other = _private(tmp_path / "other")
    target = _private(other / "ours")
    os.chown(other, NOBODY, NOBODY)
    other.chmod(0o755)
    (tmp_path / "link").symlink_to(target)
    _fell_back(_run(tmp_path / "link" / "cache", CXX=NO_CXX), f"owned by uid {NOBODY}")
    assert os.listdir(target) == []


def test_symlink_above_the_cache_into_a_private_folder_serves(tmp_path):
    """A symlink above the cache (~/.cache on another disk) whose target lies in folders of ours serves:
    the cache is made there, private."""
    real = _private(tmp_path / "real")
    (tmp_path / "link").symlink_to(real)
    out = _run(tmp_path / "link" / "cache", CXX=NO_CXX)
    _fell_back(out, "no C++ compiler found")
    assert (real / "cache").stat().st_mode & 0o777 == 0o700


@needs_root
def test_build_folder_owned_by_another_user_is_refused(tmp_path):
    cache = _private(tmp_path / "cache")
    planted = _private(_build_dir(cache))
    os.chown(planted, NOBODY, NOBODY)
    _fell_back(_run(cache), f"owned by uid {NOBODY}")


def test_created_folders_are_private(tmp_path):
    """A missing cache folder (and its missing parents) is created 0700."""
    cache = tmp_path / "a" / "b" / "cache"
    _run(cache, CXX=NO_CXX)
    for p in (tmp_path / "a", tmp_path / "a" / "b", cache):
        assert p.stat().st_mode & 0o777 == 0o700, p


def test_relative_cache_variables(monkeypatch):
    monkeypatch.setenv("NTHR_KERNELS_CACHE", "relative/cache")
    with pytest.raises(RuntimeError, match="NTHR_KERNELS_CACHE must be an absolute path"):
        native_lib.cache_root()
    monkeypatch.delenv("NTHR_KERNELS_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", "relative/xdg")  # ignored, as the XDG rule says
    assert native_lib.cache_root() == Path.home() / ".cache" / "nthr_kernels"
    monkeypatch.setenv("XDG_CACHE_HOME", "/abs/xdg")
    assert native_lib.cache_root() == Path("/abs/xdg/nthr_kernels")


def test_relative_cache_variable_falls_back_with_one_warning(tmp_path):
    out = _python(SMALL_RUN, {"NTHR_KERNELS_CACHE": "relative/cache", "NTHR_NATIVE": "1"})
    _fell_back(out, "must be an absolute path")


def test_symlinked_lock_file_is_not_followed(tmp_path):
    cache = _private(tmp_path / "cache")
    target = tmp_path / "elsewhere"
    (cache / (_build_dir(cache).name + ".lock")).symlink_to(target)
    _fell_back(_run(cache), "is a symlink")
    assert not target.exists()


# --------------------------------------------------------------------------------------------------
# libraries that are not the ones recorded
# --------------------------------------------------------------------------------------------------
PLANTED_C = r"""
#include <stdio.h>
#include <stdlib.h>
__attribute__((constructor)) static void planted(void) {
    const char* path = getenv("NTHR_PLANT_MARKER");
    FILE* f = path ? fopen(path, "w") : NULL;
    if (f) { fputs("planted library ran\n", f); fclose(f); }
}
"""


def _planted_library(tmp_path: Path) -> Path:
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("cc")
    if cxx is None:
        pytest.skip("no C compiler to build the planted library")
    src = tmp_path / "planted.c"
    src.write_text(PLANTED_C)
    lib = tmp_path / "planted.so"
    subprocess.run([cxx, "-x", "c", "-shared", "-fPIC", "-o", str(lib), str(src)], check=True, capture_output=True)
    return lib


@pytest.mark.parametrize("record", ["wrong-hash", "none", "legacy-COMPLETE"])
def test_planted_library_is_never_loaded(tmp_path, record):
    """A library in our build folder that is not the one recorded at build time never runs its code: the
    entry is moved aside and rebuilt (here without a compiler: one warning, the torch backend)."""
    cache = _private(tmp_path / "cache")
    out = _private(_build_dir(cache))
    shutil.copy(_planted_library(tmp_path), out / "nthr_native.so")
    if record == "wrong-hash":
        (out / "SHA256").write_text("0" * 64 + "  nthr_native.so\n")
    elif record == "legacy-COMPLETE":
        (out / "COMPLETE").write_text(str(out / "nthr_native.so"))
    marker = tmp_path / "marker"
    _fell_back(_run(cache, CXX=NO_CXX, NTHR_PLANT_MARKER=str(marker)), "no C++ compiler found")
    assert not marker.exists(), "the planted library was loaded"
    assert not out.exists(), "the unverified entry stays in place"


def _copy_of_current_build(tmp_path: Path) -> tuple[Path, Path]:
    """A private cache holding a verified copy of this checkout's build."""
    src = _build_dir(native_lib.cache_root())
    if native_lib._verified_library(src) is None:
        pytest.skip("no verified build of these sources in the default cache")
    cache = _private(tmp_path / "cache")
    out = _build_dir(cache)
    shutil.copytree(src, out)
    out.chmod(0o700)
    return cache, out


@needs_native
def test_verified_copy_loads_without_a_compiler(tmp_path):
    cache, _ = _copy_of_current_build(tmp_path)
    out = _run(cache, CXX=NO_CXX)
    assert out.returncode == 0 and "WARNINGS 0" in out.stdout and "'native'" in out.stdout, out.stdout + out.stderr


@needs_native
def test_truncated_library_without_compiler_falls_back(tmp_path):
    """A truncated cached library (an interrupted copy, a full disk) killed every later process with
    SIGBUS; now it is never loaded."""
    cache, out = _copy_of_current_build(tmp_path)
    os.truncate(out / "nthr_native.so", 4096)
    _fell_back(_run(cache, CXX=NO_CXX), "no C++ compiler found")


@needs_native
@pytest.mark.slow
def test_truncated_library_is_rebuilt(tmp_path):
    """... and with a compiler the cache repairs itself: the next process rebuilds and loads it."""
    if native_lib._missing_toolchain() is not None:
        pytest.skip(f"cannot build here: {native_lib._missing_toolchain()}")
    cache, out = _copy_of_current_build(tmp_path)
    os.truncate(out / "nthr_native.so", 4096)
    run = _run(cache)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-3000:]}"
    assert "WARNINGS 0" in run.stdout and "'native'" in run.stdout, run.stdout + run.stderr
    assert "rebuilding it" in run.stderr
    assert native_lib._verified_library(out) is not None
    assert (out / "nthr_native.so").stat().st_size > 4096


# --------------------------------------------------------------------------------------------------
# old builds
# --------------------------------------------------------------------------------------------------
def test_prune_removes_only_stale_builds_of_ours(tmp_path):
    cache = _private(tmp_path / "cache")
    keep = _private(_build_dir(cache))
    prefix = keep.name[: -len(keep.name.split("-")[-1])]
    old = time.time() - (native_lib.STALE_DAYS + 1) * 86400
    stale, fresh, foreign, other = (_private(cache / name) for name in
                                    (prefix + "0" * 16, prefix + "1" * 16, prefix + "2" * 16, "unrelated"))
    leftover = _private(cache / (".build-" + keep.name + "-x"))
    for p in (stale, foreign, other, leftover):
        os.utime(p, (old, old))
    if os.geteuid() == 0:
        os.chown(foreign, NOBODY, NOBODY)
    busy = _private(cache / (prefix + "3" * 16))
    os.utime(busy, (old, old))
    fd = native_lib._lock(cache / (busy.name + ".lock"))  # being built or repaired by someone right now
    try:
        native_lib._prune_stale(cache, keep)
    finally:
        os.close(fd)
    assert not stale.exists() and not leftover.exists()
    assert keep.exists() and fresh.exists() and foreign.exists() and other.exists() and busy.exists()


# --------------------------------------------------------------------------------------------------
# the third audit (2026-11-27): a FIFO, a foreign library with a valid record, sources edited during a
# build, junk switches
# --------------------------------------------------------------------------------------------------
def test_fifo_at_the_library_path_does_not_hang(tmp_path):
    """A FIFO planted where the library or its record should be blocked the open forever."""
    cache = _private(tmp_path / "cache")
    out = _private(_build_dir(cache))
    os.mkfifo(out / "nthr_native.so", 0o600)
    os.mkfifo(out / "SHA256", 0o600)
    run = _python(SMALL_RUN, {"NTHR_KERNELS_CACHE": str(cache), "NTHR_NATIVE": "1", "CXX": NO_CXX}, timeout=120)
    _fell_back(run, "no C++ compiler found")  # the entry was moved aside, and the rebuild found no compiler
    assert not out.exists()


def test_a_library_that_registers_no_kernels_is_not_used(tmp_path):
    """A complete entry whose library is another one (its record matching: what a corrupted or mixed-up cache
    could hold) registers no nthr kernel: refused after loading, one warning, the torch backend. (A
    library's load-time code runs at the load: the cache's privacy is what keeps strangers' libraries out.)"""
    cache = _private(tmp_path / "cache")
    out = _private(_build_dir(cache))
    shutil.copy(_planted_library(tmp_path), out / "nthr_native.so")
    (out / "SHA256").write_text(native_lib._sha256(out / "nthr_native.so") + "  nthr_native.so\n")
    _fell_back(_run(cache, CXX=NO_CXX), "registered no CPU kernel for nthr::native_advantages")


@needs_native
def test_sources_edited_after_the_key_are_not_built_under_it(tmp_path):
    """The build compiles a private copy of the sources, checked against the key it was asked for: a build
    whose key no longer matches the sources stops before compiling (an edit between the key and the compile
    produced a library of other sources under the old key)."""
    root = _private(tmp_path / "cache")
    out = root / (native_lib._build_prefix() + "0" * 16)
    with pytest.raises(RuntimeError, match="changed while the build started"):
        native_lib._compile(native_lib.source_dir(), root, out, native_lib._FLAGS, verbose=False)
    assert not out.exists() and not list(root.glob(".build-*"))


def test_junk_switch_values_are_refused(monkeypatch):
    monkeypatch.setenv("NTHR_NATIVE", "nope")
    with pytest.raises(ValueError, match=r"^NTHR_NATIVE: expected 0 or 1"):
        native_lib._disabled()
    for off in ("0", "off", "False"):
        monkeypatch.setenv("NTHR_NATIVE", off)
        assert native_lib._disabled()


@needs_native
def test_trace_only_with_one():
    code = SMALL_RUN
    on = _python(code, {"NTHR_NATIVE_TRACE": "1"})
    off = _python(code, {"NTHR_NATIVE_TRACE": "0"})
    assert "nthr native_advantages:" in on.stderr and "nthr native_advantages:" not in off.stderr


def test_cxx_with_a_launcher_is_a_compiler(monkeypatch):
    """``CXX="ccache g++"`` (a launcher and its compiler) is how torch's build runs the compiler (a shell word
    list); it was looked up as one program named "ccache g++": "no C++ compiler found", and the OpenMP probe
    could not run it. ``env`` stands in for the launcher."""
    if shutil.which("c++") is None or shutil.which("env") is None:
        pytest.skip("needs c++ and env on PATH")
    monkeypatch.setenv("CXX", "env c++")
    problem = native_lib._missing_toolchain()
    assert problem is None or "ninja" in problem, problem
    assert native_lib._openmp_problem() is None
    monkeypatch.setenv("CXX", "/nonexistent/c++ -O2")
    assert "no C++ compiler found" in native_lib._missing_toolchain()


def test_a_build_without_a_compiler_looks_for_it_once(tmp_path, monkeypatch):
    """build() looked the toolchain up (two ``which`` each time) for its choice of flags, and _compile looked
    it up again to raise: twice per build attempt. Now once, and the same error."""
    calls = []
    lookup = native_lib._missing_toolchain

    def counted():
        calls.append(1)
        return lookup()

    monkeypatch.setattr(native_lib, "_missing_toolchain", counted)
    monkeypatch.setenv("CXX", NO_CXX)
    monkeypatch.setenv("NTHR_KERNELS_CACHE", str(_private(tmp_path / "cache")))
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler found"):
        native_lib.build()
    assert len(calls) == 1
