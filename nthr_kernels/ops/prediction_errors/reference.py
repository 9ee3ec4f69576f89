"""float64 reference of the prediction errors ``g_t[v] = 1[v == y_t] - pi_old(v | ctx_t)`` on a
vocabulary slice (``docs/NTHR.md``, "Getting pi_old on V* cheaply"). Written for clarity, not speed."""
from __future__ import annotations

import torch

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
    ``logits [T, V]``. With ``old_logprobs`` (``l_t = log pi_old(y_t)``, only with the weight) the
    normaliser comes from the shortcut ``log Z_t = z_t[y_t] / T - l_t`` instead of the full vocabulary.
    """
    if logits is None:
        z = hidden.to(f64) @ lm_head_weight.to(f64)[vocab].T / temperature
        if old_logprobs is not None:
            z_y = (hidden.to(f64) * lm_head_weight.to(f64)[token_ids]).sum(-1) / temperature
            log_z = z_y - old_logprobs.to(f64)
        else:
            log_z = _chunked_logsumexp(hidden.to(f64), lm_head_weight, temperature)
    else:
        full = logits.to(f64) / temperature
        z = full[:, vocab]
        log_z = torch.logsumexp(full, dim=-1)
    err = -(z - log_z[:, None]).exp()
    err += (token_ids[:, None] == vocab[None, :]).to(f64)
    return err


def _chunked_logsumexp(h: torch.Tensor, w: torch.Tensor, temperature: float, chunk: int = 1 << 14) -> torch.Tensor:
    """``logsumexp_v (w_v . h_t) / T`` over the whole vocabulary, in vocabulary chunks (float64)."""
    parts = [torch.logsumexp(h @ w[v0 : v0 + chunk].to(f64).T / temperature, dim=-1) for v0 in range(0, w.shape[0], chunk)]
    return torch.logsumexp(torch.stack(parts), dim=0)
