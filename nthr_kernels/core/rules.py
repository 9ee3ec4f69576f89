"""Layer 0: the definitions every other module imports, each stated once.

Types (:data:`EtaSpec`, :class:`Options`), the eta table, the threshold rule, the accepted names of
backends and anchors, the cost model between the factored and pairwise forms, the scratch budgets and
the tolerance table of the tests and benchmarks. The maths they encode is ``docs/NTHR.md``.
"""
from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional, Union

import torch

EtaSpec = Union[str, float, int, Callable[[float], float]]

ETA_NAMES = ("2|0.5-p|", "1-p", "p")
BACKENDS = ("auto", "reference", "torch", "triton", "native")
ANCHORS = ("all", "others")
# The input dtypes every backend computes with (float32 arithmetic; float64 only in the reference).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Scratch budgets (see each implementation's docstring for how they bound its memory).
SCRATCH_ELEMS = 1 << 22  # torch and native backends: float32 elements per block tensor (16 MiB)
SCRATCH_BYTES = 1 << 30  # Triton backend: bytes of M plus error buffers for the groups in flight
TOKEN_BYTES = 512  # torch and Triton backends: scratch per completion token on top of the budgets above
SCAN_ELEMS = 1 << 24  # elements of one temporary in the input scans and in a logits-rows logsumexp
# CPU: elements of one logits chunk of the torch backend's full-vocabulary logsumexp, which its four passes
# (max, shift, exp, sum) read from the last-level cache instead of memory: at 3 * SCRATCH_ELEMS / 4096 rows
# (50 MB chunks) the medium shape's call took 3.6 to 3.8 s on a Zen 3 box, at this size 3.2 to 3.4.
LSE_TILE_ELEMS = 1 << 20

# Score error allowed against the float64 reference, relative to the largest |score| of the group, per
# input dtype; a selection may differ from the reference's only for a token whose score lies within
# twice this distance of tau. Used by the tests and by the GPU suite.
# float32: every implementation accumulates in float32 from float32 inputs; the error is float32 rounding
#   of sums over |V*| and d terms plus exp() of float32 logits (observed ~1e-6; 2e-4 leaves room for
#   cancellation between positive and negative error products).
# bfloat16 / float16: the fused Triton kernels round the float32 prediction errors to the input dtype
#   before the tensor-core dots (unit roundoff 2^-8 for bf16), and M too for bfloat16. float16's range is
#   too small for both (M sums over thousands of tokens; a near-certain token's error below 6.1e-5 is
#   subnormal, below 3e-8 it is 0): they stay float32, multiplied in TF32 on a GPU (unit roundoff 2^-11, as
#   fp16's; ops/triton_kernels.py, err_dtype). Summed with cancellation this gives a few units of roundoff
#   relative to the group's score scale.
# float64: the reference against itself (factored vs pairwise order of summation).
# The float32 row holds for logits of moderate scale: a probability carries the float32 rounding of z / T,
# about |z / T| * 2^-24 relative, which by that argument reaches 2e-4 near |z / T| = 3e3 and about 0.4 % at
# LOGIT_LIMIT (2^16), within the ~1 % that rule allows (below); no tighter bound is promised there. Measured,
# torch and native alike, relative to the batch's largest |score| (6 seeds, small random batches): 6e-7 at
# max |z| = 18, 7e-6 at 1.8e3, 3.6e-5 at 1.8e4.
SCORE_TOLERANCE = {torch.float32: 2e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3, torch.float64: 1e-6}

# The maths is float32: every value must lie in float32 range (float64 inputs beyond it would become
# inf). And logits / temperature must stay below LOGIT_LIMIT in magnitude: float32 spacing at 2**16 is
# 2**-7, so exp(z / T - log Z) keeps about 1 % relative accuracy; far beyond it (e.g. T = 1e-8) the
# rounding of z / T alone is tens of nats and the probabilities become inf/NaN. With hidden +
# lm_head_weight the check bounds |w_v . h_t| by max ||w_v|| * max ||h_t|| (Cauchy-Schwarz).
FLOAT32_MAX = torch.finfo(torch.float32).max
LOGIT_LIMIT = 2.0**16

# Rewards compared with reward_threshold (core.checks.binary_positive): integer rewards must lie strictly
# within +-INT_EXACT_LIMIT, where float64, the dtype of the comparison, holds every integer exactly.
INT_EXACT_LIMIT = 2.0**53

# old_logprobs consistency (Options.check_logprobs; docs/NTHR.md "Checking old_logprobs"): on a
# deterministic sample of LOGPROB_SAMPLE completion tokens, the probabilities that (hidden,
# lm_head_weight, old_logprobs, temperature) imply on the group's V* may sum to more than
# exp(LOGPROB_TOLERANCE) (the tolerance is in nats: log of the implied mass) on at most LOGPROB_MAX_BAD
# of them. Measured on the tiny Qwen2 of nthr_kernels.grpo: benchmarks/logprob_check.py, docs/NTHR.md.
LOGPROB_SAMPLE = 1024
LOGPROB_TOLERANCE = 0.5
LOGPROB_MAX_BAD = 5


