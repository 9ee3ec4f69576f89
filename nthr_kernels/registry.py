"""Layer 4: which implementation serves which op on which device, as data, and the one function that
chooses. The only module that imports implementations lazily: importing the package never imports
triton, compiles C++ or initialises CUDA.
"""
from __future__ import annotations

import functools
import importlib
import importlib.util

import torch

from .core.checks import check_backend
from .core.rules import interpreting

# op -> backend -> module (under nthr_kernels.ops) whose function of the op's name implements it.
IMPLEMENTATIONS = {
    "nthr_advantages": {
        "reference": "advantages.reference",
        "torch": "advantages.torch_impl",
        "triton": "advantages.triton_impl",
        "native": "advantages.native_impl",
    },
    "score_tokens": {
        "reference": "score_tokens.reference",
        "torch": "score_tokens.torch_impl",
        "triton": "score_tokens.triton_impl",
        "native": "score_tokens.native_impl",
    },
}
# "auto": the first available backend for the tensors' device type.
AUTO_PRIORITY = {"cuda": ("triton", "torch"), "cpu": ("native", "torch")}
_ENTRY = {("score_tokens", "reference"): "pairwise_scores"}


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton is installed and there is a CUDA device, or the interpreter is on."""
    if not _triton_importable():
        return False
    return interpreting() or torch.cuda.is_available()


def native_available() -> bool:
    """The C++ CPU ops are built and loaded (building them on the first call; see ``csrc/``)."""
    from .ops import native_lib

    return native_lib.available()


_AVAILABLE = {"reference": lambda: True, "torch": lambda: True, "triton": triton_available, "native": native_available}
_WHY_NOT = {
    "triton": "triton missing, or no CUDA device and TRITON_INTERPRET unset",
    "native": "the C++ extension is not built or could not load",
}


def available_backends() -> list[str]:
    """Backends usable in this process (``"reference"`` and ``"torch"`` always)."""
    return [b for b in ("reference", "torch", "triton", "native") if _AVAILABLE[b]()]


def resolve(backend: str, device: torch.device) -> str:
    """The backend that serves tensors on ``device``: ``"auto"`` picks by :data:`AUTO_PRIORITY`."""
    backend = check_backend(backend)
    if backend == "auto":
        for cand in AUTO_PRIORITY.get(device.type, ("torch",)):
            if _AVAILABLE[cand]():
                return cand
        return "torch"
    if not _AVAILABLE[backend]():
        raise ValueError(f"backend: {backend!r} is not available here ({_WHY_NOT[backend]})")
    return backend


def implementation(op: str, backend: str):
    """The function implementing ``op`` on a resolved ``backend``."""
    module = importlib.import_module(f"{__package__}.ops.{IMPLEMENTATIONS[op][backend]}")
    return getattr(module, _ENTRY.get((op, backend), op))
