"""``score_tokens`` on the native C++ CPU kernels (``csrc/ops.cpp``)."""
from __future__ import annotations

from typing import Optional

import torch

from ...core.rules import SCRATCH_ELEMS, cheaper_path
from .. import native_lib


def score_tokens(h_pos, h_neg, err_pos, err_neg, budget: Optional[int] = None):
    """Float32 scores ``[T]`` of one group from dense prediction errors, on the path
    :func:`~nthr_kernels.core.rules.cheaper_path` picks."""
    native_lib.require()
    if h_neg.device.type != "cpu":
        raise ValueError(f"backend: 'native' runs on CPU tensors, got device {h_neg.device}")
    pairwise = cheaper_path(h_pos.shape[0], h_neg.shape[0], err_pos.shape[-1], h_pos.shape[-1]) == "pairwise"
    return torch.ops.nthr.native_score_tokens(h_pos, h_neg, err_pos, err_neg, int(budget or SCRATCH_ELEMS), pairwise)