@dataclass(frozen=True)
class Options:
    """The scalar settings of one NTHR call (validated by :func:`nthr_kernels.core.checks.check_options`)."""

    beta: float = 1.0
    eta: EtaSpec = "2|0.5-p|"
    anchor: str = "all"
    temperature: float = 1.0
    # None: rewards must be binary 0/1 (bool or numeric). A number: correct iff reward > threshold.
    reward_threshold: Optional[float] = None
    backend: str = "auto"
    check_finite: bool = True
    check_logprobs: bool = True
    # Scores of positive tokens are not needed for the threshold (each positive response's mean score is
    # <M, N_i> / |y_i|, see docs/NTHR.md), so by default they are not computed and read 0 in the result.
    score_positive: bool = False


def interpreting() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def real_or_none(x) -> Optional[float]:
    """``x`` as a float if it is a real number: a Python real other than bool, or a one-element tensor
    holding one on a device with values (not ``meta``); else None."""
    if isinstance(x, torch.Tensor):
        if x.numel() != 1 or x.device.type == "meta":
            return None
        x = x.item()
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        return None
    return float(x)


def describe(x) -> str:
    """What ``x`` is, for an error message: its type, and a tensor's shape, dtype and device."""
    if isinstance(x, torch.Tensor):
        return f"a tensor of shape {tuple(x.shape)}, dtype {x.dtype}, on {x.device}"
    return type(x).__name__


def check_eta(eta: EtaSpec) -> None:
    """Raise unless ``eta`` is a known name, a number in [0, 1], or a callable."""
    if isinstance(eta, str):
        if eta not in ETA_NAMES:
            raise ValueError(f"eta: unknown name {eta!r}; expected one of {ETA_NAMES}, a number in [0, 1] or a callable p -> eta")
        return
    if isinstance(eta, bool):
        raise TypeError("eta: expected a name, a number in [0, 1] or a callable, got a bool")
    if isinstance(eta, (int, float)):
        if not (0.0 <= float(eta) <= 1.0):  # also rejects NaN
            raise ValueError(f"eta: a constant eta must lie in [0, 1], got {eta}")
        return
    if callable(eta):
        return
    raise TypeError(f"eta: expected a name {ETA_NAMES}, a number in [0, 1] or a callable, got {type(eta).__name__}")


def eta_value(eta: EtaSpec, p: float) -> float:
    """eta for a group with success rate ``p``: ``2|0.5-p|`` (default), ``1-p``, ``p``, a constant or ``eta(p)``."""
    check_eta(eta)
    if eta == "2|0.5-p|":
        return 2.0 * abs(0.5 - p)
    if eta == "1-p":
        return 1.0 - p
    if eta == "p":
        return p
    if callable(eta):
        try:
            v = eta(p)
        except Exception as e:  # noqa: BLE001 - the caller's code: name the argument it came from
            raise ValueError(f"eta: the callable raised {type(e).__name__} for p={p}: {e}") from e
        r = real_or_none(v)
        if r is None:
            raise TypeError(f"eta: the callable returned {describe(v)} for p={p}; expected a number in [0, 1]")
        v = r
        if not (0.0 <= v <= 1.0):
            raise ValueError(f"eta: the callable returned {v} for p={p}; expected a value in [0, 1]")
        return v
    return float(eta)


def eta_per_group(eta: EtaSpec, p: torch.Tensor) -> torch.Tensor:
    """Vectorised :func:`eta_value` over a float64 tensor of success rates (callables are called per group)."""
    if eta == "2|0.5-p|":
        return 2.0 * (0.5 - p).abs()
    if eta == "1-p":
        return 1.0 - p
    if eta == "p":
        return p.clone()
    if callable(eta):
        return torch.tensor([eta_value(eta, float(x)) for x in p.tolist()], dtype=p.dtype, device=p.device)
    return torch.full_like(p, float(eta))


def sampled_logprob(others_lse: torch.Tensor, z_y: torch.Tensor) -> torch.Tensor:
    """``l_t = log pi(y_t)`` from the log-sum-exp ``L`` of the *other* tokens' scaled logits and the sampled
    token's own ``z_y`` (docs/NTHR.md, "Getting pi_old on V* cheaply"): ``l_t = -softplus(L - z_y)``, taken as
    ``-(max(x, 0) + log1p(exp(-|x|)))``. Unlike ``z_y - log Z`` it keeps the relative precision of a
    near-certain token's ``1 - pi(y_t) = -expm1(l_t)`` (``log Z`` rounded to float32 is off by a step of
    ``|log Z| 2^-24``, which is all of a small error); ``L = -inf`` (no other token) gives exactly 0. Any float
    dtype; the C++ (``csrc/vec_kernels.cpp``, ``sampled_logprob``) and Triton (``_sampled_logprob``) copies
    compute the same expression."""
    x = others_lse - z_y
    return -(x.clamp(min=0) + torch.log1p(torch.exp(-x.abs())))


