"""The native C++ CPU backend (sources in ``csrc/``), built just in time on first use and cached.

Build. :func:`available` (called by ``backend="auto"`` for CPU tensors and by ``backend="native"``)
compiles the extension once with :func:`torch.utils.cpp_extension.load` into
``$NTHR_KERNELS_CACHE`` (default ``$XDG_CACHE_HOME/nthr_kernels``, else ``~/.cache/nthr_kernels``),
in a folder keyed by the torch version, Python version and a hash of the sources and flags; later
processes load the cached library directly (no compiler needed). Concurrent processes serialise on an
``fcntl`` lock next to that folder, so one builds and the others load its result. Nothing is compiled
at import. ``NTHR_NATIVE=0`` turns the backend off. Without a C++ compiler, ninja, or on a failed
build, one ``RuntimeWarning`` says why and ``"auto"`` uses the torch backend. CI can build ahead with
``python -m nthr_kernels.ops.native_lib`` (exit status 0 iff the ops load).

What the cache trusts: nothing it did not write. The cache folder and every build folder are created
``0700`` and refused (one warning, torch backend) when they are symlinks, owned by another user or
writable by group or others; every folder above them (symlinks resolved) must belong to this user or root and be
writable by others only with the sticky bit (``/tmp``). ``NTHR_KERNELS_CACHE`` must be an absolute
path; a relative ``XDG_CACHE_HOME`` is ignored (XDG rule). A build happens in a private temporary
folder that is renamed into place once complete, with the library's sha256 recorded in ``SHA256``;
the library is hashed and compared before every load, and a mismatch (a truncated copy, a full disk,
a planted file) is never loaded: the entry is moved aside and rebuilt (or, without a compiler, one
warning and the torch backend). The lock and the record are opened with ``O_NOFOLLOW``. Builds of
other source versions not loaded for ``STALE_DAYS`` days are removed when a new build completes.

Kernels (``csrc/advantages.cpp``, ``csrc/ops.cpp``; arguments in ``csrc/params.h``).
``nthr_advantages``: the factored algorithm of ``docs/NTHR.md``, except that positive tokens are not
scored one by one unless ``score_positive``: each positive response's anchor is ``<M, N_i> / |y_i|``
(``"all"``) or ``<M - N_i, N_i> / |y_i|`` (``"others"``) with ``N_i = E_i^T H_i`` and
``M = sum_i N_i``, so a group costs ``2 |V*| d (T + T+ + T-)`` FLOPs instead of
``2 |V*| d (2 T + T+)``. A group with few positive tokens takes the pairwise path instead
(``core.rules.pairwise_cheaper``, docs/NTHR.md): ``K_e = E+ E^T`` and ``K_h = H+ H^T`` give the negative
tokens' scores and the anchor sums for ``2 T+ T (|V*| + d)`` FLOPs, no ``M``. With ``lm_head_weight`` and no ``old_logprobs`` the full-vocabulary
``log Z`` runs first (row chunks in parallel, per vocabulary chunk one GEMM tile folded panel by panel,
in the product's epilogue, into an online log-sum-exp); then every active group in parallel, largest first: ``V*``, the prediction
errors of all its tokens (cached per column block of ``V*``), ``N_i``, ``M``, the anchors and the
negative tokens' scores ``(E_t M) . h_t``, then ``tau``, selection and rescaled
advantages. A thread out of groups runs row chunks of the errors and score products and whole ``N_i`` of
the groups still running (``csrc/params.h``, ``Team``), each with the arithmetic it has on the group's own
thread. Scratch memory: ``SCRATCH_ELEMS`` is cut into ``kWorkers = 8`` slices (``csrc/params.h``)
whatever the thread count; at most 8 threads work at once, each on one slice with at most ~6
float32 buffers of a slice (E cache, ``N_i`` and ``M``, ``W*`` rows, hidden rows, a product tile,
a log-sum-exp tile, which also holds ``W*^T`` or ``M`` packed for shared row chunks; reused from one group to
the next), so at most about ``24 * SCRATCH_ELEMS``
bytes in all (under ``32 * SCRATCH_ELEMS``, 128 MiB by default; far less in practice: the buffers
are sized to the group), plus ``O(n)`` per-token vectors (about 40 bytes per completion token) and one
``[|V|]`` int32 marker per working thread (the distinct ids of a group); no ``[n, |V|]`` tensor is formed,
and a ``[T+, T]`` one (``K_e`` of a pairwise group, in the ``N_i``/``M`` buffer) only within one slice.
Every matrix product runs on ``csrc/gemm.cpp`` (``nthr::native_gemm_engine()`` names it): a packed kernel
of the library's own where the CPU has AVX-512 (the BLAS torch ships takes its AVX2 path on AMD CPUs: half
the rate there) or else AVX2 and FMA, both summing in one order (the same bits on either ISA), else ATen's
mm (also with ``NTHR_NATIVE_GEMM=aten``; ``avx512`` or ``avx2`` asks for that kernel, refused where the CPU
lacks it; any other value but ``auto`` is refused); its packing buffers add 524 KiB per thread.
The value checks' norm pass and the old log-probs check run before the op, in one parallel region
(``nthr::native_check_values``: row chunks interleaved with the groups' GEMMs).
``score_tokens``: factored or pairwise as :func:`~nthr_kernels.core.rules.cheaper_path` decides
(passed in; C++ holds no cost model), temporaries of at most ``SCRATCH_ELEMS`` elements per work item
(plus each product's ``B`` packed once for its items, ``(N + 32) K`` floats at most),
four work items per thread on the packed kernel (rows of ``M``, then of the scores: where an item ends
changes no sum there; a slower core takes fewer), the split for 8 threads on ATen's mm (which rounds a row
by the call's shape).

All arithmetic is float32 (anchors in float64), in a fixed order; every block size that sets a summation
order depends on the inputs and the scratch budget only, and each work item runs its matrix products
single-threaded: the same inputs give the same bits at every thread count. The build disables the
compiler's contraction of ``a * b + c`` (``-ffp-contract=off``; the kernels fuse explicitly), so every ISA
clone of the vector kernels gives the same bits too (``tests/test_native_isa.py``). ``NTHR_NATIVE_TRACE=1`` prints the time of each phase of
``native_advantages`` on stderr.
"""
from __future__ import annotations

