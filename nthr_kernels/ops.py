"""The ``nthr`` torch.library namespace: the ops behind the public API.

Public ops (called by :mod:`nthr_kernels.api`; one Python kernel for every device, fake kernels for
shape inference, so ``torch.compile(fullgraph=True)`` sees each call as one opaque node):

* ``nthr::score_tokens(Tensor h_pos, Tensor h_neg, Tensor err_pos, Tensor err_neg, str backend,
  bool check_finite) -> Tensor`` (float32 ``[T]``).
* ``nthr::nthr_advantages(...) -> (token_advantages, selected, scores, group_ids, tau, eta, active)``:
  the caller's tensors in, the fields of :class:`~nthr_kernels.api.NTHRResult` out. The number of
  groups is static with ``group_size`` and data-dependent (an unbacked size in the fake kernel) with
  ``group_ids``. ``eta`` travels as ``eta_name`` (a named rule, or ``""``) plus ``eta_const``, or as a
  per-group ``eta_table`` (how a callable ``eta`` is passed: the API evaluates it before the op).

The eager kernels run every value-dependent check (finiteness, id ranges, binary rewards, monotonic
``cu_seqlens``, ``old_logprobs <= 0``) through :func:`nthr_kernels._validate.validate_batch`, resolve
``backend`` (``"auto"``: Triton on CUDA, native C++ on CPU when built, else torch) and run it.

Native ops (C++ CPU kernels in ``csrc/``, registered with ``TORCH_LIBRARY_IMPL(nthr, CPU, m)`` when
the extension is loaded; their schemas and fake kernels live here so they exist either way):

* ``nthr::native_score_tokens(Tensor h_pos, Tensor h_neg, Tensor err_pos, Tensor err_neg,
  int scratch_elems) -> Tensor``
* ``nthr::native_advantages(...)``: the canonical token list of a validated batch in, per-token
  ``(scores, selected, token_adv)`` and per-group ``(tau, eta)`` out (see ``native_backend``).

The CUDA path calls :mod:`nthr_kernels.backends.triton_backend` from the Python kernel. It is not a
``torch.library.triton_op``: ``triton_op`` uses the function itself as the fake kernel and traces into it
under ``torch.compile``, which needs a data-independent body, while the batched planning (``V*`` sizes,
group packing) depends on the data.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._common import eta_per_group
from ._validate import check_score_inputs, validate_batch

__all__ = ["score_tokens", "nthr_advantages", "ADVANTAGES_OUTPUTS"]

ADVANTAGES_OUTPUTS = ("token_advantages", "selected", "scores", "group_ids", "tau", "eta", "active")

_lib = torch.library.Library("nthr", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)
_lib.define(
    "native_score_tokens(Tensor h_pos, Tensor h_neg, Tensor err_pos, Tensor err_neg, int scratch_elems) -> Tensor"
)
_lib.define(
    "native_advantages(Tensor hidden, Tensor tok_a, Tensor? tok_b, Tensor tok_ids, Tensor tok_resp, "
    "Tensor resp_group, Tensor positive, Tensor adv, Tensor group_active, Tensor eta_group, "
    "Tensor? lm_head_weight, Tensor? logits, Tensor? logprobs, float temperature, float beta, "
    "bool anchor_others, int scratch_elems) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.register_fake("nthr::native_score_tokens")
def _native_score_tokens_fake(h_pos, h_neg, err_pos, err_neg, scratch_elems):
    return h_neg.new_empty((h_neg.shape[0],), dtype=torch.float32)


@torch.library.register_fake("nthr::native_advantages")
def _native_advantages_fake(hidden, tok_a, tok_b, tok_ids, tok_resp, resp_group, positive, adv, group_active,
                            eta_group, lm_head_weight, logits, logprobs, temperature, beta, anchor_others,
                            scratch_elems):
    n, g = tok_ids.shape[0], group_active.shape[0]
    f32 = dict(dtype=torch.float32)
    return (
        tok_ids.new_empty((n,), **f32),
        tok_ids.new_empty((n,), dtype=torch.bool),
        tok_ids.new_empty((n,), **f32),
        tok_ids.new_empty((g,), **f32),
        tok_ids.new_empty((g,), **f32),
    )


# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("nthr::score_tokens", mutates_args=())
def score_tokens(
    h_pos: Tensor, h_neg: Tensor, err_pos: Tensor, err_neg: Tensor, backend: str, check_finite: bool
) -> Tensor:
    check_score_inputs(h_pos, h_neg, err_pos, err_neg, check_finite)
    from .api import _resolve

    b = _resolve(backend, h_neg.device)
    if b == "reference":
        from . import reference

        return reference.pairwise_scores(h_pos, h_neg, err_pos, err_neg).to(torch.float32)
    if b == "triton":
        from .backends import triton_backend

        return triton_backend.score_tokens(h_pos, h_neg, err_pos, err_neg).to(torch.float32)
    if b == "native":
        from .backends import native_backend

        return native_backend.score_tokens(h_pos, h_neg, err_pos, err_neg)
    from .backends import torch_backend

    return torch_backend.score_tokens(h_pos, h_neg, err_pos, err_neg)


@score_tokens.register_fake
def _score_tokens_fake(h_pos, h_neg, err_pos, err_neg, backend, check_finite):
    return h_neg.new_empty((h_neg.shape[0],), dtype=torch.float32)


# --------------------------------------------------------------------------------------------------
def eta_spec(eta_name: str, eta_const: float):
    """The ``eta`` argument of the public API from the op's encoding (``eta_name`` or a constant)."""
    return eta_name if eta_name else eta_const


