"""float64 reference of the scores ``s_t = sum_u <g_u, g_t> <h_u, h_t>`` (``docs/NTHR.md``, "Scores"):
the brute-force double sum and the factored form. Written for clarity, not speed."""
from __future__ import annotations

import torch

f64 = torch.float64


def pairwise_scores(h_pos, h_neg, err_pos, err_neg) -> torch.Tensor:
    """Brute force: ``s_t = sum_u <err_pos[u], err_neg[t]> <h_pos[u], h_neg[t]>`` (materialises T+ x T)."""
    a = err_pos.to(f64) @ err_neg.to(f64).T
    b = h_pos.to(f64) @ h_neg.to(f64).T
    return (a * b).sum(0)


def factored_scores(h_pos, h_neg, err_pos, err_neg) -> torch.Tensor:
    """Factored: ``M = sum_u err_u h_u^T`` (``[V*, d]``), ``s_t = err_t^T M h_t``."""
    m = err_pos.to(f64).T @ h_pos.to(f64)
    return ((err_neg.to(f64) @ m) * h_neg.to(f64)).sum(-1)
