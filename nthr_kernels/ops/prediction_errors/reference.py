"""float64 reference of the prediction errors ``g_t[v] = 1[v == y_t] - pi_old(v | ctx_t)`` on a
vocabulary slice (``docs/NTHR.md``, "Getting pi_old on V* cheaply"). Written for clarity, not speed."""
from __future__ import annotations

import math

import torch

from ...core.rules import sampled_logprob

f64 = torch.float64


def prediction_errors(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    vocab: torch.Tensor,
    *,
    lm_head_weight: torch.Tensor | None = None,
    logits: torch.Tensor | None = None,
    old_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
) -> torch.Tensor:
    """``g[t, j] = 1[vocab[j] == y_t] - pi_old(vocab[j] | ctx_t)`` in float64.

    ``pi_old = softmax(z_t / T)`` with ``z_t = W h_t`` (``lm_head_weight [V, d]``) or the given
    ``logits [T, V]``. ``log Z_t = z_t[y_t] / T - l_t`` from the sampled token's log-prob ``l_t``: the given
    ``old_logprobs`` (only with the weight; then only V*'s rows of the weight are read) or, without them,
    ``-softplus(logsumexp_{v != y_t} z_t[v] / T - z_t[y_t] / T)`` over the whole vocabulary
    (:func:`nthr_kernels.core.rules.sampled_logprob`). The sampled token's own error ``1 - exp(l_t)`` is
    ``-expm1(l_t)``: as ``1 - pi`` even float64 loses a near-certain token's error below about 1e-12.
    """
    if logits is None:
        h = hidden.to(f64)
        z = h @ lm_head_weight.to(f64)[vocab].T / temperature
        z_y = (h * lm_head_weight.to(f64)[token_ids]).sum(-1) / temperature
        if old_logprobs is not None:
            lp = old_logprobs.to(f64)
        else:
            lp = sampled_logprob(_others_logsumexp(h, lm_head_weight, token_ids, temperature), z_y)
    else:
        full = logits.to(f64) / temperature
        z = full[:, vocab]
        z_y = full.gather(-1, token_ids[:, None])[:, 0]
        lp = sampled_logprob(torch.logsumexp(full.scatter(-1, token_ids[:, None], -math.inf), dim=-1), z_y)
    err = -(z - (z_y - lp)[:, None]).exp()
    return torch.where(token_ids[:, None] == vocab[None, :], -torch.expm1(lp)[:, None], err)


def _others_logsumexp(h: torch.Tensor, w: torch.Tensor, token_ids: torch.Tensor, temperature: float,
                      chunk: int = 1 << 14) -> torch.Tensor:
    """``logsumexp_{v != y_t} (w_v . h_t) / T`` over the whole vocabulary but the sampled token, in vocabulary
    chunks (float64)."""
    parts = []
    for v0 in range(0, w.shape[0], chunk):
        z = h @ w[v0 : v0 + chunk].to(f64).T / temperature
        own = token_ids[:, None] == torch.arange(v0, v0 + z.shape[1], device=z.device)[None, :]
        parts.append(torch.logsumexp(z.masked_fill(own, -math.inf), dim=-1))
    return torch.logsumexp(torch.stack(parts), dim=0)
