"""``score_tokens`` on the Triton kernels: pairwise (``_pair_kernel``) or factored (``_m_kernel`` and
``_score_kernel`` reading the dense errors from one transposed buffer)."""
from __future__ import annotations

import torch
import triton

from ...core.rules import cheaper_path
from ..triton_kernels import Kernels, Segment, Segments, launch, round16, upload, work_dtype


def score_tokens(h_pos, h_neg, err_pos, err_neg, path: str = "auto"):
    """Dense-error entry on the same kernels: pairwise (``_pair_kernel``) or factored (one segment whose
    "V*" is the error columns: ``_m_kernel`` for ``M = E+^T H+``, ``_score_kernel`` for the negative rows)."""
    tp, tn = h_pos.shape[0], h_neg.shape[0]
    v, d = err_pos.shape[1], h_pos.shape[1]
    dev = h_neg.device
    out = torch.zeros(tn, dtype=torch.float32, device=dev)
    if tp == 0 or tn == 0:
        return out
    wd = work_dtype(h_pos, h_neg, err_pos, err_neg)
    hp, hn, ep, en = (x.to(wd) for x in (h_pos, h_neg, err_pos, err_neg))
    if path == "auto":
        path = cheaper_path(tp, tn, v, d)
    if path == "pairwise":
        launch(
            "pair", lambda meta: (triton.cdiv(tn, meta["BT"]),), wd,
            hp, hn, ep, en, out, tp, tn, v, d,
            hp.stride(0), hp.stride(1), hn.stride(0), hn.stride(1), ep.stride(0), ep.stride(1), en.stride(0), en.stride(1),
        )
        return out
    # factored: rows of h_pos then h_neg; their errors transposed in one buffer [v, roundup16(tp + tn)]
    h = torch.cat([hp, hn])
    gp = torch.zeros(v, round16(tp + tn), dtype=wd, device=dev)
    gp[:, :tp] = ep.T
    gp[:, tp:tp + tn] = en.T
    k = Kernels(h, torch.arange(tp + tn, device=dev, dtype=torch.int64) * h.stride(0), wd)
    row = Segment(vs0=0, nv=v, row0=0, nerr=tp + tn, npos=tp, gp=0, m=0, sc0=tp, nsc=tn, group=0)
    seg = Segments(upload(list(row), dev).view(1, -1), [row])
    buf = torch.zeros(tp + tn, dtype=torch.float32, device=dev)
    m, _ = k.build_m(seg, gp.reshape(-1))
    k.scores(seg, m, buf, gp=gp.reshape(-1))
    return buf[tp:]
