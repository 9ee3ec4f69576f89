"""``score_tokens`` on the native C++ CPU kernels (``csrc/ops.cpp``)."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.rules import SCRATCH_ELEMS
from .. import native_lib


def score_tokens(h_pos, h_neg, err_pos, err_neg, budget: Optional[int] = None):
    """Float32 scores ``[T]`` of one group from dense prediction errors (factored or pairwise)."""
    native_lib.require()
    if h_neg.device.type != "cpu":
        raise ValueError(f"backend: 'native' runs on CPU tensors, got device {h_neg.device}")
    return torch.ops.nthr.native_score_tokens(h_pos, h_neg, err_pos, err_neg, int(budget or SCRATCH_ELEMS))
