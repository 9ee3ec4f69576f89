"""float64 ground truth of NTHR on one group (``docs/NTHR.md``) and the per-group loop over a batch.

Per-group Python loops, full-vocabulary softmax in float64, and (``method="pairwise"``) the brute-force
double sum. Tests and benchmarks compare the fast implementations against these functions.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

f64 = torch.float64

from ...core.rules import eta_value, tau_from_min_anchor
from ..prediction_errors.reference import prediction_errors
from ..score_tokens.reference import factored_scores, pairwise_scores


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
    return float(tau_from_min_anchor(torch.tensor(min(anchor_values), dtype=f64), beta))


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


def nthr_advantages(batch, method: str = "factored"):
    """Loop over groups with :func:`reference.nthr_group` (float64, on the batch's device).

    The scores use the factored float64 form, equal to the brute-force double sum up to float64
    rounding (``tests/test_reference.py``) and affordable at realistic sizes.
    """
    n = batch.n_tokens
    dev = batch.device
    scores = torch.zeros(n, dtype=torch.float64, device=dev)
    selected = torch.zeros(n, dtype=torch.bool, device=dev)
    token_adv = batch.adv.to(torch.float64)[batch.tok_resp]
    n_groups = batch.group_ids.numel()
    tau = torch.full((n_groups,), math.nan, dtype=torch.float64)
    eta_g = torch.ones(n_groups, dtype=torch.float64)
    tok_group = batch.resp_group[batch.tok_resp]
    for g in range(n_groups):
        resps = (batch.resp_group == g).nonzero().squeeze(1)
        tok = (tok_group == g).nonzero().squeeze(1)
        local = torch.searchsorted(resps, batch.tok_resp[tok])
        kw = {}
        if batch.logits is not None:
            kw["logits"] = batch.gather(batch.logits, tok)
        else:
            kw["lm_head_weight"] = batch.lm_head_weight
            if batch.old_logprobs is not None:
                kw["old_logprobs"] = batch.gather(batch.old_logprobs, tok)
        r = nthr_group(
            batch.gather(batch.hidden, tok),
            batch.tok_ids[tok],
            local,
            batch.positive[resps].tolist(),
            batch.adv[resps].tolist(),
            temperature=batch.opts.temperature,
            beta=batch.opts.beta,
            eta=batch.opts.eta,
            anchor=batch.opts.anchor,
            method=method,
            **kw,
        )
        scores[tok] = r["scores"]
        selected[tok] = r["selected"]
        token_adv[tok] = r["token_advantages"]
        tau[g] = r["tau"]
        eta_g[g] = r["eta"]
    return scores, selected, token_adv, tau.to(torch.float32).to(dev), eta_g.to(torch.float32).to(dev)
