"""``score_tokens`` on the Triton kernels: pairwise (``_pair_kernel``) or factored (``_m_kernel`` and
``_score_kernel`` reading dense errors)."""
from __future__ import annotations

import torch
import triton

from ...core.rules import cheaper_path, interpreting
from ..triton_kernels import _Kernels, _Rows, _dot_prec, _launch, _work_dtype


# --------------------------------------------------------------------------------------------------
def score_tokens(h_pos, h_neg, err_pos, err_neg, path: str = "auto"):
    """Dense-error entry on the same kernels: pairwise (``_pair_kernel``) or factored
    (``_m_kernel`` for ``M = E+^T H+`` and ``_score_kernel`` reading the dense errors)."""
    tp, tn = h_pos.shape[0], h_neg.shape[0]
    v, d = err_pos.shape[1], h_pos.shape[1]
    dev = h_neg.device
    out = torch.zeros(tn, dtype=torch.float32, device=dev)
    if tp == 0 or tn == 0:
        return out
    dts = {x.dtype for x in (h_pos, h_neg, err_pos, err_neg)}
    wd = _work_dtype(dts.pop()) if len(dts) == 1 else torch.float32
    hp, hn, ep, en = (x.to(wd) for x in (h_pos, h_neg, err_pos, err_neg))
    if path == "auto":
        path = cheaper_path(tp, tn, v, d)
    if path == "pairwise":
        _launch(
            "pair",
            lambda m_: (triton.cdiv(tn, m_["BT"]),),
            (hp, hp.stride(0), hp.stride(1), hn, hn.stride(0), hn.stride(1),
             ep, ep.stride(0), ep.stride(1), en, en.stride(0), en.stride(1), out, tp, tn, v, d),
            dict(UPCAST=interpreting() and wd == torch.bfloat16, PREC=_dot_prec(wd)),
            wd, dict(BT=16, BU=16, BK=16),
        )
        return out
    # factored: one segment whose "V*" is the err columns (VS = identity); rows of h_pos then h_neg.
    h = torch.cat([hp, hn])
    e = torch.cat([ep, en])
    idx = torch.arange(tp + tn, device=dev, dtype=torch.int64)
    k = _Kernels(h, _Rows(idx, None), None, None, None, e, 2, wd, 1.0, dev)
    ld = (tp + 15) // 16 * 16
    gp = torch.zeros(v, ld, dtype=wd, device=dev)
    gp[:, :tp] = ep.T
    ident = torch.arange(v, device=dev, dtype=torch.int64)
    t = lambda x: torch.tensor([x], dtype=torch.int64, device=dev)  # noqa: E731
    m, seg_m, _ = k.build_m(ident, t(0), t(v), t(0), t(tp), [v], [tp], gp=gp.reshape(-1))
    buf = torch.zeros(tp + tn, dtype=torch.float32, device=dev)
    k.scores(ident, t(0), t(v), seg_m, m, t(tp), t(tn), tn, buf)
    return buf[tp:]
