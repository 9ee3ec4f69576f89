"""Public API: :func:`score_tokens`, :func:`nthr_advantages`, :func:`prediction_errors`.

Every function validates its inputs (``ValueError``/``TypeError`` naming the argument), runs under
``torch.no_grad``, never writes to its inputs and returns tensors without autograd history.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from . import ops as _ops
from . import reference as _ref
from ._common import EtaSpec
from ._validate import (
    check_all_finite,
    check_backend,
    check_batch_static,
    check_float_tensor,
    check_int_tensor,
    check_real,
    check_score_inputs,
    group_success_rates,
    validate_batch,  # noqa: F401  (re-exported for the distributed path)
)
from .backends import torch_backend

__all__ = ["NTHRResult", "nthr_advantages", "score_tokens", "prediction_errors", "available_backends", "ErrorsOnVocab"]


@dataclass
class NTHRResult:
    """Output of :func:`nthr_advantages`.

    Per token (layout of ``token_ids``): ``token_advantages`` (float32, 0 at padding), ``selected``
    (bool), ``scores`` (float32; every completion token of an active group, 0 elsewhere).
    Per group, ordered by sorted unique group id: ``group_ids``, ``tau`` (float32, NaN when inactive),
    ``eta`` (float32, 1.0 when inactive), ``active`` (bool: mixed group whose positive responses have
    at least one token).
    """

    token_advantages: torch.Tensor
    selected: torch.Tensor
    scores: torch.Tensor
    group_ids: torch.Tensor
    tau: torch.Tensor
    eta: torch.Tensor
    active: torch.Tensor


def available_backends() -> list[str]:
    """Backends usable in this process (``"reference"`` and ``"torch"`` always)."""
    out = ["reference", "torch"]
    from .backends import triton_available, native_available  # lazy: never imports triton eagerly

    if triton_available():
        out.append("triton")
    if native_available():
        out.append("native")
    return out


def _resolve(backend: str, device: torch.device) -> str:
    backend = check_backend(backend)
    if backend == "auto":
        from .backends import native_available, triton_available

        if device.type == "cuda" and triton_available():
            return "triton"
        if device.type == "cpu" and native_available():
            return "native"
        return "torch"
    if backend == "triton":
        from .backends import triton_available

        if not triton_available():
            raise ValueError("backend: 'triton' is not available here (triton missing, or no CUDA device and TRITON_INTERPRET unset)")
    if backend == "native":
        from .backends import native_available

        if not native_available():
            raise ValueError("backend: 'native' is not available (the C++ extension is not built or could not load)")
    return backend


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
    :func:`prediction_errors`). Any float dtype; float32 accumulation; returns float32 ``[T]``.
    The backend computes either the factored form (``M = err_pos^T h_pos``) or the pairwise form,
    whichever costs fewer FLOPs; neither forms a ``T+ x T`` matrix.

    Runs as the op ``torch.ops.nthr.score_tokens`` (see :mod:`nthr_kernels.ops`): the shape and dtype
    checks run here, the finiteness check and the backend inside the op, so ``torch.compile`` traces
    this function without a graph break.
    """
    with torch.no_grad():
        check_backend(backend)
        check_score_inputs(h_pos, h_neg, err_pos, err_neg, False)
        return torch.ops.nthr.score_tokens(h_pos, h_neg, err_pos, err_neg, backend, bool(check_finite))


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
) -> ErrorsOnVocab:
    """Prediction errors on ``V*`` for :func:`score_tokens`, from logits or from hidden + lm_head.

    ``token_ids [T]``: every completion token of one group (positive and negative responses);
    ``vocab`` defaults to their sorted unique ids (the group's ``V*``). The old policy is
    ``softmax(logits / T)`` (``logits [T, V]``) or ``softmax(W h / T)`` (``hidden [T, d]`` with
    ``lm_head_weight [V, d]``); with ``old_logprobs [T]`` the normaliser uses the shortcut
    ``log Z_t = (w_{y_t} . h_t) / T - l_t`` and only the ``|vocab|`` rows of ``W`` are read. Without
    them, ``log Z`` takes one chunked pass over the vocabulary. Probabilities are not renormalised on
    the slice. Scratch: ``O(T * |vocab|)`` output plus a bounded logsumexp chunk.

    Example::

        ids = torch.cat([ids_pos, ids_neg])
        err, vocab = prediction_errors(ids, hidden=torch.cat([h_pos, h_neg]), lm_head_weight=W)
        s = score_tokens(h_pos, h_neg, err[: len(ids_pos)], err[len(ids_pos):])
    """
    with torch.no_grad():
        check_int_tensor("token_ids", token_ids)
        if token_ids.dim() != 1:
            raise ValueError(f"token_ids: expected a 1-D tensor [T], got shape {tuple(token_ids.shape)}")
        n = token_ids.shape[0]
        if (lm_head_weight is None) == (logits is None):
            raise ValueError("lm_head_weight, logits: pass exactly one of the two")
        if lm_head_weight is not None:
            if hidden is None:
                raise ValueError("hidden: required with lm_head_weight")
            check_float_tensor("hidden", hidden)
            check_float_tensor("lm_head_weight", lm_head_weight)
            if hidden.dim() != 2 or hidden.shape[0] != n:
                raise ValueError(f"hidden: expected shape [{n}, d], got {tuple(hidden.shape)}")
            if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
                raise ValueError(
                    f"lm_head_weight: expected [V, {hidden.shape[1]}] (hidden's size), got {tuple(lm_head_weight.shape)}"
                )
            v_size = lm_head_weight.shape[0]
        else:
            check_float_tensor("logits", logits)
            if logits.dim() != 2 or logits.shape[0] != n:
                raise ValueError(f"logits: expected shape [{n}, V], got {tuple(logits.shape)}")
            if old_logprobs is not None:
                raise ValueError("old_logprobs: only used with lm_head_weight")
            v_size = logits.shape[1]
        temperature = check_real("temperature", temperature)
        if temperature <= 0:
            raise ValueError(f"temperature: must be > 0, got {temperature}")
        ids = token_ids.to(torch.int64)
        if n and (int(ids.min()) < 0 or int(ids.max()) >= v_size):
            raise ValueError(f"token_ids: ids must lie in [0, {v_size})")
        if vocab is None:
            vocab = torch.unique(ids)
        else:
            check_int_tensor("vocab", vocab)
            vocab = vocab.to(torch.int64)
            if vocab.dim() != 1 or (vocab.numel() and (int(vocab.min()) < 0 or int(vocab.max()) >= v_size)):
                raise ValueError(f"vocab: expected a 1-D tensor of ids in [0, {v_size})")
        if old_logprobs is not None:
            check_float_tensor("old_logprobs", old_logprobs)
            if tuple(old_logprobs.shape) != (n,):
                raise ValueError(f"old_logprobs: expected shape [{n}], got {tuple(old_logprobs.shape)}")
            if n and (float(old_logprobs.max()) > 0 or not bool(torch.isfinite(old_logprobs).all())):
                raise ValueError("old_logprobs: expected finite log-probabilities <= 0")
        if check_finite:
            if logits is not None:
                check_all_finite("logits", logits)
            else:
                check_all_finite("hidden", hidden)
                check_all_finite("lm_head_weight", lm_head_weight)
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
                log_z = torch_backend.vocab_logsumexp(h.clone(), lm_head_weight, t, torch_backend.SCRATCH_ELEMS)
        err = -(zv - log_z[:, None]).exp()
        err += ids[:, None] == vocab[None, :]
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
    reward_threshold: float = 0.5,
    backend: str = "auto",
    check_finite: bool = True,
    process_group=None,
) -> NTHRResult:
    """NTHR token advantages for a whole rollout batch (every group at once).

    Layouts: padded (``hidden [R, L, d]``, ``token_ids [R, L]``, optional ``mask [R, L]`` marking the
    completion tokens, holes allowed) or packed (``hidden [N, d]``, ``token_ids [N]``, ``cu_seqlens
    [R+1]``). ``hidden`` at a token is the lm_head input that produced that token's distribution.
    ``rewards [R]`` are binary (correct iff ``> reward_threshold``); ``advantages [R]`` the
    response-level advantages (e.g. GRPO's). Groups: ``group_size`` (responses ``g*G .. g*G+G-1``) or
    ``group_ids [R]`` (any integers, any order).

    Old policy: ``lm_head_weight [V, d]`` (with ``old_logprobs``, laid out like ``token_ids``, only the
    ``|V*|`` rows of the weight are read), or ``logits``; ``pi_old = softmax(. / temperature)``.

    For each mixed group: ``s_t = sum_{u in P} <g_u, g_t> <h_u, h_t>`` for every token,
    ``tau = beta * min_{i in P} mean_k s_{i,k}`` (``anchor="others"`` leaves response ``i``'s tokens out
    of its own anchor), a negative token is selected iff ``s_t > tau``, and its advantage becomes
    ``eta * A_j`` (``eta``: ``"2|0.5-p|"``, ``"1-p"``, ``"p"``, a constant in [0, 1] or a callable of the
    success rate ``p``). Everything else keeps ``A_i``; padding gets 0.

    ``backend``: ``"auto"`` (Triton on CUDA, native C++ on CPU when built, else torch), ``"torch"``,
    ``"triton"``, ``"native"``, or ``"reference"`` (float64, slow). Scratch memory of the torch backend:
    see :mod:`nthr_kernels.backends.torch_backend` (about ``28 * SCRATCH_ELEMS`` bytes plus ``O(N)``).

    ``process_group``: a ``torch.distributed`` group whose ranks each hold some whole responses of the
    batch (a group may straddle ranks); every rank calls this with its own responses and their global
    ``group_ids`` (``group_size`` is refused). See :mod:`nthr_kernels.distributed`.
    """
    if process_group is not None:
        from .distributed import nthr_advantages_distributed

        return nthr_advantages_distributed(
            hidden, token_ids, rewards, advantages, process_group=process_group, group_ids=group_ids,
            lm_head_weight=lm_head_weight, logits=logits, old_logprobs=old_logprobs, temperature=temperature,
            mask=mask, cu_seqlens=cu_seqlens, group_size=group_size, beta=beta, eta=eta, anchor=anchor,
            reward_threshold=reward_threshold, backend=backend, check_finite=check_finite,
        )
    with torch.no_grad():
        # Static checks here (traceable by torch.compile); value checks and the backend run inside the
        # op torch.ops.nthr.nthr_advantages (nthr_kernels/ops.py).
        check_backend(backend)
        st = check_batch_static(
            hidden,
            token_ids,
            rewards,
            advantages,
            lm_head_weight=lm_head_weight,
            logits=logits,
            old_logprobs=old_logprobs,
            temperature=temperature,
            mask=mask,
            cu_seqlens=cu_seqlens,
            group_size=group_size,
            group_ids=group_ids,
            beta=beta,
            eta=eta,
            anchor=anchor,
            reward_threshold=reward_threshold,
        )
        eta_name, eta_const, eta_table = "", 0.0, None
        if isinstance(eta, str):
            eta_name = eta
        elif callable(eta):  # evaluated here, per group, in eager Python (a graph break under compile)
            rates = group_success_rates(rewards, st.reward_threshold, group_size, st.group_ids)
            eta_table = _ops.callable_eta_table(eta, rates)
        else:
            eta_const = float(eta)
        out = torch.ops.nthr.nthr_advantages(
            hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, st.temperature, mask,
            cu_seqlens, group_size, st.group_ids, st.beta, eta_name, eta_const, eta_table, anchor,
            st.reward_threshold, backend, bool(check_finite),
        )
        return NTHRResult(*out)


def _reference_batch(batch, method: str = "factored"):
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
        r = _ref.nthr_group(
            batch.gather(batch.hidden, tok),
            batch.tok_ids[tok],
            local,
            batch.positive[resps].tolist(),
            batch.adv[resps].tolist(),
            temperature=batch.temperature,
            beta=batch.beta,
            eta=batch.eta,
            anchor=batch.anchor,
            method=method,
            **kw,
        )
        scores[tok] = r["scores"]
        selected[tok] = r["selected"]
        token_adv[tok] = r["token_advantages"]
        tau[g] = r["tau"]
        eta_g[g] = r["eta"]
    return scores, selected, token_adv, tau.to(torch.float32).to(dev), eta_g.to(torch.float32).to(dev)
