"""``score_tokens`` in batched PyTorch: factored or pairwise (whichever costs fewer FLOPs), float32,
every temporary bounded by the scratch budget; never a ``T+ x T`` matrix."""
from __future__ import annotations

import math
from typing import Optional

import torch

from ...core.rules import SCRATCH_ELEMS, cheaper_path


def score_tokens(h_pos, h_neg, err_pos, err_neg, budget: Optional[int] = None, path: str = "auto"):
    """``s_t = sum_u <err_pos[u], err_neg[t]> <h_pos[u], h_neg[t]>`` in float32, factored or pairwise
    (whichever costs fewer FLOPs), every temporary bounded by ``budget`` elements."""
    budget = budget or SCRATCH_ELEMS
    tp, tn = h_pos.shape[0], h_neg.shape[0]
    v, d = err_pos.shape[1], h_pos.shape[1]
    out = torch.zeros(tn, dtype=torch.float32, device=h_neg.device)
    if tp == 0 or tn == 0:
        return out
    if path == "auto":
        path = cheaper_path(tp, tn, v, d)
    if path == "factored":
        vb = max(1, min(v, budget // d))
        rb = max(1, budget // max(vb, d))
        for c0 in range(0, v, vb):
            m = torch.zeros(min(vb, v - c0), d, dtype=torch.float32, device=h_neg.device)
            for r0 in range(0, tp, rb):
                m.addmm_(err_pos[r0 : r0 + rb, c0 : c0 + vb].float().T, h_pos[r0 : r0 + rb].float())
            for r0 in range(0, tn, rb):
                e = err_neg[r0 : r0 + rb, c0 : c0 + vb].float()
                out[r0 : r0 + rb] += ((e @ m) * h_neg[r0 : r0 + rb].float()).sum(-1)
        return out
    # pairwise, flash-attention style: [bn, bp] tiles of both Gram matrices, row sums accumulated.
    bn = max(1, min(tn, int(math.sqrt(budget))))
    bp = max(1, min(tp, budget // max(bn, v, d)))
    for n0 in range(0, tn, bn):
        en, hn = err_neg[n0 : n0 + bn].float(), h_neg[n0 : n0 + bn].float()
        acc = torch.zeros(en.shape[0], dtype=torch.float32, device=h_neg.device)
        for p0 in range(0, tp, bp):
            a = en @ err_pos[p0 : p0 + bp].float().T
            a *= hn @ h_pos[p0 : p0 + bp].float().T
            acc += a.sum(1)
        out[n0 : n0 + bn] = acc
    return out
