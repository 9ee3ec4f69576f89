"""Layer 1: input validation and the canonical token list every backend consumes.

Every public entry point goes through here first: each bad input raises a ``ValueError`` or
``TypeError`` that names the argument and says what was expected. Nothing here writes to a caller's
tensor.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .rules import (
    ANCHORS,
    BACKENDS,
    FLOAT32_MAX,
    FLOAT_DTYPES,
    INT_EXACT_LIMIT,
    LOGIT_LIMIT,
    LOGPROB_MAX_BAD,
    LOGPROB_SAMPLE,
    LOGPROB_TOLERANCE,
    Inputs,
    NTHRResult,
    Options,
    SCAN_ELEMS,
    SCRATCH_ELEMS,
    check_eta,
    describe,
    real_or_none,
)


def _is_tensor(name: str, x) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
    if x.is_nested or x.layout != torch.strided:  # sparse, mkldnn, nested: no kernel here reads them
        what = "a nested tensor" if x.is_nested else f"layout {x.layout}"
        raise TypeError(f"{name}: expected a dense (strided) tensor, got {what}; convert it first (e.g. .to_dense())")
    if x.device.type == "meta":
        raise ValueError(f"{name}: a meta tensor holds no values; pass a tensor on a real device (cpu, cuda)")
    return x


def check_feature_size(name: str, size: int, what: str) -> None:
    """Feature sizes (hidden size, vocabulary) must be positive; token and response counts may be 0."""
    if size == 0:
        raise ValueError(f"{name}: the {what} is 0; expected at least 1")


def check_float_tensor(name: str, x) -> torch.Tensor:
    _is_tensor(name, x)
    if x.dtype not in FLOAT_DTYPES:  # float8 and other exotic floats: no arithmetic the kernels could run
        raise TypeError(f"{name}: expected a float16, bfloat16, float32 or float64 tensor, got dtype {x.dtype}")
    return x


def check_int_tensor(name: str, x) -> torch.Tensor:
    _is_tensor(name, x)
    if x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer tensor, got dtype {x.dtype}")
    return x


def _traced() -> bool:
    """Under ``torch.compile``'s tracing, a float argument may be symbolic (the second value of ``beta`` makes
    it so), and a Python-level ``isnan`` on it cannot be captured. The public functions pass such numbers on to
    their op, whose body runs every check on the concrete value when it runs, still before any work."""
    return torch.compiler.is_compiling()


def check_real(name: str, x, *, allow_neg_inf: bool = False, exact: bool = False) -> float:
    """``x`` as a float; with ``exact``, a value that float64 cannot hold exactly (an integer beyond 2^53
    such as 2^53 + 1, a ``Fraction(1, 3)``) is refused instead of rounded: a threshold compared with the
    rewards must be the number the caller wrote."""
    if _traced():
        return x
    try:
        v = real_or_none(x)
    except OverflowError:  # float() of an int beyond float64 range
        raise ValueError(f"{name}: an integer of {len(str(abs(int(x))))} digits is beyond float64 range") from None
    if v is None:
        raise TypeError(f"{name}: expected a real number, got {describe(x)}")
    if math.isnan(v):
        raise ValueError(f"{name}: must not be NaN")
    if math.isinf(v) and not (allow_neg_inf and v < 0):
        raise ValueError(f"{name}: must be finite{' or -inf' if allow_neg_inf else ''}, got {v}")
    if exact and math.isfinite(v):
        x = x.item() if isinstance(x, torch.Tensor) else x
        if not (int(x) == int(v) if isinstance(x, numbers.Integral) else x == v):  # int == float is exact
            raise ValueError(f"{name}: {x!r} is not exactly a float64 (it would become {v!r}); pass a value "
                             f"float64 holds, e.g. an integer within +-2^53")
    return v


def check_backend(backend) -> str:
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend: unknown backend {backend!r}; expected one of {BACKENDS}")
    return backend


_NARROW_FLOATS = (torch.float32, torch.float16, torch.bfloat16)  # every finite value fits float32


def _in_range(x: torch.Tensor) -> torch.Tensor:
    """Elementwise: finite and within float32 range (NaN compares False). For float32/16/bf16 that is
    finiteness: comparing a bfloat16 tensor with FLOAT32_MAX rounds the bound to bfloat16's inf."""
    return torch.isfinite(x) if x.dtype in _NARROW_FLOATS else x.abs() <= FLOAT32_MAX


_SKIP_HINT = "; pass check_finite=False to skip this check"
_AT_COMPLETION = "at a completion position "  # check_float32_range's ``at``: a selected row of hidden/logits


