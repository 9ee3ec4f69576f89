"""Prediction errors on a vocabulary slice in batched PyTorch (float32), and the chunked vocabulary
logsumexp that the torch implementation of ``nthr_advantages`` shares."""
from __future__ import annotations

import math

import torch

from ...core.rules import SCRATCH_ELEMS


def vocab_logsumexp(h: torch.Tensor, w: torch.Tensor, temperature: float, budget: int) -> torch.Tensor:
    """``logsumexp_v (w_v . h_t) / T`` over the whole vocabulary for float32 rows ``h [n, d]`` (which
    it may scale in place), in vocabulary chunks: an online logsumexp, no ``[n, |V|]`` tensor.

    One logits buffer of at most ``3 * budget`` elements is reused for every chunk (written by
    ``torch.mm(out=...)``, exponentiated in place), so nothing else of that size is ever live.
    """
    vocab, d = w.shape
    n = h.shape[0]
    vc = max(1, min(vocab, 3 * budget // max(n, 1), budget // d))
    if temperature != 1.0:
        h /= temperature  # (h / T) @ W^T == (h @ W^T) / T: one [n, d] pass instead of one per chunk
    m = torch.full((n, 1), -math.inf, dtype=torch.float32, device=h.device)
    s = torch.zeros(n, dtype=torch.float32, device=h.device)
    buf = torch.empty(n * vc, dtype=torch.float32, device=h.device)
    for v0 in range(0, vocab, vc):
        wc = w[v0 : v0 + vc].float()
        z = torch.mm(h, wc.T, out=buf[: n * wc.shape[0]].view(n, wc.shape[0]))
        m_new = torch.maximum(m, z.amax(-1, keepdim=True))  # online logsumexp: 3 passes over z
        s = s * torch.exp(m - m_new).squeeze(1) + z.sub_(m_new).exp_().sum(-1)
        m = m_new
    return m.squeeze(1) + torch.log(s)


def prediction_errors(ids, vocab, *, hidden, lm_head_weight, logits, old_logprobs, temperature):
    """``[T, |vocab|]`` float32 errors of validated inputs (see :func:`nthr_kernels.prediction_errors`)."""
    t = temperature
    if logits is not None:
        z = logits.float() / t
        log_z = torch.logsumexp(z, dim=-1)
        zv = z[:, vocab]
    else:
        h = hidden.float()
        zv = h @ lm_head_weight[vocab].float().T / t
        if old_logprobs is not None:
            log_z = (h * lm_head_weight[ids].float()).sum(-1) / t - old_logprobs.float()
        else:
            log_z = vocab_logsumexp(h.clone(), lm_head_weight, t, SCRATCH_ELEMS)
    err = -(zv - log_z[:, None]).exp()
    own = ids[:, None] == vocab[None, :]
    if logits is None and old_logprobs is not None:
        # the sampled token's error is 1 - exp(l_t) = -expm1(l_t) by the definition of log Z_t: taken from l_t,
        # not from exp(z_y / T - log Z_t), whose two roundings of z_y / T (in zv and in log Z) differ (a
        # certain token, l_t = 0, got an error of ~1e-7, not 0), nor as 1 - exp(l_t), which cancels in float32
        return torch.where(own, -old_logprobs.float().expm1()[:, None], err)
    err += own
    return err