@torch.library.custom_op("nthr::nthr_advantages", mutates_args=())
def nthr_advantages(
    hidden: Tensor,
    token_ids: Tensor,
    rewards: Tensor,
    advantages: Tensor,
    lm_head_weight: Optional[Tensor],
    logits: Optional[Tensor],
    old_logprobs: Optional[Tensor],
    temperature: float,
    mask: Optional[Tensor],
    cu_seqlens: Optional[Tensor],
    group_size: Optional[int],
    group_ids: Optional[Tensor],
    beta: float,
    eta_name: str,
    eta_const: float,
    eta_table: Optional[Tensor],
    anchor: str,
    reward_threshold: float,
    backend: str,
    check_finite: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    kw = dict(locals())  # the caller's arguments, by name, as validate_batch takes them
    for name in ("eta_name", "eta_const", "eta_table", "backend"):
        del kw[name]
    kw["eta"] = eta_spec(eta_name, eta_const) if eta_table is None else 1.0
    batch = validate_batch(**kw)
    if eta_table is not None and eta_table.shape != batch.group_ids.shape:
        raise ValueError(f"eta: expected one value per group ({batch.group_ids.numel()}), got {tuple(eta_table.shape)}")
    from .api import _resolve

    b = _resolve(backend, batch.device)
    if b == "reference":
        from .api import _reference_batch

        scores, selected, token_adv, tau, eta_g = _reference_batch(batch)
    elif b == "triton":
        from .backends import triton_backend

        scores, selected, token_adv, tau, eta_g = triton_backend.nthr_advantages(batch)
    elif b == "native":
        from .backends import native_backend

        scores, selected, token_adv, tau, eta_g = native_backend.nthr_advantages(batch)
    else:
        from .backends import torch_backend

        scores, selected, token_adv, tau, eta_g = torch_backend.nthr_advantages(batch)
    if eta_table is not None:  # the backend ran with eta = 1: rescale the selected tokens now
        eta_g = torch.where(batch.group_active, eta_table.to(eta_g.device, torch.float32), torch.ones_like(eta_g))
        tok_eta = eta_g[batch.resp_group[batch.tok_resp]]
        token_adv = torch.where(selected, token_adv.to(torch.float32) * tok_eta, token_adv.to(torch.float32))
    return (
        batch.scatter(token_adv.to(torch.float32)),
        batch.scatter(selected, False),
        batch.scatter(scores.to(torch.float32)),
        batch.group_ids.clone(),
        tau.to(torch.float32),
        eta_g.to(torch.float32),
        batch.group_active.clone(),
    )


@nthr_advantages.register_fake
def _nthr_advantages_fake(hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, temperature,
                          mask, cu_seqlens, group_size, group_ids, beta, eta_name, eta_const, eta_table, anchor,
                          reward_threshold, backend, check_finite):
    lead = token_ids.shape
    if group_size is not None:
        n_groups = rewards.shape[0] // group_size
    else:
        n_groups = torch.library.get_ctx().new_dynamic_size()
    new = hidden.new_empty
    return (
        new(lead, dtype=torch.float32),
        new(lead, dtype=torch.bool),
        new(lead, dtype=torch.float32),
        new((n_groups,), dtype=torch.int64),
        new((n_groups,), dtype=torch.float32),
        new((n_groups,), dtype=torch.float32),
        new((n_groups,), dtype=torch.bool),
    )


def callable_eta_table(eta, success_rates: Tensor) -> Tensor:
    """Per-group eta (float64) of a callable ``eta`` at the given success rates (eager: calls Python)."""
    return eta_per_group(eta, success_rates.to(torch.float64))
