"""Layer 5: the ``nthr`` torch.library namespace, the ops behind the public API.

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
``cu_seqlens``, ``old_logprobs <= 0`` and their consistency, float32 range) through :func:`nthr_kernels.core.checks.validate_batch`, resolve
``backend`` (``"auto"``: Triton on CUDA, native C++ on CPU when built, else torch) and run it.

The native C++ ops (``nthr::native_*``) are defined with the library that implements them, in
:mod:`nthr_kernels.ops.native_lib`.

The CUDA path calls the Triton implementation (:mod:`nthr_kernels.ops.advantages.triton_impl`) from the
Python kernel. It is not a
``torch.library.triton_op``: ``triton_op`` uses the function itself as the fake kernel and traces into it
under ``torch.compile``, which needs a data-independent body, while the batched planning (``V*`` sizes,
group packing) depends on the data.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import torch
from torch import Tensor

from . import registry
from .core.checks import check_score_inputs, validate_batch
from .core.rules import Inputs, Options, eta_per_group

__all__ = ["score_tokens", "nthr_advantages"]

_lib = torch.library.Library("nthr", "FRAGMENT")  # noqa: TOR901 (kept alive for the process)


# --------------------------------------------------------------------------------------------------
@torch.library.custom_op("nthr::score_tokens", mutates_args=())
def score_tokens(
    h_pos: Tensor, h_neg: Tensor, err_pos: Tensor, err_neg: Tensor, backend: str, check_finite: bool
) -> Tensor:
    check_score_inputs(h_pos, h_neg, err_pos, err_neg, check_finite)
    impl = registry.implementation("score_tokens", registry.resolve(backend, h_neg.device))
    return impl(h_pos, h_neg, err_pos, err_neg).to(torch.float32)


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
    reward_threshold: Optional[float],
    backend: str,
    check_finite: bool,
    check_logprobs: bool,
    score_positive: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    x = Inputs(hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, mask, cu_seqlens,
               group_size, group_ids)
    eta = eta_spec(eta_name, eta_const) if eta_table is None else 1.0
    opts = Options(beta=beta, eta=eta, anchor=anchor, temperature=temperature, reward_threshold=reward_threshold,
                   backend=backend, check_finite=check_finite, check_logprobs=check_logprobs,
                   score_positive=score_positive)
    impl = registry.implementation("nthr_advantages", registry.resolve(backend, hidden.device))
    # an implementation that reads batch.pending with its own first host read saves a synchronisation;
    # one with its own value_checks runs the checks' arithmetic (same values, same rules, same messages)
    batch = validate_batch(x, opts, defer=getattr(impl, "reads_pending", False),
                           value_checks=getattr(impl, "value_checks", None))
    if eta_table is not None and eta_table.shape != batch.group_ids.shape:
        raise ValueError(f"eta: expected one value per group ({batch.group_ids.numel()}), got {tuple(eta_table.shape)}")
    scores, selected, token_adv, tau, eta_g = impl(batch)
    if eta_table is not None:  # the backend ran with eta = 1: rescale the selected tokens now
        eta_g = torch.where(batch.group_active, eta_table.to(eta_g.device, torch.float32), torch.ones_like(eta_g))
        tok_eta = eta_g[batch.resp_group[batch.tok_resp]]
        token_adv = torch.where(selected, token_adv.to(torch.float32) * tok_eta, token_adv.to(torch.float32))
    res = batch.result(scores, selected, token_adv, tau, eta_g)
    return tuple(getattr(res, f.name) for f in dataclasses.fields(res))


@nthr_advantages.register_fake
def _nthr_advantages_fake(hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, temperature,
                          mask, cu_seqlens, group_size, group_ids, beta, eta_name, eta_const, eta_table, anchor,
                          reward_threshold, backend, check_finite, check_logprobs, score_positive):
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
