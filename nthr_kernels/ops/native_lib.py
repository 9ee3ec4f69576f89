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

Kernels (``csrc/advantages.cpp``, ``csrc/ops.cpp``). ``nthr_advantages``: the factored algorithm of
``docs/NTHR.md``; with ``lm_head_weight`` and no ``old_logprobs`` the full-vocabulary ``log Z`` runs
first (one threaded GEMM tile per token block and vocabulary chunk, folded at once into an online
log-sum-exp, rows in parallel; the tile and the hidden block hold at most ``SCRATCH_ELEMS`` elements);
then every active group in parallel (``at::parallel_for``): ``V*``, the prediction errors of all its
tokens (cached per column block of ``V*``), ``M = E+^T H+`` and ``s_t = (E_t M) . h_t`` with ATen
GEMMs, then anchors, ``tau``, selection and rescaled advantages in the same pass. Scratch memory: each
thread holds at most about eight float32 buffers of ``SCRATCH_ELEMS / threads`` elements (so at most
about ``32 * SCRATCH_ELEMS`` bytes, 128 MiB by default; in practice far less, the buffers are sized to
the group: under 10 MiB at the benchmark shape), plus ``O(n)`` per-token vectors (about 40 bytes per
completion token); no ``[n, |V|]`` or ``[T+, T]`` tensor is formed.
``score_tokens``: factored or pairwise, whichever costs fewer FLOPs, temporaries of at most
``SCRATCH_ELEMS`` elements per thread.

All arithmetic is float32 (anchors in float64), in a fixed order: the same inputs and thread count give
the same bits. ``NTHR_NATIVE_TRACE=1`` prints the time of each phase of ``native_advantages`` on stderr.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import threading
import warnings
from pathlib import Path
from typing import Optional

import torch

__all__ = ["available", "build", "require", "unavailable_reason"]

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



_log = logging.getLogger("nthr_kernels")
_NAME = "nthr_native"
_SOURCES = ("vec_kernels.cpp", "ops.cpp", "advantages.cpp")
_HEADERS = ("vec_kernels.h", "native.h", "params.h")
_CFLAGS = ("-O3", "-std=c++17")

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
    env = os.environ.get("NTHR_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "nthr_kernels"


def _build_key(src: Path) -> str:
    h = hashlib.sha256()
    for f in _SOURCES + _HEADERS:
        h.update(f.encode())
        h.update((src / f).read_bytes())
    h.update(repr((_CFLAGS, torch.__version__, sys.version_info[:2], torch._C._GLIBCXX_USE_CXX11_ABI)).encode())
    return h.hexdigest()[:16]


def _disabled() -> bool:
    return os.environ.get("NTHR_NATIVE", "1").strip().lower() in ("0", "false", "no", "off")


def _missing_toolchain() -> Optional[str]:
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler found ({cxx!r} is not on PATH; set CXX or install g++/clang++)"
    from torch.utils.cpp_extension import is_ninja_available

    if not is_ninja_available():
        return "ninja is not installed (pip install ninja)"
    return None


def _lock(path: Path):
    """An exclusive ``fcntl`` lock on ``path`` (released by the OS if the process dies)."""
    import fcntl

    fh = open(path, "a+")
    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
    return fh


def build(verbose: bool = False) -> str:
    """Build (or find) the extension and load it into this process; returns the library path.

    Raises ``RuntimeError`` with the reason when it cannot.
    """
    src = source_dir()
    if src is None:
        raise RuntimeError("the C++ sources (csrc/) are not installed with this copy of nthr_kernels")
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    out = root / f"{_NAME}-torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{_build_key(src)}"
    lib, done = out / f"{_NAME}.so", out / "COMPLETE"
    if not done.is_file():
        fh = _lock(root / (out.name + ".lock"))
        try:
            if not done.is_file():
                problem = _missing_toolchain()
                if problem:
                    raise RuntimeError(problem)
                out.mkdir(exist_ok=True)
                stale = out / "lock"  # torch's own build baton, left behind by a killed build
                if stale.exists():
                    stale.unlink()
                _log.warning("nthr_kernels: compiling the native CPU ops once (10 s to a minute); cache: %s", out)
                from torch.utils.cpp_extension import load

                load(
                    name=_NAME,
                    sources=[str(src / f) for f in _SOURCES],
                    extra_cflags=list(_CFLAGS),
                    extra_include_paths=[str(src)],
                    build_directory=str(out),
                    is_python_module=False,
                    verbose=verbose,
                )
                done.write_text(str(lib))
                return str(lib)
        finally:
            fh.close()
    torch.ops.load_library(str(lib))
    return str(lib)


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


def require():
    if not available():
        raise ValueError(f"backend: 'native' is not available ({unavailable_reason()})")




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