def tau_from_min_anchor(min_anchor: torch.Tensor, beta: float) -> torch.Tensor:
    """``tau = beta * min anchor`` with the conventions ``beta = 0 -> 0`` and ``beta = -inf -> -inf``."""
    if beta == 0.0:
        return torch.zeros_like(min_anchor)
    if math.isinf(beta) and beta < 0:
        return torch.full_like(min_anchor, -math.inf)
    return beta * min_anchor


def group_eta(eta: EtaSpec, n_pos: torch.Tensor, n_resp: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
    """float64 eta per group from the success rate ``p = N+ / G``; 1 for inactive groups."""
    p = n_pos.to(torch.float64) / n_resp.clamp_min(1).to(torch.float64)
    return torch.where(active, eta_per_group(eta, p), torch.ones_like(p))


# --------------------------------------------------------------------------------------------------
# score_tokens: one group, dense errors
# --------------------------------------------------------------------------------------------------
def factored_cost(t_pos: int, t_neg: int, v: int, d: int) -> int:
    return 2 * v * d * (t_pos + t_neg)


def pairwise_cost(t_pos: int, t_neg: int, v: int, d: int) -> int:
    return 2 * t_pos * t_neg * (v + d)


def cheaper_path(t_pos: int, t_neg: int, v: int, d: int) -> str:
    """``score_tokens``' path (dense errors given, the ``T-`` tokens scored): ``"pairwise"`` iff
    ``2 T+ T- (|V| + d) < 2 |V| d (T+ + T-)`` (``M``, then ``E M`` for the scored tokens), else ``"factored"``.
    ``nthr_advantages`` picks with :func:`pairwise_cheaper`."""
    return "pairwise" if pairwise_cost(t_pos, t_neg, v, d) < factored_cost(t_pos, t_neg, v, d) else "factored"


def pairwise_cheaper(t_pos: int, t_all: int, nv: int, d: int, score_positive: bool = False, own_pairs: bool = False) -> bool:
    """``nthr_advantages``' path rule for a group of ``t_all`` tokens, ``t_pos`` of them positive (docs/NTHR.md,
    "Positive anchors without scoring positive tokens"), on the native and the Triton backends: pairwise
    iff its FLOPs are fewer than the factored path's.

    - pairwise: the positive tokens' products ``(e_u . e_t)(h_u . h_t)`` with every token, ``2 T+ T (|V*| + d)``
      (the negative tokens' scores and the anchor sums); ``own_pairs``: plus ``2 T+ T+ (|V*| + d)`` for a second
      pass over the positive tokens' pairs within a response (the Triton path's ``anchor="others"``; the native
      one leaves them out in the same pass);
    - factored: ``M`` from the positive tokens and ``E_t M`` for the negative ones, ``2 |V*| d T``; plus
      ``2 |V*| d T+`` with ``score_positive`` (``E_t M`` for the positive tokens too; the pairwise path has
      their scores from the anchor pass).

    Both compute the errors' logits on ``V*`` for every token (``2 |V*| d T`` with ``lm_head_weight``, none
    with logits), so they are left out of both sides. Without ``score_positive`` or ``own_pairs`` this is
    ``T+ (|V*| + d) < |V*| d``: groups with few positive tokens. The C++ copy is ``pairwise_group`` in
    ``csrc/advantages.cpp`` (the tests compare the two)."""
    pairs = pairwise_cost(t_pos, t_all + (t_pos if own_pairs else 0), nv, d)
    return pairs < factored_cost(t_pos if score_positive else 0, t_all, nv, d)


class Inputs(NamedTuple):
    """The tensors of one ``nthr_advantages`` call, as the caller passed them (before any check)."""

    hidden: torch.Tensor
    token_ids: torch.Tensor
    rewards: torch.Tensor
    advantages: torch.Tensor
    lm_head_weight: Optional[torch.Tensor] = None
    logits: Optional[torch.Tensor] = None
    old_logprobs: Optional[torch.Tensor] = None
    mask: Optional[torch.Tensor] = None
    cu_seqlens: Optional[torch.Tensor] = None
    group_size: Optional[int] = None
    group_ids: Any = None


@dataclass
class NTHRResult:
    """Output of :func:`nthr_advantages`.

    Per token (layout of ``token_ids``): ``token_advantages`` (float32, 0 at padding), ``selected``
    (bool), ``scores`` (float32; every negative token of an active group, and its positive tokens too
    with ``score_positive=True``; 0 elsewhere).
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


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> torch.Tensor:
    """GRPO's response advantages ``(r - mean_group) / (std_group + eps)`` with the population std (0 for
    uniform groups), for consecutive groups of ``group_size`` (what the demo, the study and the synthetic
    batches use; trainers bring their own)."""
    if not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if rewards.dim() != 1 or rewards.shape[0] % group_size:
        raise ValueError(f"rewards must be 1-D with a length divisible by group_size={group_size}, "
                         f"got shape {tuple(rewards.shape)}")
    r = rewards.double().view(-1, group_size)
    adv = (r - r.mean(1, keepdim=True)) / (r.std(1, correction=0, keepdim=True) + eps)
    return adv.reshape(-1).float()