def check_float32_range(name: str, x: torch.Tensor, rows: Optional[torch.Tensor] = None, hint: str = _SKIP_HINT,
                        at: str = _AT_COMPLETION) -> float:
    """Raise unless every value of ``x`` is finite and within float32 range (the maths is float32: a
    float64 1e39 would become inf); with ``rows`` (bool over the leading dims) only where it is True
    (``at`` names such a row in the message). Returns the largest magnitude (over all of ``x``; 0 when empty).

    Fast path: one ``aminmax`` over the whole tensor (a single read, no temporary; NaN and Inf
    propagate into min/max). Only if that finds a bad value and ``rows`` is given does a row-wise scan
    decide whether it sits at a selected row; that scan works in chunks so its temporary bool tensor
    stays below ``SCAN_ELEMS`` elements.
    """
    if x.numel() == 0:
        return 0.0
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if -FLOAT32_MAX <= lo and hi <= FLOAT32_MAX:  # NaN fails both comparisons
        return max(-lo, hi)
    lead = x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(-1, 1)
    sel = rows.reshape(-1) if rows is not None else None
    step = max(1, SCAN_ELEMS // max(1, lead.shape[1]))
    for r0 in range(0, lead.shape[0], step):
        ok = _in_range(lead[r0 : r0 + step]).all(-1)
        if sel is not None:
            ok |= ~sel[r0 : r0 + step]
        if not bool(ok.all()):
            bad = int(r0 + (~ok).nonzero()[0, 0])
            where = at if sel is not None else ""
            raise ValueError(
                f"{name}: contains NaN, Inf or a value beyond float32 range (|x| > {FLOAT32_MAX:.4g}) {where}"
                f"(first bad row {bad} of the flattened leading dims){hint}"
            )
    return math.inf  # bad values only at rows that are not read (padding)


class Pending:
    """Value checks computed on the device and read back together: one host synchronisation for all.

    ``fail_if(bad, error)`` records a 0-d tensor (nonzero: the check failed) and a function that builds
    the exception; it runs only on failure, may read more values for its message, and may return None
    where a closer look clears the input. ``read(*extra)`` copies every recorded flag and the ``extra``
    integer tensors to the host in one copy, raises the first failure in the order recorded (so the
    errors keep the precedence of checks run one by one), and returns the extras as lists. Nothing
    computed before the read may index out of bounds on bad input: such values are clamped.
    """

    def __init__(self):
        self._flags: list = []
        self._errors: list = []

    def fail_if(self, bad: torch.Tensor, error) -> None:
        self._flags.append(bad.reshape(()).to(torch.int64))
        self._errors.append(error)

    def read(self, *extra: torch.Tensor) -> list:
        parts = ([torch.stack(self._flags)] if self._flags else []) + [e.reshape(-1).to(torch.int64) for e in extra]
        flags, errors = len(self._flags), self._errors
        self._flags, self._errors = [], []
        if not parts:
            return []
        host = torch.cat(parts).tolist()  # the host synchronisation
        for failed, error in zip(host[:flags], errors):
            if failed:
                e = error()
                if e is not None:
                    raise e
        out, o = [], flags
        for e in extra:
            out.append(host[o:o + e.numel()])
            o += e.numel()
        return out


def _error_of(check) -> "Callable[[], Optional[Exception]]":
    """An error builder for :meth:`Pending.fail_if` from a check that raises."""
    def build():
        try:
            check()
        except (ValueError, TypeError) as e:
            return e
        return None
    return build


def _first_error(*checks) -> "Callable[[], Optional[Exception]]":
    """An error builder for :meth:`Pending.fail_if`: the first error that ``checks`` (run in order) raise."""
    def build():
        for check in checks:
            e = _error_of(check)()
            if e is not None:
                return e
        return None
    return build


def _masked_minmax(x: torch.Tensor, rows: Optional[torch.Tensor]):
    """0-d ``(min, max)`` of ``x``: of all of it (one pass, no temporary), or where ``rows`` (``x``'s shape:
    the ``[R, L]`` old log-probs) is True, through one masked copy (``(0, 0)`` when nothing is selected)."""
    x = x.detach()
    if rows is None:
        return torch.aminmax(x)
    zero = torch.zeros((), dtype=x.dtype, device=x.device)
    sel = torch.where(rows, x, zero)
    return (sel.min(), sel.max()) if sel.numel() else (zero, zero)


def defer_float32_range(pending: Pending, name: str, x: torch.Tensor, rows: Optional[torch.Tensor] = None,
                        hint: str = None, at: str = _AT_COMPLETION):
    """:func:`check_float32_range` recorded on ``pending``; returns the 0-d largest magnitude and the 0-d
    maximum. ``rows``: elementwise (``x``'s shape) selects the values checked; over whole rows (the leading
    dims of a padded ``hidden``/``logits``) the device checks all of ``x`` in one pass (the fast path), and
    only if that finds a bad value does the error builder scan the selected rows, on the host (bad values in
    padding alone are no error). The returned magnitude then covers all of ``x``."""
    hint = _SKIP_HINT if hint is None else hint
    if x.numel() == 0:
        zero = torch.zeros((), dtype=torch.float32, device=x.device)
        return zero, zero
    per_row = rows is not None and rows.dim() < x.dim()
    lo, hi = _masked_minmax(x, None if per_row else rows)
    ok = (lo >= -FLOAT32_MAX) & (hi <= FLOAT32_MAX)  # NaN fails both comparisons
    if rows is not None and not per_row:  # elementwise selection: the message reads the selected values
        pending.fail_if(~ok, _error_of(lambda: check_float32_range(name, x[rows], None, hint)))
    else:
        pending.fail_if(~ok, _error_of(lambda: check_float32_range(name, x, rows, hint, at)))
    return torch.maximum(-lo, hi).float(), hi


def check_logit_scale(temperature: float, max_logit: float, source: str) -> None:
    """``max |logit| / temperature`` must stay within :data:`~nthr_kernels.core.rules.LOGIT_LIMIT`."""
    if max_logit / temperature > LOGIT_LIMIT:
        raise ValueError(
            f"temperature: {temperature:g} scales the logits to |z| / T up to {max_logit / temperature:.3g} "
            f"({source}); the float32 maths needs at most {LOGIT_LIMIT:g}: raise the temperature or check the inputs"
        )


def _norm_dtype(x: torch.Tensor, exact: bool) -> torch.dtype:
    """The dtype of :func:`_row_norms`: float32, float64 for float64 ``x`` or ``exact``."""
    return torch.float64 if exact or x.dtype == torch.float64 else torch.float32


def _rows_per_scan(x: torch.Tensor) -> int:
    """Rows of ``x`` (``[rows, ...]``, at least one row) in one block of at most ``SCAN_ELEMS`` elements (one
    row at least)."""
    return max(1, SCAN_ELEMS // max(1, x[0].numel()))


def _row_norms(x: torch.Tensor, exact: bool = False) -> torch.Tensor:
    """Euclidean norms of the rows of ``x``: float32 (float64 for float64 ``x``), as the norm pass of the
    checks computes them, or (``exact``) in float64.

    ``torch.linalg.vector_norm`` with a wider ``dtype`` converts its whole input first (except half
    precision to float32 on CUDA): a float64 copy of ``hidden`` on the failure paths (8 bytes per element,
    gigabytes at a real batch), a float32 one of a half-precision ``hidden`` on the CPU. Where it would, the
    norms are taken over blocks of the leading dimension of at most ``SCAN_ELEMS`` elements (one block
    at least), so the copy is bounded like the input scans' temporaries. Each row's norm is the same
    reduction whichever block holds it."""
    x = x.detach()
    dt = _norm_dtype(x, exact)
    converts = dt != x.dtype and not (x.is_cuda and dt == torch.float32)
    step = _rows_per_scan(x) if x.dim() > 1 and x.shape[0] else 0
    if not converts or x.shape[0] <= step:
        return torch.linalg.vector_norm(x, dim=-1, dtype=dt)
    return torch.cat([torch.linalg.vector_norm(x[r0 : r0 + step], dim=-1, dtype=dt)
                      for r0 in range(0, x.shape[0], step)])


def _max_row_norm(x: torch.Tensor, rows: Optional[torch.Tensor] = None, exact: bool = False) -> torch.Tensor:
    """0-d largest Euclidean norm of the rows of ``x`` (where ``rows`` is True; in the dtype of
    :func:`_row_norms`); 0 when none."""
    if x.numel() == 0:
        return torch.zeros((), dtype=torch.float32, device=x.device)
    if rows is not None and rows.dim() == 1 and x.device.type == "cpu":
        # one flag per row (the weight rows read with old log-probs): on the CPU, where reading the count costs
        # no device synchronisation, read only those rows when they are at most half of x (a few thousand of a
        # vocabulary), gathered in blocks of SCAN_ELEMS elements: 12,000 of 151,936 bf16 rows of 1,536 took 51 to
        # 65 ms instead of 574 to 598 (Zen 3, 2 threads)
        idx = rows.nonzero().squeeze(1)
        if 2 * idx.numel() <= x.shape[0]:
            step = _rows_per_scan(x)
            tops = [_row_norms(x.index_select(0, idx[i : i + step]), exact).max() for i in range(0, idx.numel(), step)]
            return torch.stack(tops).max() if tops else torch.zeros((), dtype=_norm_dtype(x, exact))
    norms = _row_norms(x, exact)
    if rows is not None:
        norms = torch.where(rows, norms, torch.zeros((), dtype=norms.dtype, device=norms.device))
    return norms.max() if norms.numel() else torch.zeros((), dtype=norms.dtype, device=norms.device)


_NORM_BOUND = "bounded by max ||hidden row|| * max ||lm_head_weight row||"


def _defer_logit_scale(pending: Pending, temperature: float, top: torch.Tensor, source: str, exact=None) -> None:
    """The logit-scale check of the 0-d ``top`` on ``pending`` (NaN counts as a failure for the builder to
    decide); ``exact()`` (optional) recomputes the value for the message where ``top`` may cover padding."""
    pending.fail_if(~(top.double() / temperature <= LOGIT_LIMIT),
                    _error_of(lambda: check_logit_scale(temperature, exact() if exact else float(top), source)))


_WEIGHT_ROWS_READ = "in a row of a completion token's id "  # check_float32_range's ``at`` for lm_head_weight


def weight_rows_read(token_ids: torch.Tensor, rows: Optional[torch.Tensor], vocab: int) -> torch.Tensor:
    """``[vocab]`` bool: the ``lm_head_weight`` rows a call with ``old_logprobs`` reads (the ids of the
    completion tokens, ``rows`` of a padded layout; ids must be in range). No synchronisation."""
    ids = token_ids.reshape(-1).to(torch.int64)
    if rows is None:
        return torch.zeros(vocab, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
    hits = torch.zeros(vocab, dtype=torch.int32, device=ids.device)
    return hits.index_add_(0, ids, rows.reshape(-1).to(torch.int32)) > 0


def policy_norms_apply(hidden, lm_head_weight) -> bool:
    """Whether the row-norm pass serves the value checks of ``hidden`` + ``lm_head_weight`` (both float32,
    float16 or bfloat16, where every finite value fits float32): see :func:`check_policy_values`."""
    return hidden.dtype in _NARROW_FLOATS and lm_head_weight.dtype in _NARROW_FLOATS


def score_terms(pos_tok_per_group: torch.Tensor, pos_len: torch.Tensor) -> torch.Tensor:
    """0-d float64 ``2 max_g T+_g max_i |y_i|`` (positive responses ``i``): with ``|e_u . e_t| <= 2`` and
    ``|h_u . h_t| <= H^2`` (``H`` the largest hidden row norm), ``terms * H^2`` bounds every score times
    the length of a positive response, i.e. every sum the anchors divide (docs/NTHR.md, "Input contract")."""
    top = lambda x: x.max().double() if x.numel() else torch.zeros((), dtype=torch.float64, device=x.device)  # noqa: E731
    return 2.0 * top(pos_tok_per_group) * top(pos_len)


def score_range_error(terms: float, h: float) -> Optional[ValueError]:
    """The error of the scores' float32 range for :func:`score_terms` ``terms`` and the exact largest norm
    ``h`` of the hidden rows read; None when ``terms * h^2 <= FLOAT32_MAX``."""
    bound = terms * h * h
    if bound <= FLOAT32_MAX:
        return None
    return ValueError(
        f"hidden: row norms up to {h:.4g} let the scores and anchor sums reach {bound:.3g} "
        f"(2 x positive tokens of a group x positive response length x norm^2), beyond float32 range "
        f"({FLOAT32_MAX:.4g}); the maths is float32: scale hidden down{_SKIP_HINT}")


def score_range_fails(terms: torch.Tensor, top_h: torch.Tensor) -> torch.Tensor:
    """0-d bool: ``terms * top_h^2`` beyond float32 range (or NaN), for a bound ``top_h`` on the hidden rows'
    norms that may be loose: only then need :func:`score_range_error` the exact norm."""
    return ~(terms * top_h.double() ** 2 <= FLOAT32_MAX)


def hidden_norm_top(batch: "Batch", exact: bool = False) -> torch.Tensor:
    """0-d largest norm of ``hidden``'s rows at the batch's tokens (0 when none), in the dtype of
    :func:`_row_norms`."""
    norms = batch.gather(_row_norms(batch.hidden, exact))
    return norms.max() if norms.numel() else norms.new_zeros(())


def _defer_score_range(pending: Pending, terms: torch.Tensor, top_h: torch.Tensor, exact_h) -> None:
    """The float32 range of the scores and anchor sums: ``terms * H^2 <= FLOAT32_MAX`` (:func:`score_terms`)
    for the bound ``top_h`` on the hidden rows' norms; the builder recomputes ``H`` exactly in float64
    (``exact_h()``, failure path only: ``top_h`` may be a looser bound, or a float32 norm that overflowed)."""
    pending.fail_if(score_range_fails(terms, top_h), lambda: score_range_error(float(terms), exact_h()))


def check_policy_values(hidden, lm_head_weight, logits, temperature: float, rows=None,
                        pending: Optional[Pending] = None, weight_rows=None, norms=None, terms=None) -> None:
    """The value checks of the old policy's inputs: float32 range, then the logit scale against the
    temperature (exact with ``logits``; with ``hidden`` + ``lm_head_weight`` the Cauchy-Schwarz bound
    ``max ||h_t|| * max ||w_v||``). Only values the call reads are checked: ``rows``, the completion
    positions of a padded ``hidden``/``logits``; ``weight_rows`` (``[V]`` bool, from
    :func:`weight_rows_read`, or a function returning it, called only where needed), the
    ``lm_head_weight`` rows read with ``old_logprobs`` (None: all).
    ``norms``: the two 0-d largest row norms (hidden, weight) over those rows, computed by the caller (the
    native backend's own pass) when :func:`policy_norms_apply`. ``terms``: :func:`score_terms` of the batch,
    for the float32 range of its scores (none checked when None). Recorded on ``pending`` when given, else
    read and raised here."""
    own = pending is None
    pending = Pending() if own else pending

    def exact_h():  # the largest norm of the hidden rows read, in float64 (failure paths only)
        return float(_max_row_norm(hidden, rows, exact=True))

    if logits is not None:
        top_abs = defer_float32_range(pending, "hidden", hidden, rows)[0] if hidden is not None else None
        top, _ = defer_float32_range(pending, "logits", logits, rows)

        def exact():  # padding may hold anything: the scale of the rows read (host side, failure path only)
            if rows is None:
                return float(top)
            return float(logits.detach()[rows].abs().max()) if bool(rows.any()) else 0.0

        _defer_logit_scale(pending, temperature, top, "max |logits|", exact)
        if terms is not None and top_abs is not None:  # ||h|| <= sqrt(d) max |h|
            _defer_score_range(pending, terms, top_abs * math.sqrt(hidden.shape[-1]), exact_h)
    else:
        rows_read = weight_rows if callable(weight_rows) else (lambda: weight_rows)
        if norms is None:
            norms = _max_row_norm(hidden, rows), _max_row_norm(lm_head_weight, rows_read())
        top_h, top_w = norms
        if policy_norms_apply(hidden, lm_head_weight):
            # every finite value of these dtypes lies within float32 range, and a row's norm is finite only if
            # its values are: the norm pass serves the range check too; a non-finite norm sends the builder
            # to the element scans (which clear values that are finite but too large for the float32 norm)
            pending.fail_if(~(torch.isfinite(top_h) & torch.isfinite(top_w)), _first_error(
                lambda: check_float32_range("hidden", hidden, rows),
                lambda: check_float32_range("lm_head_weight", lm_head_weight, rows_read(), at=_WEIGHT_ROWS_READ)))
        else:
            defer_float32_range(pending, "hidden", hidden, rows)
            defer_float32_range(pending, "lm_head_weight", lm_head_weight, rows_read(), at=_WEIGHT_ROWS_READ)
        _defer_logit_scale(pending, temperature, top_h * top_w, _NORM_BOUND, lambda: exact_h() * float(
            _max_row_norm(lm_head_weight, rows_read(), exact=True)))  # a float32 norm overflows past ~1.8e19
        if terms is not None:
            _defer_score_range(pending, terms, top_h, exact_h)
    if own:
        pending.read()


def check_logprob_values(lp: torch.Tensor, rows: Optional[torch.Tensor] = None,
                         pending: Optional[Pending] = None) -> None:
    """``old_logprobs`` at the completion positions (``rows``, elementwise; all when None): finite, in
    float32 range, ``<= 0``. Recorded on ``pending`` when given, else read and raised here."""
    own = pending is None
    pending = Pending() if own else pending
    if lp.numel():
        _, hi = defer_float32_range(pending, "old_logprobs", lp, rows, hint="")
        pending.fail_if(hi > 0, lambda: ValueError(f"old_logprobs: log-probabilities must be <= 0, got max {float(hi)}"))
    if own:
        pending.read()


def check_bool(name: str, x) -> bool:
    if not isinstance(x, bool):
        raise TypeError(f"{name}: expected a bool, got {describe(x)}")
    return x


def check_score_inputs(h_pos, h_neg, err_pos, err_neg, check_finite: bool):
    check_bool("check_finite", check_finite)
    for name, x in (("h_pos", h_pos), ("h_neg", h_neg), ("err_pos", err_pos), ("err_neg", err_neg)):
        check_float_tensor(name, x)
        if x.dim() != 2:
            raise ValueError(f"{name}: expected a 2-D tensor [tokens, features], got shape {tuple(x.shape)}")
    if h_pos.shape[0] != err_pos.shape[0]:
        raise ValueError(f"err_pos: expected {h_pos.shape[0]} rows (one per row of h_pos), got {err_pos.shape[0]}")
    if h_neg.shape[0] != err_neg.shape[0]:
        raise ValueError(f"err_neg: expected {h_neg.shape[0]} rows (one per row of h_neg), got {err_neg.shape[0]}")
    if h_pos.shape[1] != h_neg.shape[1]:
        raise ValueError(f"h_neg: hidden size {h_neg.shape[1]} differs from h_pos's {h_pos.shape[1]}")
    if err_pos.shape[1] != err_neg.shape[1]:
        raise ValueError(f"err_neg: vocabulary size {err_neg.shape[1]} differs from err_pos's {err_pos.shape[1]}")
    check_feature_size("h_pos", h_pos.shape[1], "hidden size (columns)")
    check_feature_size("err_pos", err_pos.shape[1], "vocabulary slice (columns)")
    devs = {x.device for x in (h_pos, h_neg, err_pos, err_neg)}
    if len(devs) != 1:
        raise ValueError(f"h_pos, h_neg, err_pos, err_neg: expected one device, got {sorted(map(str, devs))}")
    if check_finite:
        top = [check_float32_range(name, x) * math.sqrt(x.shape[1])  # ||row|| <= sqrt(columns) max |x|
               for name, x in (("h_pos", h_pos), ("h_neg", h_neg), ("err_pos", err_pos), ("err_neg", err_neg))]
        # |s_t| <= T+ max |err_u . err_t| max |h_u . h_t|: within float32 range (exact norms if the bound fails)
        if h_pos.shape[0] * math.prod(top) > FLOAT32_MAX:
            norms = [float(_max_row_norm(x, exact=True)) for x in (h_pos, h_neg, err_pos, err_neg)]
            bound = h_pos.shape[0] * math.prod(norms)
            if bound > FLOAT32_MAX:
                raise ValueError(
                    f"h_pos, h_neg, err_pos, err_neg: row norms up to {norms[0]:.3g}, {norms[1]:.3g}, {norms[2]:.3g}, "
                    f"{norms[3]:.3g} let the scores reach {bound:.3g} ({h_pos.shape[0]} positive tokens x the four "
                    f"norms), beyond float32 range ({FLOAT32_MAX:.4g}); the maths is float32: scale the inputs "
                    f"down{_SKIP_HINT}")


@dataclass
class Batch:
    """A validated rollout batch, reduced to the list of completion tokens (ordered by response).

    ``tok_a`` / ``tok_b`` locate token ``t`` in the caller's tensors: ``hidden[tok_a, tok_b]`` for the
    padded layout, ``hidden[tok_a]`` for the packed one (``tok_b`` is None).
    """

    hidden: torch.Tensor
    token_ids: torch.Tensor
    lm_head_weight: Optional[torch.Tensor]
    logits: Optional[torch.Tensor]
    old_logprobs: Optional[torch.Tensor]
    opts: Options  # validated: temperature > 0, beta finite or -inf, known eta and anchor
    tok_a: torch.Tensor
    tok_b: Optional[torch.Tensor]
    tok_resp: torch.Tensor  # [n] int64, non-decreasing
    tok_ids: torch.Tensor  # [n] int64
    resp_group: torch.Tensor  # [R] int64 in [0, n_groups)
    group_ids: torch.Tensor  # [n_groups] sorted unique caller ids
    positive: torch.Tensor  # [R] bool
    adv: torch.Tensor  # [R] float32
    n_pos: torch.Tensor  # [n_groups] int64 positive responses
    n_resp: torch.Tensor  # [n_groups] int64 responses
    group_active: torch.Tensor  # [n_groups] bool: mixed and some positive response has a token
    pending: "Pending" = dataclasses.field(default_factory=lambda: Pending())  # checks not yet read (validate_batch)

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    @property
    def n_tokens(self) -> int:
        return self.tok_resp.numel()

    @property
    def vocab_size(self) -> int:
        src = self.lm_head_weight if self.lm_head_weight is not None else self.logits
        return src.shape[0] if self.lm_head_weight is not None else src.shape[-1]

    def gather(self, x: torch.Tensor, idx: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Rows of a tensor laid out like ``token_ids`` (hidden, logits, old_logprobs) for tokens ``idx``."""
        a = self.tok_a if idx is None else self.tok_a[idx]
        if self.tok_b is None:
            return x[a]
        b = self.tok_b if idx is None else self.tok_b[idx]
        return x[a, b]

    def result(self, scores, selected, token_adv, tau, eta) -> NTHRResult:
        """The public result from canonical-order per-token and per-group outputs of an implementation."""
        scores = scores.to(torch.float32)
        if not self.opts.score_positive:  # not computed by every implementation: one rule for all
            scores = torch.where(self.positive[self.tok_resp], torch.zeros_like(scores), scores)
        return NTHRResult(
            token_advantages=self.scatter(token_adv.to(torch.float32)),
            selected=self.scatter(selected, False),
            scores=self.scatter(scores),
            group_ids=self.group_ids.clone(),
            tau=tau.to(torch.float32, copy=True),  # fresh: an op output must not alias another
            eta=eta.to(torch.float32, copy=True),
            active=self.group_active.clone(),
        )

    def scatter(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """Place per-token ``values [n]`` into a new tensor laid out like ``token_ids`` (``fill`` elsewhere)."""
        out = torch.full(self.token_ids.shape, fill, dtype=values.dtype, device=values.device)
        if self.tok_b is None:
            out[self.tok_a] = values
        else:
            out[self.tok_a, self.tok_b] = values
        return out


def several_rewards_error(side: str, threshold: float, values: list, where: str = "") -> ValueError:
    """The refusal of rewards with several values on one ``side`` ("above", "at or below") of the threshold
    (:func:`binary_positive`; ``where``: e.g. " over the ranks of process_group")."""
    return ValueError(f"rewards: expected binary rewards (one value {side} reward_threshold={threshold}), "
                      f"got several{where}: {values}")


def binary_positive(rewards: torch.Tensor, threshold: Optional[float], pending: Optional[Pending] = None) -> torch.Tensor:
    """Which responses are correct: ``reward == 1`` of 0/1 rewards (``threshold`` None), else
    ``reward > threshold`` with at most one distinct value on each side. The value checks are recorded on ``pending``
    when given, else read and raised here."""
    if rewards.dtype == torch.bool:
        if threshold is not None:
            raise ValueError("reward_threshold: not used with bool rewards (True is correct); leave it None")
        return rewards.detach().clone()
    own = pending is None
    pending = Pending() if own else pending
    r = rewards.detach().to(torch.float64)
    pending.fail_if(~torch.isfinite(r).all(), lambda: ValueError("rewards: contains NaN or Inf"))
    if threshold is not None and not rewards.is_floating_point():
        # float64 holds every integer of magnitude below 2^53 and no other is compared (2^53 + 1 becomes 2^53:
        # two distinct rewards would compare equal, or one would move across the threshold); a value at or
        # beyond 2^53 stays there when rounded, so the float64 test below is exact (int64 and uint64 alike)
        huge = r.abs() >= INT_EXACT_LIMIT
        pending.fail_if(huge.any(), lambda: ValueError(
            f"rewards: integer rewards compared with reward_threshold must lie strictly within +-2^53 "
            f"(+-{INT_EXACT_LIMIT:.0f}, where float64 holds every integer exactly), got "
            f"{sorted(set(rewards.detach()[huge].tolist()))[:6]}; shift or rescale the encoding"
        ))
    if threshold is None:
        off = (r != 0) & (r != 1)
        pending.fail_if(off.any(), lambda: ValueError(
            f"rewards: expected binary rewards 0/1 (or bool), got {torch.unique(r[off])[:6].tolist()}; "
            "for other encodings pass reward_threshold (correct iff reward > reward_threshold)"
        ))
        pos = r == 1
    else:
        pos = r > threshold
        for side, name in ((pos, "above"), (~pos, "at or below")):
            several = (torch.where(side, r, math.inf).amin() < torch.where(side, r, -math.inf).amax()
                       if r.numel() else side.any())
            pending.fail_if(several, lambda side=side, name=name: several_rewards_error(
                name, threshold, torch.unique(r[side])[:6].tolist()))
    if own:
        pending.read()
    return pos


def group_ids_tensor(group_ids, device) -> torch.Tensor:
    """``group_ids`` as an integer tensor (a sequence of ints is converted); ``TypeError`` otherwise."""
    if not isinstance(group_ids, torch.Tensor):
        try:
            group_ids = torch.as_tensor(list(group_ids), device=device)
        except (TypeError, ValueError, RuntimeError) as e:
            raise TypeError(f"group_ids: expected a sequence or tensor of integers ({e})") from None
        if group_ids.numel() == 0:
            group_ids = group_ids.to(torch.int64)
    check_int_tensor("group_ids", group_ids)
    return group_ids


def _groups(n_resp: int, group_size, group_ids, device):
    """``(sorted unique group ids, group index of each response)`` from ``group_size`` or ``group_ids``."""
    if group_size is not None:
        return torch.arange(n_resp // group_size, device=device), torch.arange(n_resp, device=device) // group_size
    gids, resp_group = torch.unique(group_ids.to(torch.int64), sorted=True, return_inverse=True)
    return gids, resp_group


def group_success_rates(rewards, reward_threshold: Optional[float], group_size, group_ids) -> torch.Tensor:
    """Float64 success rate ``p`` of every group (sorted by id) after the reward checks; for a callable
    ``eta``, which the public API evaluates before the op (arguments already statically checked)."""
    positive = binary_positive(rewards, reward_threshold)
    gids, resp_group = _groups(rewards.shape[0], group_size, group_ids, rewards.device)
    n_resp = torch.bincount(resp_group, minlength=gids.numel())
    n_pos = torch.bincount(resp_group, weights=positive.to(torch.float64), minlength=gids.numel())
    return n_pos / n_resp.clamp_min(1).to(torch.float64)


@dataclass
class StaticInfo:
    """What :func:`check_batch_static` derives from shapes and Python scalars alone."""

    lead_shape: tuple
    n_resp: int
    vocab: int
    opts: Options  # validated, numbers as floats
    group_ids: Optional[torch.Tensor]


def check_batch_static(x: Inputs, opts: Options) -> StaticInfo:
    """The checks of :func:`validate_batch` that read only types, shapes, dtypes, devices and Python
    scalars, never tensor values: ``torch.compile`` traces them without a graph break, so the public API
    runs them before the op and the op's eager kernel runs the value checks."""
    hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, mask, cu_seqlens, group_size, group_ids = x
    check_float_tensor("hidden", hidden)
    check_int_tensor("token_ids", token_ids)
    if hidden.dim() >= 1:
        check_feature_size("hidden", hidden.shape[-1], "hidden size d (last dim)")
    dev = hidden.device
    others = []  # (name, device) of the other tensor arguments given
    for name, x in (
        ("token_ids", token_ids),
        ("rewards", rewards),
        ("advantages", advantages),
        ("lm_head_weight", lm_head_weight),
        ("logits", logits),
        ("old_logprobs", old_logprobs),
        ("mask", mask),
        ("cu_seqlens", cu_seqlens),
        ("group_ids", group_ids if isinstance(group_ids, torch.Tensor) else None),
    ):
        if x is not None:
            _is_tensor(name, x)
            others.append((name, x.device))
    off = [(name, d) for name, d in others if d != dev]
    if off and len(off) == len(others) and len({d for _, d in off}) == 1:  # hidden is the odd one out
        raise ValueError(f"hidden: expected device {off[0][1]} (that of every other tensor argument: "
                         f"{', '.join(name for name, _ in off)}), got {dev}")
    if off:
        raise ValueError(f"{off[0][0]}: expected device {dev} (the device of hidden), got {off[0][1]}")

    # ---- layout -------------------------------------------------------------------------------------
    if cu_seqlens is not None:
        if mask is not None:
            raise ValueError("mask: not used with cu_seqlens (packed layout); pass one of the two")
        if hidden.dim() != 2:
            raise ValueError(f"hidden: packed layout (cu_seqlens given) expects [N, d], got shape {tuple(hidden.shape)}")
        check_int_tensor("cu_seqlens", cu_seqlens)
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens: expected a 1-D tensor [R+1], got shape {tuple(cu_seqlens.shape)}")
        n_resp = cu_seqlens.numel() - 1
        lead_shape = (hidden.shape[0],)
    else:
        if hidden.dim() != 3:
            raise ValueError(
                f"hidden: expected [R, L, d] (padded layout) or [N, d] with cu_seqlens, got shape {tuple(hidden.shape)}"
            )
        n_resp = hidden.shape[0]
        lead_shape = tuple(hidden.shape[:2])
        if mask is None:
            raise ValueError(
                "mask: required with the padded layout (True at completion tokens); pass "
                "torch.ones_like(token_ids, dtype=torch.bool) when there is no padding"
            )
        if tuple(mask.shape) != lead_shape and tuple(mask.shape) == tuple(token_ids.shape):
            # token_ids and mask agree: hidden is the odd one out (typically the whole sequence's states)
            raise ValueError(
                f"hidden: expected shape [{', '.join(map(str, token_ids.shape))}, d] (the [R, L] of token_ids and mask: the "
                f"lm_head input at each completion position, not the prompt's rows), got {tuple(hidden.shape)}"
            )
        if tuple(mask.shape) != lead_shape:
            raise ValueError(f"mask: expected shape {lead_shape} (hidden's [R, L]), got {tuple(mask.shape)}")
        if mask.is_floating_point() or mask.is_complex():
            raise TypeError(f"mask: expected a bool or 0/1 integer tensor, got dtype {mask.dtype}")
    if tuple(token_ids.shape) != lead_shape:
        raise ValueError(f"token_ids: expected shape {lead_shape} (hidden without its last dim), got {tuple(token_ids.shape)}")

    # ---- rewards, advantages, groups ------------------------------------------------------------------
    for name, x in (("rewards", rewards), ("advantages", advantages)):
        if x.dim() != 1 or x.shape[0] != n_resp:
            raise ValueError(f"{name}: expected shape [{n_resp}] (one per response), got {tuple(x.shape)}")
        if x.is_complex() or (x.is_floating_point() and x.dtype not in FLOAT_DTYPES):
            raise TypeError(f"{name}: expected a bool, integer, float16, bfloat16, float32 or float64 tensor, "
                            f"got dtype {x.dtype}")
    check_float_tensor("advantages", advantages)
    if (group_size is None) == (group_ids is None):
        raise ValueError("group_size, group_ids: pass exactly one of the two")
    if group_size is not None:
        if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral):
            raise TypeError(f"group_size: expected an int, got {type(group_size).__name__}")
        if group_size <= 0 or n_resp % group_size != 0:
            raise ValueError(f"group_size: must be a positive divisor of the number of responses {n_resp}, got {group_size}")
    else:
        group_ids = group_ids_tensor(group_ids, dev)
        if group_ids.dim() != 1 or group_ids.shape[0] != n_resp:
            raise ValueError(f"group_ids: expected shape [{n_resp}] (one per response), got {tuple(group_ids.shape)}")

    # ---- old policy -----------------------------------------------------------------------------------
    if (lm_head_weight is None) == (logits is None):
        raise ValueError("lm_head_weight, logits: pass exactly one of the two (the old policy's source)")
    d = hidden.shape[-1]
    if lm_head_weight is not None:
        check_float_tensor("lm_head_weight", lm_head_weight)
        if lm_head_weight.dim() != 2:
            raise ValueError(f"lm_head_weight: expected [V, d], got shape {tuple(lm_head_weight.shape)}")
        if lm_head_weight.shape[1] != d:
            raise ValueError(f"lm_head_weight: expected [V, {d}] (d: hidden's last dim), got shape {tuple(lm_head_weight.shape)}")
        vocab = lm_head_weight.shape[0]
    else:
        check_float_tensor("logits", logits)
        if logits.dim() != hidden.dim() or tuple(logits.shape[:-1]) != lead_shape:
            raise ValueError(f"logits: expected shape {lead_shape + ('V',)}, got {tuple(logits.shape)}")
        vocab = logits.shape[-1]
    check_feature_size("lm_head_weight" if lm_head_weight is not None else "logits", vocab, "vocabulary size")
    if old_logprobs is not None:
        if logits is not None:
            raise ValueError("old_logprobs: only used with lm_head_weight (with logits the normaliser comes from the logits)")
        check_float_tensor("old_logprobs", old_logprobs)
        if tuple(old_logprobs.shape) != lead_shape:
            raise ValueError(f"old_logprobs: expected shape {lead_shape} (the layout of token_ids), got {tuple(old_logprobs.shape)}")

    return StaticInfo(lead_shape, n_resp, vocab, check_options(opts), group_ids)


def validate_batch(x: Inputs, opts: Options, *, defer: bool = False, value_checks=None) -> Batch:
    """All checks (:func:`check_batch_static`, then the value checks) and the canonical token list.

    Host synchronisations: the value checks, the token count of a padded layout and the sizes the
    ``old_logprobs`` check needs are read in one copy (:class:`Pending`); ``group_ids`` adds one (its
    ``unique``). The ``old_logprobs`` check itself is computed on the device and left on
    ``batch.pending``: read here, or with ``defer=True`` by the implementation together with its own
    first read (the Triton path), so that a call costs no extra synchronisation for it.
    ``value_checks(batch, weight_all_rows, idx) -> (norms, excess)``: an implementation's own arithmetic for
    the checks that need it, once the token list exists (the native backend's, in one pass; the Triton
    backend's, in two kernels):
    ``norms`` ``[2]`` for :func:`check_policy_values` (the largest norm of ``hidden`` at the canonical tokens
    and of the weight rows read; asked for with ``weight_all_rows`` not None, when :func:`policy_norms_apply`)
    and ``excess`` for the ``old_logprobs`` check (:func:`implied_vstar_mass` at ``idx``, when not None); by
    default the torch norm pass (in the first read) and the blocks of :func:`_implied_mass`. Its checks are
    recorded on ``batch.pending``, the policy values ahead of the ``old_logprobs`` check: the order of the
    checks is unchanged (the policy values are the last of the first read's).
    """
    st = check_batch_static(x, opts)
    opts = st.opts
    hidden, token_ids, rewards, advantages, lm_head_weight, logits, old_logprobs, mask, cu_seqlens, group_size, _ = x
    dev = hidden.device
    n_resp, vocab, group_ids = st.n_resp, st.vocab, st.group_ids
    pend = Pending()

    # ---- layout: positions (rows of a packed hidden, cells of a padded [R, L]) -----------------------
    if cu_seqlens is not None:
        n_pos = hidden.shape[0]
        cs = cu_seqlens.to(torch.int64)
        pend.fail_if((cs[0] != 0) | (cs[-1] != n_pos) | (cs[1:] < cs[:-1]).any(), lambda: ValueError(
            f"cu_seqlens: expected non-decreasing offsets from 0 to {n_pos} (the rows of hidden), "
            f"got first={int(cs[0])}, last={int(cs[-1])}"
        ))
        resp_len = cs[1:] - cs[:-1]
        rows = None  # every row is a completion token
        pos_resp = torch.searchsorted(cs[1:], torch.arange(n_pos, device=dev), right=True).clamp_(max=max(n_resp - 1, 0))
    else:
        if mask.dtype != torch.bool:
            pend.fail_if(((mask != 0) & (mask != 1)).any(), lambda: ValueError("mask: an integer mask must hold only 0 and 1"))
        rows = mask.to(torch.bool)
        resp_len = rows.sum(1)
        n_pos = rows.numel()
        pos_resp = None  # position // L

    # ---- rewards, advantages, groups ------------------------------------------------------------------
    defer_float32_range(pend, "advantages", advantages, hint="")  # always checked: one value per response
    positive = binary_positive(rewards, opts.reward_threshold, pend)
    gids, resp_group = _groups(n_resp, group_size, group_ids, dev)
    n_groups = gids.numel()

    # ---- group statistics ------------------------------------------------------------------------------
    zeros = lambda: torch.zeros(n_groups, dtype=torch.int64, device=dev)  # noqa: E731
    n_resp_g = zeros().scatter_add_(0, resp_group, torch.ones_like(resp_group))
    n_pos_g = zeros().scatter_add_(0, resp_group, positive.to(torch.int64))
    pos_len = torch.where(positive, resp_len, 0)
    pos_tok_per_group = zeros().scatter_add_(0, resp_group, pos_len)
    active = (n_pos_g > 0) & (n_pos_g < n_resp_g) & (pos_tok_per_group > 0)
    terms = score_terms(pos_tok_per_group, pos_len)

    # ---- old policy -----------------------------------------------------------------------------------
    ids_pos = (token_ids if rows is None else torch.where(rows, token_ids, 0)).to(torch.int64)
    if ids_pos.numel():
        id_lo, id_hi = ids_pos.min(), ids_pos.max()
        pend.fail_if((id_lo < 0) | (id_hi >= vocab), lambda: ValueError(
            f"token_ids: completion token ids must lie in [0, {vocab}), got range [{int(id_lo)}, {int(id_hi)}]"
        ))
    if old_logprobs is not None:
        check_logprob_values(old_logprobs, rows, pend)
    own_norms = (opts.check_finite and value_checks is not None and lm_head_weight is not None
                 and policy_norms_apply(hidden, lm_head_weight))
    weight_rows = None  # the weight rows read: all, or with old_logprobs those of the completion ids
    if opts.check_finite and lm_head_weight is not None and old_logprobs is not None:
        # the torch norm pass needs them now; the native pass finds its rows itself, and only the message
        # builder of a failure calls weight_rows() (ids clamped: bad ids raise first, at the first read)
        weight_rows = lambda: weight_rows_read(ids_pos.clamp(0, vocab - 1), rows, vocab)  # noqa: E731
        if not own_norms:
            weight_rows = weight_rows()
    if opts.check_finite and not own_norms:
        check_policy_values(hidden, lm_head_weight, logits, opts.temperature, rows, pend, weight_rows, terms=terms)

    # ---- the one read: checks, token count, the old_logprobs sample's V* ranges ------------------------
    extra = [resp_len.sum()] if rows is not None else []
    sample = None
    check_lp = old_logprobs is not None and opts.check_logprobs and n_pos and n_resp
    if check_lp and value_checks is None:
        sample = _sample_vstar(ids_pos.reshape(-1), rows, pos_resp, resp_group, resp_len.sum(), n_groups, vocab)
        extra.append(sample[0])
    got = pend.read(*extra)
    n = got[0][0] if rows is not None else n_pos

    # ---- canonical token list -------------------------------------------------------------------------
    if rows is None:
        tok_a, tok_b, tok_resp = torch.arange(n, device=dev), None, pos_resp
    else:
        try:
            nz = torch.nonzero_static(rows, size=n)  # the count is known: no synchronisation
        except (NotImplementedError, RuntimeError):  # a device without it: nonzero (one more read)
            nz = rows.nonzero()
        tok_a, tok_b = nz[:, 0], nz[:, 1]
        tok_resp = tok_a
    tok_ids = (token_ids[tok_a] if tok_b is None else token_ids[tok_a, tok_b]).to(torch.int64)

    batch = Batch(
        hidden=hidden,
        token_ids=token_ids,
        lm_head_weight=lm_head_weight,
        logits=logits,
        old_logprobs=old_logprobs,
        opts=opts,
        tok_a=tok_a,
        tok_b=tok_b,
        tok_resp=tok_resp,
        tok_ids=tok_ids,
        resp_group=resp_group,
        group_ids=gids,
        positive=positive,
        adv=advantages.detach().to(torch.float32),
        n_pos=n_pos_g,
        n_resp=n_resp_g,
        group_active=active,
    )
    own_lp = bool(check_lp and n) and value_checks is not None
    if own_norms or own_lp:
        top, excess = value_checks(batch, (old_logprobs is None) if own_norms else None,
                                   logprob_sample(n, dev) if own_lp else None)
    if own_norms:
        check_policy_values(hidden, lm_head_weight, None, opts.temperature, rows, batch.pending, weight_rows,
                            norms=(top[0], top[1]), terms=terms)
    if check_lp and n:
        if not own_lp:
            k, (_, dk, lo, cnt) = min(n, LOGPROB_SAMPLE), sample
            host = got[-1]
            excess = _implied_mass(batch, logprob_sample(n, dev), dk, lo[:k], cnt[:k],
                                   host[:k], host[LOGPROB_SAMPLE:LOGPROB_SAMPLE + k])
        defer_logprobs_consistent(batch.pending, excess, opts.temperature)
    if not defer:
        batch.pending.read()
    return batch


def logprob_sample(n: int, device=None) -> torch.Tensor:
    """The deterministic sample of the ``old_logprobs`` check: ``LOGPROB_SAMPLE`` evenly spaced tokens
    (made on ``device``: no host-to-device copy)."""
    k = min(n, LOGPROB_SAMPLE)
    return torch.arange(k, dtype=torch.int64, device=device) * n // max(k, 1)


def _distinct_keys(key: torch.Tensor, sentinel: int) -> torch.Tensor:
    """The distinct values of ``key`` below ``sentinel``, ascending, then ``sentinel`` to ``key``'s length:
    a ``unique`` of fixed size (no synchronisation)."""
    skey, _ = torch.sort(key)
    first = skey < sentinel
    first[1:] &= skey[1:] != skey[:-1]
    slot = torch.where(first, torch.cumsum(first, 0) - 1, key.numel())
    return torch.full((key.numel() + 1,), sentinel, dtype=key.dtype, device=key.device).scatter_(0, slot, skey)[:-1]


def _vstar_range(dk: torch.Tensor, g: torch.Tensor, vocab: int):
    """``(start, length)`` in ``dk`` (:func:`_distinct_keys` of ``group * vocab + id``) of groups ``g``'s ``V*``."""
    lo = torch.searchsorted(dk, g * vocab)
    return lo, torch.searchsorted(dk, (g + 1) * vocab) - lo


def _sample_vstar(ids, rows, pos_resp, resp_group, n, n_groups: int, vocab: int):
    """For the :func:`logprob_sample` tokens, computed before the token list exists (any ``n`` on the
    device): ``(sizes, dk, lo, cnt)``: ``lo``, ``cnt`` [LOGPROB_SAMPLE] locate each sampled token's group
    ``V*`` in ``dk`` (``sizes`` is the two concatenated, for the host read), where ``dk`` holds every group's ``V*`` as
    sorted ``group * vocab + id`` keys (:func:`_distinct_keys`). Bad inputs (clamped here) are caught
    by the checks read in the same copy."""
    dev = ids.device
    k_all = torch.arange(LOGPROB_SAMPLE, device=dev)
    k_n = n.clamp(max=LOGPROB_SAMPLE).clamp(min=1)
    rank = k_all * n // k_n  # the canonical index of sample slot k (valid for k < min(n, SAMPLE))
    if rows is None:
        pos = rank.clamp(0, ids.numel() - 1)
        group_of_pos = resp_group[pos_resp]
        comp = None
    else:
        comp = rows.reshape(-1)
        pos = torch.searchsorted(torch.cumsum(comp, 0), rank + 1).clamp(0, comp.numel() - 1)
        group_of_pos = resp_group[torch.arange(comp.numel(), device=dev) // rows.shape[1]]
    sentinel = n_groups * vocab
    key = group_of_pos * vocab + ids.clamp(0, vocab - 1)
    if comp is not None:
        key = torch.where(comp, key, sentinel)
    dk = _distinct_keys(key, sentinel)
    lo, cnt = _vstar_range(dk, group_of_pos[pos], vocab)
    return torch.cat([lo, cnt]), dk, lo, cnt


# float32 elements of the gathered weight rows per block of the old_logprobs check (64 MiB): within the
# torch backend's scratch bound, and the check runs before the backend's own blocks exist.
_CHECK_ELEMS = 4 * SCRATCH_ELEMS


def _implied_mass(batch: Batch, idx: torch.Tensor, dk: torch.Tensor, lo: torch.Tensor, cnt: torch.Tensor,
                  lo_h: list, cnt_h: list) -> torch.Tensor:
    """float64 implied log-mass (:func:`implied_vstar_mass`) at canonical tokens ``idx``, whose group's
    ``V*`` is ``dk[lo : lo + cnt]`` (``dk`` from :func:`_distinct_keys`; ``lo``, ``cnt`` on the device
    and, as ``lo_h``, ``cnt_h``, on the host). The tokens are sorted by ``lo`` (on the device and,
    identically, on the host), and the tokens of one group share one batch entry of a padded ``bmm``
    against their ``V*`` weight rows; a block holds at most ``_CHECK_ELEMS`` weight elements (a group
    beyond that is split into column blocks joined with ``logaddexp``). No synchronisation."""
    k, dev = idx.numel(), batch.device
    out = torch.empty(k, dtype=torch.float64, device=dev)
    if k == 0:
        return out
    vocab, w, t = batch.vocab_size, batch.lm_head_weight, batch.opts.temperature
    d = w.shape[1]
    ar = torch.arange(k, device=dev)
    order = torch.sort(lo * k + ar).indices  # by V* start, stable
    runs = []  # host: [V* start, |V*|, tokens] per run of one group, in the same order
    for i in sorted(range(k), key=lambda i: (lo_h[i], i)):
        if not runs or lo_h[i] != runs[-1][0]:
            runs.append([lo_h[i], cnt_h[i], 0])
        runs[-1][2] += 1
    slo, scnt = lo[order], cnt[order]
    first = torch.ones(k, dtype=torch.bool, device=dev)
    first[1:] = slo[1:] != slo[:-1]
    run_id = torch.cumsum(first, 0) - 1
    within = ar - torch.cummax(torch.where(first, ar, 0), 0).values
    sidx = idx[order]
    h = batch.gather(batch.hidden, sidx).float()
    zy = (h * w.index_select(0, batch.tok_ids[sidx]).float()).sum(-1)
    lse = torch.full((k,), -math.inf, dtype=torch.float64, device=dev)
    r, a = 0, 0  # first run and first sorted token of the block
    while r < len(runs):
        vmax, r1, b = max(runs[r][1], 1), r + 1, a + runs[r][2]
        while r1 < len(runs) and (r1 - r + 1) * max(vmax, runs[r1][1]) * d <= _CHECK_ELEMS:
            vmax, b, r1 = max(vmax, runs[r1][1]), b + runs[r1][2], r1 + 1
        nr, kmax = r1 - r, max(x[2] for x in runs[r:r1])
        rr = run_id[a:b] - r
        slot = rr * kmax + within[a:b]  # each token's row in the padded [runs * kmax] layout
        hp = h.new_zeros(nr * kmax, d).index_copy_(0, slot, h[a:b]).view(nr, kmax, d)
        run_lo = torch.zeros(nr, dtype=torch.int64, device=dev).scatter_(0, rr, slo[a:b])
        run_cnt = torch.zeros(nr, dtype=torch.int64, device=dev).scatter_(0, rr, scnt[a:b])
        vb = max(1, _CHECK_ELEMS // (nr * d))
        for c0 in range(0, vmax, vb):
            cols = c0 + torch.arange(min(vb, vmax - c0), device=dev)
            valid = cols[None, :] < run_cnt[:, None]  # [runs, cols]
            ids = torch.where(valid, dk[(run_lo[:, None] + cols[None, :]).clamp(max=dk.numel() - 1)] % vocab, 0)
            wr = w.index_select(0, ids.reshape(-1)).view(nr, -1, d).float()
            z = torch.bmm(hp, wr.transpose(1, 2)).view(nr * kmax, -1).index_select(0, slot)  # [tokens, cols]
            z = torch.where(valid.index_select(0, rr), (z - zy[a:b, None]) / t, -math.inf)
            lse[a:b] = torch.logaddexp(lse[a:b], torch.logsumexp(z, dim=-1).double())
        r, a = r1, b
    out[order] = batch.gather(batch.old_logprobs, sidx).double() + lse
    return out


def implied_vstar_mass(batch: Batch, idx: torch.Tensor) -> torch.Tensor:
    """float64 ``[k]``: the log of the probability mass that ``(hidden, lm_head_weight, old_logprobs,
    temperature)`` imply on the token's group ``V*`` at canonical tokens ``idx``:
    ``l_t + logsumexp_{v in V*} (w_v - w_{y_t}) . h_t / T``. At most 0 when ``l_t`` is the model's
    log-probability of ``y_t`` at ``h_t``; above 0 means the slice would hold more than probability 1.
    (A tool: one synchronisation to size its blocks. :func:`validate_batch` reads the sizes with its checks.)"""
    idx = idx.to(batch.device)
    dk, lo, cnt = vstar_ranges(batch, idx)
    host = torch.cat([lo, cnt]).tolist()
    return _implied_mass(batch, idx, dk, lo, cnt, host[:idx.numel()], host[idx.numel():])


def vstar_ranges(batch: Batch, idx: torch.Tensor):
    """``(dk, lo, cnt)``: every group's ``V*`` as sorted ``group * vocab + id`` keys (:func:`_distinct_keys`),
    and where the ``V*`` of the groups of canonical tokens ``idx`` lies in them (start, length). No
    synchronisation."""
    vocab = batch.vocab_size
    g_tok = batch.resp_group[batch.tok_resp]
    dk = _distinct_keys(g_tok * vocab + batch.tok_ids, batch.group_ids.numel() * vocab)
    lo, cnt = _vstar_range(dk, g_tok[idx], vocab)
    return dk, lo, cnt


def implied_mass_on(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor, old_logprobs: torch.Tensor,
                    vocab: torch.Tensor, temperature: float, idx: torch.Tensor) -> torch.Tensor:
    """float64 ``[k]``: :func:`implied_vstar_mass` for the rows ``idx`` of one group (``hidden [T, d]``,
    ``ids [T]``, ``old_logprobs [T]``) over one vocabulary slice ``vocab`` (the check of
    :func:`nthr_kernels.prediction_errors`), the same arithmetic in column blocks of at most ``_CHECK_ELEMS``
    weight elements and ``_CHECK_ELEMS`` logits."""
    w = lm_head_weight.detach()
    h = hidden.detach()[idx].float()
    zy = (h * w.index_select(0, ids[idx]).float()).sum(-1)
    lse = torch.full((idx.numel(),), -math.inf, dtype=torch.float64, device=h.device)
    vb = max(1, min(_CHECK_ELEMS // w.shape[1], _CHECK_ELEMS // max(idx.numel(), 1)))
    for c0 in range(0, vocab.numel(), vb):
        z = (h @ w.index_select(0, vocab[c0 : c0 + vb]).float().T - zy[:, None]) / temperature
        lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1).double())
    return old_logprobs.detach()[idx].double() + lse


def defer_logprobs_consistent(pending: Pending, excess: torch.Tensor, temperature: float,
                              over: str = "the group's V*") -> None:
    """Record on ``pending`` the ``old_logprobs`` check of the implied log-masses ``excess`` of the
    :func:`logprob_sample` tokens: it fails if ``old_logprobs`` do not belong to ``hidden`` (e.g. taken one
    position off, or at another temperature), i.e. if the implied mass on ``V*`` (``over``) exceeds
    ``exp(LOGPROB_TOLERANCE)`` on more than ``LOGPROB_MAX_BAD`` tokens (docs/NTHR.md)."""
    bad = (excess > LOGPROB_TOLERANCE) & torch.isfinite(excess)  # non-finite inputs: check_finite's business
    n_bad = bad.sum()
    pending.fail_if(n_bad > LOGPROB_MAX_BAD, lambda: ValueError(
        f"old_logprobs: inconsistent with hidden, lm_head_weight and temperature={temperature:g}: "
        f"on {int(n_bad)} of {bad.numel()} sampled tokens the implied probabilities over {over} "
        f"sum to more than exp({LOGPROB_TOLERANCE}) (largest: exp({float(excess[bad].max()):.3g})). Check the "
        "alignment (hidden position t predicts token t+1) and the temperature; pass check_logprobs=False "
        "to skip this check"
    ))


def check_options(opts: Options) -> Options:
    """``opts`` with its numbers checked and converted to ``float``; ``ValueError``/``TypeError`` naming
    the field otherwise."""
    if not isinstance(opts, Options):
        raise TypeError(f"options: expected nthr_kernels.core.rules.Options, got {type(opts).__name__}")
    temperature = check_real("temperature", opts.temperature)
    if not _traced() and temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    beta = check_real("beta", opts.beta, allow_neg_inf=True)
    check_eta(opts.eta)
    if not isinstance(opts.anchor, str) or opts.anchor not in ANCHORS:
        raise ValueError(f"anchor: expected one of {ANCHORS}, got {opts.anchor!r}")
    check_backend(opts.backend)
    for name in ("check_finite", "check_logprobs", "score_positive"):
        check_bool(name, getattr(opts, name))
    rt = opts.reward_threshold
    return dataclasses.replace(opts, temperature=temperature, beta=beta,
                               reward_threshold=None if rt is None else check_real("reward_threshold", rt, exact=True))


def check_prediction_inputs(token_ids, hidden, lm_head_weight, logits, old_logprobs, temperature, vocab, check_finite,
                            check_logprobs=True):
    """Every check of :func:`nthr_kernels.prediction_errors`; returns ``(ids int64, vocab int64, temperature)``."""
    check_bool("check_finite", check_finite)
    check_bool("check_logprobs", check_logprobs)
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
        check_feature_size("hidden", hidden.shape[1], "hidden size d (last dim)")
        if lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[1]:
            raise ValueError(
                f"lm_head_weight: expected [V, {hidden.shape[1]}] (hidden's size), got {tuple(lm_head_weight.shape)}"
            )
        v_size = lm_head_weight.shape[0]
        check_feature_size("lm_head_weight", v_size, "vocabulary size")
    else:
        if hidden is not None:
            raise ValueError("hidden: only used with lm_head_weight; with logits pass logits alone")
        check_float_tensor("logits", logits)
        if logits.dim() != 2 or logits.shape[0] != n:
            raise ValueError(f"logits: expected shape [{n}, V], got {tuple(logits.shape)}")
        if old_logprobs is not None:
            raise ValueError("old_logprobs: only used with lm_head_weight")
        v_size = logits.shape[1]
        check_feature_size("logits", v_size, "vocabulary size")
    temperature = check_real("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"temperature: must be > 0, got {temperature}")
    for name, x in (("hidden", hidden), ("lm_head_weight", lm_head_weight), ("logits", logits),
                    ("old_logprobs", old_logprobs), ("vocab", vocab)):
        if x is not None and _is_tensor(name, x).device != token_ids.device:
            raise ValueError(f"{name}: expected device {token_ids.device} (the device of token_ids), got {x.device}")
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
        check_logprob_values(old_logprobs)
    if check_finite:  # with old_logprobs only the weight rows of vocab and of the token ids are read
        rows = None if old_logprobs is None else weight_rows_read(torch.cat([vocab, ids]), None, v_size)
        check_policy_values(hidden, lm_head_weight, logits, temperature, weight_rows=rows)
    if old_logprobs is not None and check_logprobs and n:
        pending = Pending()
        excess = implied_mass_on(hidden, lm_head_weight, ids, old_logprobs, vocab, temperature, logprob_sample(n, ids.device))
        defer_logprobs_consistent(pending, excess, temperature, "vocab")
        pending.read()
    return ids, vocab, temperature
