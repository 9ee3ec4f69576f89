"""Prediction errors on a vocabulary slice in batched PyTorch (float32), and the chunked vocabulary
logsumexp that the torch implementation of ``nthr_advantages`` shares."""
from __future__ import annotations

import math

import torch

from ...core.rules import LSE_TILE_ELEMS, SCRATCH_ELEMS, sampled_logprob


def vocab_logsumexp(h: torch.Tensor, w: torch.Tensor, ids: torch.Tensor, temperature: float, budget: int):
    """``(L, z_y)`` for float32 rows ``h [n, d]`` (which it may scale in place) with sampled ids ``ids [n]``:
    ``L = logsumexp_{v != y_t} (w_v . h_t) / T`` over the whole vocabulary but the sampled token, and
    ``z_y = (w_{y_t} . h_t) / T`` from the same product (for :func:`nthr_kernels.core.rules.sampled_logprob`).
    In vocabulary chunks: an online logsumexp, no ``[n, |V|]`` tensor, no host synchronisation.

    One logits buffer of at most ``3 * budget`` elements (on CPU at most ``LSE_TILE_ELEMS``, when that holds a
    row) is reused for every chunk (written by ``torch.mm(out=...)``, exponentiated in place), so nothing else of
    that size is ever live.
    """
    vocab, d = w.shape
    n = h.shape[0]
    vc = max(1, min(vocab, 3 * budget // max(n, 1), budget // d))
    if h.device.type == "cpu":
        vc = min(vc, max(1, LSE_TILE_ELEMS // max(n, 1)))
    if temperature != 1.0:
        h /= temperature  # (h / T) @ W^T == (h @ W^T) / T: one [n, d] pass instead of one per chunk
    m = torch.full((n, 1), -math.inf, dtype=torch.float32, device=h.device)
    s = torch.zeros(n, dtype=torch.float32, device=h.device)
    z_y = torch.zeros(n, 1, dtype=torch.float32, device=h.device)
    buf = torch.empty(n * vc, dtype=torch.float32, device=h.device)
    for v0 in range(0, vocab, vc):
        wc = w[v0 : v0 + vc].float()
        z = torch.mm(h, wc.T, out=buf[: n * wc.shape[0]].view(n, wc.shape[0]))
        j = (ids - v0)[:, None]
        here = (j >= 0) & (j < z.shape[1])
        j = j.clamp(0, z.shape[1] - 1)
        own = z.gather(1, j)
        z_y = torch.where(here, own, z_y)
        z.scatter_(1, j, torch.where(here, -math.inf, own))  # the sampled token leaves the sum
        m_new = torch.maximum(m, z.amax(-1, keepdim=True))  # online logsumexp: 3 passes over z
        shift = torch.where(m_new == -math.inf, 0.0, m_new)  # rows with no other token yet (|V| = 1)
        s = s * torch.exp(m - shift).squeeze(1) + z.sub_(shift).exp_().sum(-1)
        m = m_new
    return m.squeeze(1) + torch.log(s), z_y.squeeze(1)


def logits_logprob(z: torch.Tensor, ids: torch.Tensor) -> tuple:
    """``(log Z, l)`` of float32 scaled logits rows ``z [n, V]`` and their sampled ids: ``l`` by
    :func:`nthr_kernels.core.rules.sampled_logprob` from the other tokens' logsumexp, ``log Z = z_y - l``."""
    z_y = z.gather(1, ids[:, None])
    lp = sampled_logprob(torch.logsumexp(z.scatter(1, ids[:, None], -math.inf), dim=-1), z_y.squeeze(1))
    return z_y.squeeze(1) - lp, lp


def prediction_errors(ids, vocab, *, hidden, lm_head_weight, logits, old_logprobs, temperature):
    """``[T, |vocab|]`` float32 errors of validated inputs (see :func:`nthr_kernels.prediction_errors`)."""
    t = temperature
    if logits is not None:
        z = logits.float() / t
        log_z, lp = logits_logprob(z, ids)
        zv = z[:, vocab]
    else:
        h = hidden.float()
        zv = h @ lm_head_weight[vocab].float().T / t
        if old_logprobs is not None:
            lp = old_logprobs.float()
            log_z = (h * lm_head_weight[ids].float()).sum(-1) / t - lp
        else:
            others, z_y = vocab_logsumexp(h.clone(), lm_head_weight, ids, t, SCRATCH_ELEMS)
            lp = sampled_logprob(others, z_y)
            log_z = z_y - lp
    err = -(zv - log_z[:, None]).exp()
    # the sampled token's error 1 - exp(l_t) is -expm1(l_t): taken from l_t, not from exp(z_y / T - log Z_t),
    # whose two roundings of z_y / T (in zv and in log Z) differ (a certain token, l_t = 0, got an error of
    # ~1e-7, not 0), nor as 1 - exp(l_t), which cancels a near-certain token's error in float32
    return torch.where(ids[:, None] == vocab[None, :], -lp.expm1()[:, None], err)