import hashlib
import platform
import logging
import os
import shlex
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "build", "gemm_engine", "require", "unavailable_reason"]

# The schemas of the native ops (implemented by the C++ library under TORCH_LIBRARY_IMPL(nthr, CPU)) and
# their fake kernels, defined before the library loads so they exist either way.
_lib = torch.library.Library("nthr", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
_lib.define(
    "native_score_tokens(Tensor h_pos, Tensor h_neg, Tensor err_pos, Tensor err_neg, int scratch_elems, "
    "bool pairwise=False) -> Tensor"
)
_lib.define(
    "native_advantages(Tensor hidden, Tensor tok_a, Tensor? tok_b, Tensor tok_ids, Tensor tok_resp, "
    "Tensor resp_group, Tensor positive, Tensor adv, Tensor group_active, Tensor eta_group, "
    "Tensor? lm_head_weight, Tensor? logits, Tensor? logprobs, float temperature, float beta, "
    "bool anchor_others, int scratch_elems, bool score_positive=False) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_lib.define(
    "native_check_values(Tensor hidden, Tensor tok_a, Tensor? tok_b, Tensor tok_ids, Tensor lm_head_weight, "
    "bool norms, bool weight_all_rows, Tensor? tok_group, Tensor? logprobs, Tensor? idx, int n_groups, "
    "float temperature, int scratch_elems) -> Tensor"
)
_lib.define(
    "native_pairwise_group(int t_pos, int t_all, int nv, int d, bool score_positive, int scratch_elems) -> bool"
)
_lib.define("native_mm(Tensor a, Tensor b) -> Tensor")
_lib.define("native_gemm_engine() -> str")


@torch.library.register_fake("nthr::native_score_tokens")
def _native_score_tokens_fake(h_pos, h_neg, err_pos, err_neg, scratch_elems, pairwise=False):
    return h_neg.new_empty((h_neg.shape[0],), dtype=torch.float32)


@torch.library.register_fake("nthr::native_advantages")
def _native_advantages_fake(hidden, tok_a, tok_b, tok_ids, tok_resp, resp_group, positive, adv, group_active,
                            eta_group, lm_head_weight, logits, logprobs, temperature, beta, anchor_others,
                            scratch_elems, score_positive=False):
    n, g = tok_ids.shape[0], group_active.shape[0]
    f32 = dict(dtype=torch.float32)
    return (
        tok_ids.new_empty((n,), **f32),
        tok_ids.new_empty((n,), dtype=torch.bool),
        tok_ids.new_empty((n,), **f32),
        tok_ids.new_empty((g,), **f32),
        tok_ids.new_empty((g,), **f32),
    )


@torch.library.register_fake("nthr::native_mm")
def _native_mm_fake(a, b):
    return a.new_empty((a.shape[0], b.shape[1]), dtype=torch.float32)


@torch.library.register_fake("nthr::native_check_values")
def _native_check_values_fake(hidden, tok_a, tok_b, tok_ids, lm_head_weight, norms, weight_all_rows, tok_group, logprobs,
                              idx, n_groups, temperature, scratch_elems):
    return hidden.new_empty((2 + (0 if idx is None else idx.shape[0]),), dtype=torch.float64)


_log = logging.getLogger("nthr_kernels")
_NAME = "nthr_native"
_SOURCES = ("vec_kernels.cpp", "gemm.cpp", "ops.cpp", "advantages.cpp")
_HEADERS = ("vec_kernels.h", "gemm.h", "native.h", "params.h")
_CFLAGS = ("-O3", "-std=c++17", "-ffp-contract=off")
# -fopenmp compiles ATen's at::parallel_for as a parallel region (for_each_item in params.h runs its
# workers on ATen's OpenMP team); the link step gets no -fopenmp, so the OpenMP symbols resolve to the
# runtime libtorch_cpu already loaded, never a second copy. A compiler without OpenMP builds without it
# (params.h then starts plain threads).
_OPENMP_CFLAGS = ("-fopenmp",)

_state_lock = threading.Lock()
_state: dict = {}  # "ok": bool, "reason": str, "path": str


def source_dir() -> Optional[Path]:
    """``csrc/`` of this checkout (editable install) or shipped inside the package."""
    here = Path(__file__).resolve().parent.parent  # nthr_kernels/
    for cand in (here / "csrc", here.parent / "csrc"):
        if all((cand / f).is_file() for f in _SOURCES + _HEADERS):
            return cand
    return None


def cache_root() -> Path:
    """The cache folder, from outside input checked like any other: ``NTHR_KERNELS_CACHE`` must be an
    absolute path (``~`` expanded); a relative ``XDG_CACHE_HOME`` is ignored, as the XDG rule says."""
    env = os.environ.get("NTHR_KERNELS_CACHE")
    if env:
        path = Path(env).expanduser()
        if not path.is_absolute() or "\0" in env:
            raise RuntimeError(f"NTHR_KERNELS_CACHE must be an absolute path, got {env!r}")
        return path
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg) if xdg and Path(xdg).is_absolute() and "\0" not in xdg else Path.home() / ".cache"
    return base / "nthr_kernels"


