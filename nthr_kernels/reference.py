"""Float64 ground truth for every quantity of NTHR (see ``shared/NTHR.md``).

Everything here is written for clarity, not speed: per-group Python loops, full-vocabulary softmax in
float64, and (for :func:`pairwise_scores`) the brute-force double sum. Tests and benchmarks compare the
fast backends against these functions; nothing else in the library imports them on a hot path.

Notation (one prompt group): ``P`` positive responses, ``N`` negative ones, ``p = N+ / G``.
``g_t[v] = 1[v == y_t] - pi_old(v | ctx_t)`` for ``v`` in ``V*`` (not renormalised), and

    s_t = sum_{u in positive tokens} <g_u, g_t> * <h_u, h_t>.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ._common import eta_value  # noqa: F401  (re-exported: the eta table is part of the definition)

__all__ = [
    "prediction_errors",
    "pairwise_scores",
    "factored_scores",
    "anchors",
    "threshold",
    "eta_value",
    "select",
    "token_advantages",
    "group_scores",
    "gwhes",
    "nthr_group",
]

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


def pairwise_scores(h_pos, h_neg, err_pos, err_neg) -> torch.Tensor:
    """Brute force: ``s_t = sum_u <err_pos[u], err_neg[t]> <h_pos[u], h_neg[t]>`` (materialises T+ x T)."""
    a = err_pos.to(f64) @ err_neg.to(f64).T
    b = h_pos.to(f64) @ h_neg.to(f64).T
    return (a * b).sum(0)


def factored_scores(h_pos, h_neg, err_pos, err_neg) -> torch.Tensor:
    """Factored: ``M = sum_u err_u h_u^T`` (``[V*, d]``), ``s_t = err_t^T M h_t``."""
    m = err_pos.to(f64).T @ h_pos.to(f64)
    return ((err_neg.to(f64) @ m) * h_neg.to(f64)).sum(-1)


def anchors(
    h: torch.Tensor, err: torch.Tensor, resp: torch.Tensor, positive: Sequence[bool], anchor: str = "all"
) -> dict[int, float]:
    """Positive anchors ``sbar_i`` of one group, keyed by the response's index within the group.

    ``h``/``err``: every token of the group; ``resp[t]``: index of the response owning token ``t``;
    ``positive[i]``: reward of response ``i``. ``anchor="all"`` sums over every positive token,
    ``"others"`` leaves response ``i``'s own tokens out of its own anchor. Responses without tokens have
    no anchor.
    """
    out = {}
    for i, pos in enumerate(positive):
        own = resp == i
        if not pos or not bool(own.any()):
            continue
        src = _positive_tokens(resp, positive)
        if anchor == "others":
            src &= ~own
        s = pairwise_scores(h[src], h[own], err[src], err[own])
        out[i] = float(s.mean())
    return out


def threshold(anchor_values: Sequence[float], beta: float) -> float:
    """``tau = beta * min_i sbar_i``; ``beta = 0`` gives 0, ``beta = -inf`` gives ``-inf``; NaN if no anchor."""
    if len(anchor_values) == 0:
        return math.nan
    if beta == 0.0:
        return 0.0
    if math.isinf(beta) and beta < 0:
        return -math.inf
    return beta * min(anchor_values)


def select(scores: torch.Tensor, tau: float) -> torch.Tensor:
    """A negative token is selected iff its score is strictly above tau."""
    return scores.to(f64) > tau


def token_advantages(adv: float, selected: torch.Tensor, eta: float) -> torch.Tensor:
    """``A_{j,k} = eta * A_j`` on selected tokens, ``A_j`` elsewhere."""
    out = torch.full(selected.shape, float(adv), dtype=f64)
    out[selected] *= eta
    return out


def group_scores(
    h: torch.Tensor, err: torch.Tensor, resp: torch.Tensor, positive: Sequence[bool], method: str = "pairwise"
):
    """Scores of every token of one group against all of its positive tokens.

    ``method="pairwise"`` is the brute-force double sum; ``"factored"`` the same sum through
    ``M`` (equal to it up to float64 rounding, see the tests; much cheaper at realistic sizes).
    """
    src = _positive_tokens(resp, positive)
    fn = pairwise_scores if method == "pairwise" else factored_scores
    return fn(h[src], h, err[src], err)


def _positive_tokens(resp: torch.Tensor, positive: Sequence[bool]) -> torch.Tensor:
    return torch.as_tensor([bool(x) for x in positive], dtype=torch.bool, device=resp.device)[resp]


def nthr_group(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    resp: torch.Tensor,
    positive: Sequence[bool],
    advantages: Sequence[float],
    *,
    lm_head_weight=None,
    logits=None,
    old_logprobs=None,
    temperature: float = 1.0,
    beta: float = 1.0,
    eta: str | float | Callable[[float], float] = "2|0.5-p|",
    anchor: str = "all",
    method: str = "pairwise",
) -> dict:
    """Whole NTHR for one group in float64 (on the inputs' device).

    ``hidden [T, d]``, ``token_ids [T]`` and ``resp [T]`` list every completion token of the group with
    the (group-local) response that owns it. Returns a dict with ``scores``, ``selected``,
    ``token_advantages`` (per token), ``tau``, ``eta``, ``active`` and ``anchors``.
    """
    n_resp = len(positive)
    n_pos = sum(bool(x) for x in positive)
    n_tok = token_ids.numel()
    dev = hidden.device
    pos_tok = _positive_tokens(resp, positive)
    mixed = 0 < n_pos < n_resp
    active = mixed and bool(pos_tok.any())
    adv_tok = torch.as_tensor([float(a) for a in advantages], dtype=f64, device=dev)[resp]
    res = dict(
        scores=torch.zeros(n_tok, dtype=f64, device=dev),
        selected=torch.zeros(n_tok, dtype=torch.bool, device=dev),
        token_advantages=adv_tok.clone(),
        tau=math.nan,
        eta=1.0,
        active=active,
        anchors={},
    )
    if not active:
        return res
    err = prediction_errors(
        hidden, token_ids, torch.unique(token_ids), lm_head_weight=lm_head_weight, logits=logits,
        old_logprobs=old_logprobs, temperature=temperature,
    )
    scores = group_scores(hidden, err, resp, positive, method)
    if anchor == "all":  # the mean of the group's own scores over each positive response
        anc = {i: float(scores[resp == i].mean()) for i, p in enumerate(positive) if p and bool((resp == i).any())}
    else:
        anc = anchors(hidden, err, resp, positive, anchor)
    tau = threshold(list(anc.values()), beta)
    e = eta_value(eta, n_pos / n_resp)
    sel = select(scores, tau) & ~pos_tok
    res.update(
        scores=scores,
        selected=sel,
        token_advantages=torch.where(sel, adv_tok * e, adv_tok),
        tau=tau,
        eta=e,
        anchors=anc,
    )
    return res


def gwhes(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    resp: torch.Tensor,
    positive: Sequence[bool],
    *,
    lm_head_weight=None,
    logits=None,
    old_logprobs=None,
    temperature: float = 1.0,
) -> dict:
    """GWHES (paper Eq. 5) of one group, per correct response and its mean (the question-level score).

    ``p+ = (1-p)/sqrt(p(1-p))``, ``p- = p/sqrt(p(1-p))`` and for correct response ``i``:
    ``p- * sum_{j in N} sum_{k,k'} alpha(ik, jk') <h_ik, h_jk'>
      - p+ * sum_{i' in P} sum_{k,k''} alpha(ik, i'k'') <h_ik, h_i'k''>``, ``alpha = <g, g>`` on V*.
    Returns ``{"per_response": {i: value}, "score": mean}``; needs a mixed group (NaN otherwise).
    """
    n_resp = len(positive)
    n_pos = sum(bool(x) for x in positive)
    if not 0 < n_pos < n_resp:
        return {"per_response": {}, "score": math.nan}
    p = n_pos / n_resp
    sq = math.sqrt(p * (1 - p))
    p_plus, p_minus = (1 - p) / sq, p / sq
    err = prediction_errors(
        hidden, token_ids, torch.unique(token_ids), lm_head_weight=lm_head_weight, logits=logits,
        old_logprobs=old_logprobs, temperature=temperature,
    )
    h = hidden.to(f64)
    pos_tok = _positive_tokens(resp, positive)
    per = {}
    for i, pos in enumerate(positive):
        own = resp == i
        if not pos or not bool(own.any()):
            continue
        neg_term = pairwise_scores(h[~pos_tok], h[own], err[~pos_tok], err[own]).sum()
        pos_term = pairwise_scores(h[pos_tok], h[own], err[pos_tok], err[own]).sum()
        per[i] = float(p_minus * neg_term - p_plus * pos_term)
    score = sum(per.values()) / len(per) if per else math.nan
    return {"per_response": per, "score": score}
