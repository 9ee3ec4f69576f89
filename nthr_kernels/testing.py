"""Utilities for tests and benchmarks (not used by the library itself)."""
from __future__ import annotations

import ctypes
import sys
from typing import Callable, Optional


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def peak_rss_rise(fn: Callable[[], object]) -> Optional[int]:
    """Peak resident memory (bytes) of ``fn()`` above the resident size at its start, or None where
    it cannot be measured (non-Linux). Freed heap is returned to the OS first (``malloc_trim``) and the
    high-water mark reset (``/proc/self/clear_refs``), so reused memory shows up as a rise."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        base = _status_bytes("VmRSS:")
    except OSError:
        return None
    fn()
    return _status_bytes("VmHWM:") - base
