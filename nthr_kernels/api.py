"""Layer 6, the public API: :func:`score_tokens`, :func:`nthr_advantages`, :func:`prediction_errors`.

Every function validates its inputs (``ValueError``/``TypeError`` naming the argument), runs under
``torch.no_grad``, never writes to its inputs and returns tensors without autograd history.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from . import library  # noqa: F401  (registers the torch.ops.nthr.* ops this module calls)
from .core.checks import (
    check_backend,
    check_batch_static,
    check_bool,
    check_prediction_inputs,
    check_score_inputs,
    group_success_rates,
)
from .core.rules import EtaSpec, Inputs, NTHRResult, Options
from .ops.prediction_errors import torch_impl as _pe
from .registry import available_backends

__all__ = ["NTHRResult", "nthr_advantages", "score_tokens", "prediction_errors", "available_backends", "ErrorsOnVocab"]


# --------------------------------------------------------------------------------------------------
def score_tokens(
    h_pos: torch.Tensor,
    h_neg: torch.Tensor,
    err_pos: torch.Tensor,
    err_neg: torch.Tensor,
    *,
    backend: str = "auto",
    check_finite: bool = True,
) -> torch.Tensor:
    """NTHR scores of the tokens of one group: ``s_t = sum_u <err_pos[u], err_neg[t]> <h_pos[u], h_neg[t]>``.

    ``h_pos [T+, d]``, ``err_pos [T+, V]`` are the hidden states and prediction errors of every token of
    the group's positive responses; ``h_neg [T, d]``, ``err_neg [T, V]`` those of the tokens to score.
    ``V`` is any vocabulary slice common to both (normally the group's ``V*``; see
    :func:`prediction_errors`). float16, bfloat16, float32 or float64 inputs; float32 accumulation; returns
    float32 ``[T]``. ``check_finite`` (default True): finite inputs within float32 range, and scores that
    cannot leave it (``T+`` times the four largest row norms).
    The backend computes either the factored form (``M = err_pos^T h_pos``) or the pairwise form,
    whichever costs fewer FLOPs; neither forms a ``T+ x T`` matrix.

    Runs as the op ``torch.ops.nthr.score_tokens`` (see :mod:`nthr_kernels.library`): the shape and dtype
    checks run here, the finiteness check and the backend inside the op, so ``torch.compile`` traces
    this function without a graph break.
    """
    with torch.no_grad():
        check_backend(backend)
        check_bool("check_finite", check_finite)
        check_score_inputs(h_pos, h_neg, err_pos, err_neg, False)
        return torch.ops.nthr.score_tokens(h_pos, h_neg, err_pos, err_neg, backend, check_finite)


# --------------------------------------------------------------------------------------------------
class ErrorsOnVocab(NamedTuple):
    """``errors [T, |vocab|]`` (float32): ``1[vocab[j] == y_t] - pi_old(vocab[j] | ctx_t)``; ``vocab``: ids."""

    errors: torch.Tensor
    vocab: torch.Tensor


def prediction_errors(
    token_ids: torch.Tensor,
    *,
    hidden: Optional[torch.Tensor] = None,
    lm_head_weight: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    vocab: Optional[torch.Tensor] = None,
    check_finite: bool = True,
    check_logprobs: bool = True,
) -> ErrorsOnVocab:
    """Prediction errors on ``V*`` for :func:`score_tokens`, from logits or from hidden + lm_head.

    ``token_ids [T]``: every completion token of one group (positive and negative responses);
    ``vocab`` defaults to their sorted unique ids (the group's ``V*``). The old policy is
    ``softmax(logits / T)`` (``logits [T, V]``) or ``softmax(W h / T)`` (``hidden [T, d]`` with
    ``lm_head_weight [V, d]``); with ``old_logprobs [T]`` the normaliser uses the shortcut
    ``log Z_t = (w_{y_t} . h_t) / T - l_t`` and only the ``|vocab|`` rows of ``W`` (and those of the token
    ids) are read. Without them, ``log Z`` takes one chunked pass over the vocabulary. Probabilities are not
    renormalised on the slice. Scratch: ``O(T * |vocab|)`` output plus a bounded logsumexp chunk.
    ``check_logprobs`` (default True): the :func:`nthr_advantages` check that ``old_logprobs`` belong to the
    hidden states, on the same sample and rule, over ``vocab`` (a sampled token may imply at most
    probability ``exp(LOGPROB_TOLERANCE)`` on it). ``check_finite`` (default True): finite inputs within
    float32 range and the logit scale, on the values read.

    Example::

        ids = torch.cat([ids_pos, ids_neg])
        err, vocab = prediction_errors(ids, hidden=torch.cat([h_pos, h_neg]), lm_head_weight=W)
        s = score_tokens(h_pos, h_neg, err[: len(ids_pos)], err[len(ids_pos):])
    """
    with torch.no_grad():
        ids, vocab, temperature = check_prediction_inputs(
            token_ids, hidden, lm_head_weight, logits, old_logprobs, temperature, vocab, check_finite, check_logprobs
        )
        err = _pe.prediction_errors(ids, vocab, hidden=hidden, lm_head_weight=lm_head_weight, logits=logits,
                                    old_logprobs=old_logprobs, temperature=temperature)
        return ErrorsOnVocab(err, vocab)


# --------------------------------------------------------------------------------------------------
def nthr_advantages(
    hidden: torch.Tensor,
    token_ids: torch.Tensor,
    rewards: torch.Tensor,
    advantages: torch.Tensor,
    *,
    lm_head_weight: Optional[torch.Tensor] = None,
    logits: Optional[torch.Tensor] = None,
    old_logprobs: Optional[torch.Tensor] = None,
    temperature: float = 1.0,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    group_size: Optional[int] = None,
    group_ids=None,
    beta: float = 1.0,
    eta: EtaSpec = "2|0.5-p|",
    anchor: str = "all",
    reward_threshold: Optional[float] = None,
    backend: str = "auto",
    check_finite: bool = True,
    check_logprobs: bool = True,
    score_positive: bool = False,
    process_group=None,
) -> NTHRResult:
    """NTHR token advantages for a whole rollout batch (every group at once).

    Layouts: padded (``hidden [R, L, d]``, ``token_ids [R, L]``, and the required ``mask [R, L]``
    marking the completion tokens, holes allowed; pass an all-true mask when there is no padding) or
    packed (``hidden [N, d]``, ``token_ids [N]``, ``cu_seqlens [R+1]``). ``hidden`` at a token is the
    lm_head input that produced that token's distribution. ``rewards [R]`` are binary: 0/1 or bool by
    default; with an explicit ``reward_threshold``, correct iff ``reward > reward_threshold`` (at
    most one distinct value on each side). ``advantages [R]`` the response-level advantages (e.g. GRPO's). Groups:
    ``group_size`` (responses ``g*G .. g*G+G-1``) or ``group_ids [R]`` (any integers, any order).
    Response and token counts may be 0; the hidden size and the vocabulary may not.

    Old policy: ``lm_head_weight [V, d]`` (with ``old_logprobs``, laid out like ``token_ids``, only the
    ``|V*|`` rows of the weight are read), or ``logits``; ``pi_old = softmax(. / temperature)``.
    ``check_logprobs`` (default True): on a small deterministic sample of tokens, the probabilities that
    ``old_logprobs`` imply on ``V*`` must not exceed 1 beyond a measured tolerance (docs/NTHR.md), which
    catches log-probs taken one position off or at another temperature.
    ``check_finite`` (default True): every float input must be finite and within float32 range (the
    maths is float32) and ``|logits| / temperature`` within ``LOGIT_LIMIT`` (core/rules.py).

    For each mixed group: ``s_t = sum_{u in P} <g_u, g_t> <h_u, h_t>`` for every token,
    ``tau = beta * min_{i in P} mean_k s_{i,k}`` (``anchor="others"`` leaves response ``i``'s tokens out
    of its own anchor), a negative token is selected iff ``s_t > tau``, and its advantage becomes
    ``eta * A_j`` (``eta``: ``"2|0.5-p|"``, ``"1-p"``, ``"p"``, a constant in [0, 1] or a callable of the
    success rate ``p``). Everything else keeps ``A_i``; padding gets 0.

    ``backend``: ``"auto"`` (Triton on CUDA, native C++ on CPU when built, else torch), ``"torch"``,
    ``"triton"``, ``"native"``, or ``"reference"`` (float64, slow). Scratch memory of the torch backend:
    see :mod:`nthr_kernels.ops.advantages.torch_impl`.

    ``process_group``: a ``torch.distributed`` group whose ranks each hold some whole responses of the
    batch (a group may straddle ranks); every rank calls this with its own responses and their global
    ``group_ids`` (``group_size`` is refused). Every rank validates its inputs and the ranks agree on the
    outcome before any data moves: a bad argument on one rank raises on every rank. A rank that dies or
    never calls leaves the others waiting for the process group's timeout. See
    :mod:`nthr_kernels.ops.advantages.distributed`.
    """
    x = Inputs(hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, mask, cu_seqlens,
               group_size, group_ids)
    opts = Options(beta=beta, eta=eta, anchor=anchor, temperature=temperature, reward_threshold=reward_threshold,
                   backend=backend, check_finite=check_finite, check_logprobs=check_logprobs,
                   score_positive=score_positive)
    if process_group is not None:
        from .ops.advantages.distributed import nthr_advantages_distributed

        return nthr_advantages_distributed(x, opts, process_group)
    with torch.no_grad():
        # Static checks here (traceable by torch.compile); value checks and the backend run inside the
        # op torch.ops.nthr.nthr_advantages (nthr_kernels/library.py).
        st = check_batch_static(x, opts)
        o = st.opts
        eta_name, eta_const, eta_table = "", 0.0, None
        if isinstance(eta, str):
            eta_name = eta
        elif callable(eta):  # evaluated here, per group, in eager Python (a graph break under compile)
            rates = group_success_rates(rewards, o.reward_threshold, group_size, st.group_ids)
            eta_table = library.callable_eta_table(eta, rates)
        else:
            eta_const = float(eta)
        out = torch.ops.nthr.nthr_advantages(
            hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, o.temperature, mask,
            cu_seqlens, group_size, st.group_ids, o.beta, eta_name, eta_const, eta_table, anchor,
            o.reward_threshold, backend, o.check_finite, o.check_logprobs, o.score_positive,
        )
        return NTHRResult(*out)
