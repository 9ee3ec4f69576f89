"""Backends. Each exposes ``nthr_advantages(batch)`` and ``score_tokens(h_pos, h_neg, err_pos, err_neg)``.

Nothing here imports triton or compiles anything at import time; availability is probed lazily.
"""
from __future__ import annotations

import functools
import importlib.util
import os


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available() -> bool:
    """Triton is installed and there is a CUDA device, or the interpreter is on."""
    if not _triton_importable():
        return False
    if interpreting():
        return True
    import torch

    return torch.cuda.is_available()


def native_available() -> bool:
    """The C++ CPU ops are built and loaded (see ``csrc/``)."""
    try:
        from . import native_backend
    except ImportError:
        return False
    return native_backend.available()