_FLAGS = _CFLAGS + _OPENMP_CFLAGS  # the build's flags; _CFLAGS alone where the compiler has no OpenMP


def _build_key(src: Path, flags: tuple = _FLAGS) -> str:
    """What the library must match: the sources, the flags the build used (a build without OpenMP has a key
    of its own), the machine's architecture, the Python and torch builds. Not the compiler: any compiler's
    build of these sources and flags serves, so a cache built ahead of time serves a machine without one."""
    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        h.update(f.encode())
        h.update((src / f).read_bytes())
    h.update(repr((flags, platform.machine(), torch.__version__, torch.version.git_version, sys.version_info[:2],
                   torch._C._GLIBCXX_USE_CXX11_ABI)).encode())
    return h.hexdigest()[:16]


def _build_prefix() -> str:
    return f"{_NAME}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-"


def build_dir(src: Path, root: Path, flags: tuple = _FLAGS) -> Path:
    """The folder of the build of these sources (with these flags) in cache folder ``root``."""
    return root / (_build_prefix() + _build_key(src, flags))


def _disabled() -> bool:
    """``NTHR_NATIVE``: 0/false/no/off switch the native backend off, 1/true/yes/on (or unset) leave it on;
    anything else is refused (a typo must not silently keep it on)."""
    value = os.environ.get("NTHR_NATIVE", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return True
    if value in ("1", "true", "yes", "on", ""):
        return False
    raise ValueError(f"NTHR_NATIVE: expected 0 or 1 (or false/true, no/yes, off/on), got {os.environ['NTHR_NATIVE']!r}")


def _ninja_dir() -> Optional[str]:
    """A folder to put on PATH for the build so that torch finds ninja: None when ``ninja`` is on PATH (or
    nowhere); else this environment's scripts folder or the ``ninja`` package's own binary folder. The
    ``ninja`` of ``pip install ninja`` (a dev dependency) lands in the environment's ``bin/``, which is not on
    PATH when the environment's Python is run without activating it (``.venv/bin/python``, ``make test``)."""
    if shutil.which("ninja"):
        return None
    folders = [sysconfig.get_path("scripts")]
    try:
        import ninja  # noqa: PLC0415 - optional

        folders.append(getattr(ninja, "BIN_DIR", None))
    except ImportError:
        pass
    return next((f for f in folders if f and shutil.which("ninja", path=f)), None)


class _ninja_on_path:
    """Within the block, PATH also holds :func:`_ninja_dir` (torch's build runs ``ninja`` from PATH)."""

    def __enter__(self):
        self._old, folder = os.environ.get("PATH"), _ninja_dir()
        if folder is not None:
            os.environ["PATH"] = folder + (os.pathsep + self._old if self._old else "")

    def __exit__(self, *exc):
        if self._old is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = self._old


def _cxx() -> list:
    """The compiler command of ``CXX`` (default ``c++``) as torch's build runs it: a shell word list, so that a
    launcher such as ``CXX="ccache g++"`` is a compiler, not a missing program named ``ccache g++``."""
    try:
        return shlex.split(os.environ.get("CXX") or "c++")
    except ValueError:  # unbalanced quotes: no program to run
        return []


def _missing_toolchain() -> Optional[str]:
    cxx = _cxx()
    if not cxx or shutil.which(cxx[0]) is None:
        return (f"no C++ compiler found ({os.environ.get('CXX', 'c++')!r} is not on PATH; set CXX or install "
                "g++/clang++)")
    if shutil.which("ninja") is None and _ninja_dir() is None:
        return "ninja is not installed (pip install ninja)"
    return None


# --------------------------------------------------------------------------------------------------
# a cache that trusts nothing it did not write
# --------------------------------------------------------------------------------------------------
STALE_DAYS = 7  # other builds of ours not loaded for this long are removed when a new build completes
_RECORD = "SHA256"  # "<sha256 of the library>  nthr_native.so" in a build folder, written last


def _refuse(path: Path, why: str):
    raise RuntimeError(f"refusing the native build cache: {path} {why} (set NTHR_KERNELS_CACHE to a private folder)")


def _check_private(path: Path) -> None:
    """``path`` is a real folder owned by this user and writable by nobody else."""
    st = os.lstat(path)
    if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
        _refuse(path, "is not a folder (a symlink or a file)")
    if st.st_uid != os.geteuid():
        _refuse(path, f"is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & 0o022:
        _refuse(path, f"is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})")


def _check_ancestor(folder: Path, path: Path) -> None:
    """Nobody but this user and root can replace ``folder``'s entries (``/tmp``-like sticky folders aside)."""
    st = os.stat(folder)
    if st.st_uid not in (0, os.geteuid()):
        _refuse(path, f"lies under {folder}, owned by uid {st.st_uid}")
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        _refuse(path, f"lies under {folder}, writable by group or others without the sticky bit")


def _private_dir(path: Path) -> Path:
    """Create ``path`` and its missing parents with mode 0700, checking each folder on the way down before
    anything is created in it; an existing ``path`` must be private already. The folders checked are the
    real ones: a symlink above ``path`` (``~/.cache`` linked to another disk) is resolved first, so that the
    folders above its target are checked too (checking the link's target alone missed a target inside a
    folder of another user, who could then swap the cache between the check and the load). ``path`` itself
    must not be a symlink."""
    path = Path(os.path.realpath(path.parent)) / path.name
    for folder in reversed(path.parents):
        if not os.path.lexists(folder):
            try:
                os.mkdir(folder, 0o700)
            except FileExistsError:
                pass  # created meanwhile by a concurrent process: checked next like any existing folder
        _check_ancestor(folder, path)
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    _check_private(path)
    return path


def _open_nofollow(path: Path, flags: int):
    """``os.open`` that never follows a symlink at ``path`` and accepts only a regular file of ours."""
    try:  # O_NONBLOCK: a FIFO planted at the path must not block the open (it is refused below)
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
    except OSError as e:
        if os.path.islink(path):
            _refuse(path, "is a symlink")
        raise RuntimeError(f"cannot open {path}: {e}") from e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        os.close(fd)
        _refuse(path, "is not a regular file of this user, writable only by it")
    return fd


def _lock(path: Path, blocking: bool = True) -> Optional[int]:
    """An exclusive ``fcntl`` lock on ``path`` (released by the OS if the process dies); the file
    descriptor, or None when ``blocking`` is False and another process holds the lock."""
    import fcntl

    fd = _open_nofollow(path, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


def _sha256(path: Path) -> str:
    fd = _open_nofollow(path, os.O_RDONLY)
    h = hashlib.sha256()
    with os.fdopen(fd, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _verified_library(out: Path) -> Optional[Path]:
    """The library of build folder ``out`` if it is complete and its bytes are the ones recorded at build
    time; None if there is no complete build. Raises on a folder that is not ours."""
    if not os.path.lexists(out):
        return None
    _check_private(out)
    lib, record = out / f"{_NAME}.so", out / _RECORD
    try:
        fd = _open_nofollow(record, os.O_RDONLY)
        with os.fdopen(fd) as f:
            want = f.read(200).split()
    except (RuntimeError, OSError):
        want = []
    if len(want) == 2 and want[1] == lib.name and os.path.lexists(lib) and _sha256(lib) == want[0]:
        return lib
    return None


def _write_record(out: Path, digest: str) -> None:
    tmp = out / f".{_RECORD}.{os.getpid()}"
    fd = _open_nofollow(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
    with os.fdopen(fd, "w") as f:
        f.write(f"{digest}  {_NAME}.so\n")
    os.replace(tmp, out / _RECORD)


def _discard(path: Path) -> None:
    """Move a folder of ours aside and delete it (``rmtree`` never follows symlinks inside it)."""
    trash = path.parent / f".trash-{path.name}-{os.getpid()}"
    os.rename(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def _prune_stale(root: Path, keep: Path) -> None:
    """Remove other builds of ours not loaded for STALE_DAYS days, each under its own lock, and leftovers
    of killed builds (``.build-*``, ``.trash-*``) as old."""
    cutoff = time.time() - STALE_DAYS * 86400
    for entry in os.scandir(root):
        path = Path(entry.path)
        if entry.name.startswith((".build-", ".trash-")):
            try:
                _check_private(path)
                if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                    shutil.rmtree(path, ignore_errors=True)
            except (RuntimeError, OSError) as e:
                _log.debug("nthr_kernels: not pruning %s: %s", path, e)
            continue
        if not entry.name.startswith(_build_prefix()) or entry.name.endswith(".lock") or entry.name == keep.name:
            continue
        try:
            _check_private(path)
            used = os.lstat(path / _RECORD).st_mtime if os.path.lexists(path / _RECORD) else entry.stat().st_mtime
            if used >= cutoff:
                continue
            fd = _lock(root / (entry.name + ".lock"), blocking=False)
            if fd is None:
                continue  # being built or repaired right now
            try:
                _discard(path)
            finally:
                os.close(fd)
        except (RuntimeError, OSError) as e:
            _log.debug("nthr_kernels: not pruning %s: %s", path, e)


def _openmp_problem() -> Optional[str]:
    """Why the compiler cannot compile ``_OPENMP_CFLAGS`` code (None when it can): a syntax-only probe."""
    cmd = [*_cxx(), *_OPENMP_CFLAGS, "-fsyntax-only", "-x", "c++", "-"]
    try:
        run = subprocess.run(cmd, input="#include <omp.h>\nint f() { return omp_get_max_threads(); }\n",
                             capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"
    return None if run.returncode == 0 else (run.stderr.strip().splitlines() or [f"exit {run.returncode}"])[-1]


def _compile(src: Path, root: Path, out: Path, flags: tuple, verbose: bool) -> Path:
    """Build into a private temporary folder, record the library's sha256, rename it into place. The build
    compiles a private copy of the sources, checked against ``out``'s key first: sources edited between
    the key and the compile cannot end up under that key. The caller has found the toolchain
    (:func:`_missing_toolchain`)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".build-{out.name}-", dir=root))  # mode 0700
    _log.warning("nthr_kernels: compiling the native CPU ops once (10 s to a minute); cache: %s", out)
    from torch.utils.cpp_extension import load

    try:
        copy = tmp / "csrc"
        copy.mkdir()
        for f in _SOURCES + _HEADERS:
            shutil.copyfile(src / f, copy / f)
        if build_dir(copy, root, flags) != out:
            raise RuntimeError(f"the C++ sources in {src} changed while the build started; build again")
        with _ninja_on_path():
            load(name=_NAME, sources=[str(copy / f) for f in _SOURCES], extra_cflags=list(flags),
                 extra_include_paths=[str(copy)], build_directory=str(tmp), is_python_module=False,
                 verbose=verbose)
        _write_record(tmp, _sha256(tmp / f"{_NAME}.so"))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out / f"{_NAME}.so"


def build(verbose: bool = False) -> str:
    """Build (or find) the extension and load it into this process; returns the library path.

    Raises ``RuntimeError`` with the reason when it cannot (an untrusted cache included).
    """
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed with this copy of nthr_kernels")
    root = _private_dir(cache_root())
    out = build_dir(src, root)
    lib = _verified_library(out)
    if lib is None:
        fd = _lock(root / (out.name + ".lock"))
        try:
            lib = _verified_or_discarded(out)
            flags = _FLAGS
            # A build without OpenMP has a key of its own: used where the compiler has no OpenMP, and where
            # there is no compiler at all (a cache built ahead of time may hold one). Without a compiler the
            # probe is not run: its "cannot build OpenMP code" would only hide the real reason, raised below
            # for the one warning. The toolchain is looked up once per build attempt.
            toolchain_problem = _missing_toolchain() if lib is None else None
            if lib is None and (toolchain_problem or (problem := _openmp_problem())):
                if not toolchain_problem:
                    _log.warning("nthr_kernels: the C++ compiler cannot build OpenMP code (%s); building without "
                                 "OpenMP", problem)
                flags = _CFLAGS
                out = build_dir(src, root, flags)
                lib = _verified_or_discarded(out)
            if lib is None:
                if toolchain_problem:
                    raise RuntimeError(toolchain_problem)
                lib = _compile(src, root, out, flags, verbose)
                _prune_stale(root, out)
                _check_registered(lib)
                return str(lib)  # loaded by the build
        finally:
            os.close(fd)
    try:
        os.utime(out / _RECORD, follow_symlinks=False)  # last use, for _prune_stale (bookkeeping only)
    except OSError as e:  # a read-only cache built ahead of time still serves
        _log.debug("nthr_kernels: cannot record the last use of %s: %s", out, e)
    torch.ops.load_library(str(lib))
    _check_registered(lib)
    return str(lib)


def _verified_or_discarded(out: Path) -> Optional[Path]:
    """:func:`_verified_library` of ``out``; an entry there that is not a complete, verified build is moved
    aside (under the lock), so that it is rebuilt and never loaded."""
    lib = _verified_library(out)
    if lib is None and os.path.lexists(out):
        _log.warning("nthr_kernels: the cached native library in %s is incomplete or does not match its recorded "
                     "sha256; rebuilding it", out)
        _discard(out)
    return lib


def _check_registered(lib) -> None:
    """The loaded library registered the native kernels (a library that does not is not ours)."""
    missing = [op for op in ("native_advantages", "native_score_tokens", "native_check_values", "native_mm")
               if not torch._C._dispatch_has_kernel_for_dispatch_key(f"nthr::{op}", "CPU")]
    if missing:
        raise RuntimeError(f"{lib} registered no CPU kernel for nthr::{', nthr::'.join(missing)}: not this "
                           "library's build")


def available() -> bool:
    """The native ops are loaded in this process (building them on the first call if needed)."""
    with _state_lock:
        if "ok" not in _state:
            if _disabled():
                _state.update(ok=False, reason="disabled by NTHR_NATIVE=0")
            else:
                try:
                    _state.update(ok=True, reason="", path=build())
                except Exception as e:  # noqa: BLE001 - any build/load failure means "not available"
                    _state.update(ok=False, reason=f"{type(e).__name__}: {e}".strip())
                    warnings.warn(
                        "nthr_kernels: the native CPU backend is unavailable, using the torch backend instead "
                        f"({_state['reason'][:500]}). Set NTHR_NATIVE=0 to skip the native backend.",
                        RuntimeWarning,
                        stacklevel=2,
                    )
        return _state["ok"]


def unavailable_reason() -> str:
    """Why :func:`available` is False ("" when it is True or was not asked yet)."""
    return _state.get("reason", "")


def gemm_engine() -> str:
    """The engine of the native ops' matrix products on this CPU (builds or loads the library):
    ``"nthr-avx512"`` or ``"nthr-avx2"`` (csrc/gemm.cpp's packed kernels) or ``"aten"`` (ATen's mm: no AVX2, or
    ``NTHR_NATIVE_GEMM=aten``)."""
    require()
    return _state["gemm"]


def require():
    """The native ops, loaded, with a valid ``NTHR_NATIVE_GEMM``; else ``ValueError`` before any work."""
    if not available():
        raise ValueError(f"backend: 'native' is not available ({unavailable_reason()})")
    if "gemm" not in _state:
        try:  # the C++ side reads and checks NTHR_NATIVE_GEMM once (csrc/gemm.cpp, use_kernel)
            _state["gemm"] = torch.ops.nthr.native_gemm_engine()
        except RuntimeError as e:
            raise ValueError(str(e).splitlines()[0]) from None




def _main(argv=None) -> int:
    import argparse
    import time

    ap = argparse.ArgumentParser(description="Build and load the native CPU ops of nthr_kernels.")
    ap.add_argument("--verbose", action="store_true", help="show the compiler commands")
    args = ap.parse_args(argv)
    if _disabled():
        print("native backend disabled by NTHR_NATIVE=0")
        return 1
    t0 = time.perf_counter()
    try:
        path = build(verbose=args.verbose)
    except Exception as e:  # noqa: BLE001
        print(f"native backend unavailable: {type(e).__name__}: {e}", file=sys.stderr)
        return 1
    print(f"native backend ready in {time.perf_counter() - t0:.1f}s: {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
