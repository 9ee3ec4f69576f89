"""Fused Triton kernels for NTHR (``docs/NTHR.md``), shared by the Triton implementations of
``nthr_advantages`` and ``score_tokens``.

Pipeline of the factored path, for all groups of a chunk at once (``ops/advantages/triton_impl.py``
plans the chunks and calls the launchers of :class:`Kernels`):

1. ``log Z_t = z_t[y_t] / T - l_t``: :func:`_zy_kernel`, the old-log-prob shortcut (one gathered dot per
   token), or :func:`_lse_kernel`, a chunked online logsumexp over the vocabulary but the sampled token
   (tensor-core tiles of ``W h``, logits never stored), which gives ``l_t = -softplus(L - z_y)`` from the
   same tiles, or the same from given logits rows (torch); the errors take the sampled token's error
   ``-expm1(l_t)`` from ``l_t``.
2. :func:`_err_kernel`: prediction errors ``g = onehot - exp(z / T - log Z)`` of a segment's error rows
   on its ``V*`` (``z`` from tensor-core tiles of ``h`` and the ``V*`` rows of ``W``, or gathered from
   logits), written transposed to a scratch buffer ``[|V*|, roundup16(rows)]`` in the input dtype, float32 for
   fp16 inputs (:func:`err_dtype`: fp16's range loses a near-certain token's small errors).
3. :func:`_m_kernel`: ``G^T H`` per segment (``[|V*|, d]``, float32 accumulation), a varlen grouped
   GEMM over the transposed error buffer; its segments are the positive responses, so it writes each
   one's ``N_i = G_i^T H_i`` (float32). :func:`_anchor_kernel` then sums a group's ``N_i`` in order into
   ``M`` and forms the partial sums of ``<M, N_i>`` (the sum of the response's scores, so its anchor is
   that over ``|y_i|``) and ``<N_i, N_i>`` (its own part, removed for ``anchor="others"``): positive
   tokens need no score of their own, and ``tau`` follows on the device. (``score_tokens`` runs the M
   kernel on its one group for ``M`` directly.)
4. :func:`_score_kernel`: for a block of tokens, loop over ``V*`` tiles; one K-loop over ``d`` forms
   both ``z = h W*^T`` and ``q = h M^T`` and accumulates ``s_t += sum_v g_t[v] q_t[v]``, so
   ``s_t = g_t^T M h_t`` without storing ``g`` or ``G M``. It scores the negative tokens and, in the
   same pass, applies the threshold and writes the selection and token advantages. Positive tokens are
   scored only when their scores are asked for (``score_positive``), reading their errors back from the
   buffer of step 2.
5. The pairwise path, flash-attention style: :func:`_seg_pair_kernel` accumulates row sums of
   ``[BT, BU]`` tiles of ``G G+^T`` and ``H H+^T`` from the group's error buffer (every token's errors,
   written by step 2), never materialising tokens x tokens; the cost model sends a group there when
   ``2 T+ T (|V*| + d) < 2 |V*| d T`` (:func:`nthr_kernels.core.rules.pairwise_cheaper`, which adds the
   positive tokens' scores with ``score_positive`` and the own-pairs pass of ``anchor="others"``).
   :func:`_pair_kernel` is the dense-error version for ``score_tokens``.

Addressing: every kernel reads token rows through an int64 row offset per token (``ROW_H`` for the
hidden states, ``ROW_LG`` for logits; computed once per call from the caller's strides; the old log-probs,
one value per token, arrive gathered in plan order) plus the feature/vocabulary stride, and forms every offset in int64, so views with
strides beyond 2^31 elements are read correctly. ``ALIGN`` (``d % 16 == 0`` and every row offset a
multiple of 16) lets the compiler vectorise the row loads and the ``M`` rows.

Segments: the groups (or responses) a launch works on are rows of one int64 table
``[n_seg, SEG_WIDTH]`` (:class:`Segment`, columns ``SEG_*``): where the segment's ``V*``, error rows,
scratch and scored tokens are. Optional inputs arrive as ``None`` and become compile-time flags
(``@triton.heuristics``): ``LG`` (z from logits), ``GP`` in the score kernel (errors from the buffer),
``THR`` (threshold and rescale fused), ``RESP`` (pairwise: only pairs within a response). Grids are 1D
with the segment slowest (:func:`_tile`), so the programs in flight share one segment's operands in L2.

Scratch memory: ``M`` for the groups in flight (``sum_g |V*_g| d`` elements; bf16 for bf16 inputs,
float32 otherwise, since fp16 lacks the range) plus the transposed positive-error buffer
(``sum_g |V*_g| * roundup16(T+_g)`` elements of :func:`err_dtype`) plus each positive response's ``N_i``
(``|V*_g| d`` float32 elements) and its anchor partial sums (8 bytes per tile of the anchor kernel,
:func:`anchor_tiles`), bounded together by
``SCRATCH_BYTES`` (groups are processed in chunks that fit; a group larger than the bound on its own is
processed alone); a pairwise group holds its error buffer for all its tokens, ``|V*_g| *
roundup16(T_g)`` elements, within the same bound. Plus ``O(N)`` per-token vectors, within ``TOKEN_BYTES`` (512) per completion
token (validation included; ``benchmarks/gpu_suite.py`` measures the peak of one call against
``SCRATCH_BYTES + TOKEN_BYTES * N``). No ``[N, |V|]`` or ``[N, N]`` tensor is formed.

Determinism: every output element is written by exactly one program, with a fixed reduction order
(no atomics), so the same inputs give the same bits.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from ..core.rules import interpreting

# The interpreter's bf16 tl.dot is wrong: bf16 tiles are upcast there (a compile-time constant, like
# Triton's own choice between interpreter and compiler, which is made when this module is imported).
_INTERPRET = tl.constexpr(interpreting())
# Precision of the products of fp16 inputs with float32 tiles (q = h M^T with a float32 M; the float32 error
# buffer in G^T H and G G+^T): TF32 on a GPU, whose 10-bit mantissa is fp16's but whose range is float32's.
_Q_PRECISION = tl.constexpr("ieee" if interpreting() else "tf32")
# Precision of every product of two float32 tiles (:func:`_dot`): IEEE float32, no TF32 (the float32 row of
# SCORE_TOLERANCE assumes it). The GPU suite's floors for float32 inputs use the matmul rate at this precision.
F32_PRECISION = tl.constexpr("ieee")


class Segment(NamedTuple):
    """One row of the packed segment table (int64 ``[n_seg, SEG_WIDTH]``, columns ``SEG_*`` in this order).

    Positions count tokens in the plan's order (the order of the per-token arrays ``ROW_H``, ``IDS``...).
    """

    vs0: int  # first entry of the segment's V* in VS
    nv: int  # |V*|
    row0: int  # first token of the error rows (the buffer's rows, and the rows of M)
    nerr: int  # error rows (of the group); the buffer is [nv, roundup16(nerr)], transposed
    npos: int  # positive rows: the first npos error rows (rows of M, partners of the pairwise sum)
    gp: int  # offset of the segment's error buffer in GP (a multiple of 16)
    m: int  # offset of the segment's M [nv, D] in M (a response's segment: of its N_i in the float32 N buffer)
    sc0: int  # first scored token (a positive response's segment: the first slot of its anchor partial sums)
    nsc: int  # scored tokens
    group: int  # batch group: row of THR (tau, eta)
    r0: int = 0  # first of the group's positive responses in the response table (the anchor pass)
    nr: int = 0  # its positive responses
    col0: int = 0  # the buffer column of row0 (0 for a group)
# A positive response's segment (the anchor pass: its N_i by the M kernel) is its group's row with
# row0 = its first token, npos = its tokens, col0 = row0 - the group's row0, m = the offset of its N_i,
# and sc0 = its first slot of the anchor partial sums.


SEG_VS0, SEG_NV, SEG_ROW0, SEG_NERR, SEG_NPOS, SEG_GP, SEG_M, SEG_SC0, SEG_NSC, SEG_GROUP, SEG_R0, SEG_NR, SEG_COL0 = (
    tl.constexpr(i) for i in range(len(Segment._fields)))
SEG_WIDTH = tl.constexpr(len(Segment._fields))


# --------------------------------------------------------------------------------------------------
# building blocks
# --------------------------------------------------------------------------------------------------
@triton.jit
def _seg(SEG, i_s, FIELD: tl.constexpr):
    """Column ``FIELD`` of segment ``i_s`` of the segment table."""
    return tl.load(SEG + i_s * SEG_WIDTH + FIELD)


@triton.jit
def _round16(n):
    return tl.multiple_of((n + 15) // 16 * 16, 16)


@triton.jit
def _tile(n_a, n_b):
    """``(segment, a, b)`` of this program in a 1D grid of ``n_seg * n_a * n_b`` programs, ``b`` fastest and
    the segment slowest: programs that run at the same time share a segment's operands in L2 (a segment-fastest
    order interleaves every segment of the launch and evicts them). 1D, so no grid-dimension limit applies."""
    pid = tl.program_id(0).to(tl.int64)
    return pid // (n_a * n_b), pid // n_b % n_a, pid % n_b


@triton.jit
def _dot(b_a, b_b):
    """Tile product with float32 accumulation: exact IEEE products for float32 tiles (no TF32); bf16
    tiles are upcast under the interpreter."""
    if _INTERPRET and b_a.dtype == tl.bfloat16:
        return tl.dot(b_a.to(tl.float32), b_b.to(tl.float32), input_precision="ieee")
    elif b_a.dtype == tl.float32:
        return tl.dot(b_a, b_b, input_precision=F32_PRECISION)
    else:
        return tl.dot(b_a, b_b, input_precision="tf32")


@triton.jit
def _gram_tile(X, o_x, m_x, x_sk, Y, o_y, m_y, y_sk, K, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    """``[BM, BN]`` tile of ``X Y^T``: the rows of ``X`` at offsets ``o_x`` and of ``Y`` at ``o_y``, summed
    over ``K`` features (strides ``x_sk``, ``y_sk``) in steps of ``BK``. Tiles of two dtypes, or float64
    ones (validation reads the caller's tensors as they are), are multiplied in float32."""
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        m_k = o_k < K
        b_x = tl.load(X + o_x[:, None] + o_k[None, :] * x_sk, mask=m_x[:, None] & m_k[None, :], other=0.0)  # [BM, BK]
        b_y = tl.load(Y + o_y[:, None] + o_k[None, :] * y_sk, mask=m_y[:, None] & m_k[None, :], other=0.0)  # [BN, BK]
        if b_x.dtype != b_y.dtype or b_x.dtype == tl.float64:
            b_x = b_x.to(tl.float32)
            b_y = b_y.to(tl.float32)
        b_acc += _dot(b_x, tl.trans(b_y))
    return b_acc


@triton.jit
def _rows(ROW, o_t, m_t, ALIGN: tl.constexpr):
    """int64 row offsets of the tokens ``o_t`` (0 where masked)."""
    o_row = tl.load(ROW + o_t, mask=m_t, other=0)
    if ALIGN:
        o_row = tl.multiple_of(o_row, 16)
    return o_row


@triton.jit
def _scale(b_z, inv_t):
    """``z * (1/T)`` rounded to float32 before any later use: the compiler would fuse the product into an FMA
    with the subtraction that follows (no rounding in between), and ``log Z`` computed outside the kernels
    (torch, from logits) rounds it, so a certain token (one-token vocabulary) would get an error of 1e-8,
    not 0. The interpreter (numpy) never fuses."""
    if _INTERPRET:
        return b_z * inv_t
    else:
        return libdevice.mul_rn(b_z, inv_t)


@triton.jit
def _expm1(b_x):
    """``exp(x) - 1`` (float32) without the cancellation of ``exp(x) - 1`` near 0: Horner's form of the Taylor
    series to x^8 for ``|x| < 0.1`` (truncation below 3e-13 relative), ``exp(x) - 1`` beyond (no cancellation
    there). Plain tl ops: ``libdevice.expm1`` does not run in the interpreter."""
    b_s = tl.where(tl.abs(b_x) < 0.1, b_x, 0.0)
    b_t = 1.0 + b_s * 0.125
    b_t = 1.0 + b_s * (1.0 / 7.0) * b_t
    b_t = 1.0 + b_s * (1.0 / 6.0) * b_t
    b_t = 1.0 + b_s * 0.2 * b_t
    b_t = 1.0 + b_s * 0.25 * b_t
    b_t = 1.0 + b_s * (1.0 / 3.0) * b_t
    b_t = 1.0 + b_s * 0.5 * b_t
    return tl.where(tl.abs(b_x) < 0.1, b_s * b_t, tl.exp(b_x) - 1.0)


@triton.jit
def _log1p(b_u):
    """``log(1 + u)`` (float32) for ``u >= 0`` without losing a small ``u``: Horner's form of the series to u^9
    for ``u < 0.1`` (truncation below 1e-10 relative), ``log(1 + u)`` beyond. Plain tl ops, as :func:`_expm1`."""
    b_s = tl.where(b_u < 0.1, b_u, 0.0)
    b_t = 0.125 - b_s * (1.0 / 9.0)
    b_t = (1.0 / 7.0) - b_s * b_t
    b_t = (1.0 / 6.0) - b_s * b_t
    b_t = 0.2 - b_s * b_t
    b_t = 0.25 - b_s * b_t
    b_t = (1.0 / 3.0) - b_s * b_t
    b_t = 0.5 - b_s * b_t
    b_t = 1.0 - b_s * b_t
    return tl.where(b_u < 0.1, b_s * b_t, tl.log(1.0 + b_u))


@triton.jit
def _sampled_logprob(b_others, b_zy):
    """``l = -softplus(L - z_y)`` from the log-sum-exp ``L`` of the other tokens' scaled logits: the sampled
    token's log-prob with the relative precision of its error ``-expm1(l)`` (nthr_kernels.core.rules.sampled_logprob)."""
    b_x = b_others - b_zy
    return -(tl.maximum(b_x, 0.0) + _log1p(tl.exp(-tl.abs(b_x))))


@triton.jit
def _errors(b_z, b_id, b_logz, b_vid, m_tv, inv_t, b_lp):
    """Prediction errors ``1[v == y_t] - exp(z / T - log Z_t)`` of a ``[BT, BV]`` logits tile (0 where masked),
    with ``log Z_t = z_y / T - l_t`` (``b_lp``: the old log-probs, or the sampled token's log-prob from the
    other tokens' log-sum-exp, :func:`_sampled_logprob`). The sampled token's own probability is ``exp(l_t)``,
    its definition, not ``exp(z_y / T - log Z_t)`` with ``z_y`` summed in another order than ``log Z_t``'s,
    which gave a certain token (``l_t = 0``) an error of about 1e-7 instead of 0; and its error
    ``1 - exp(l_t)`` is ``-expm1(l_t)``: in float32, ``1 - exp(l_t)`` of a near-certain token loses the digits
    of its small error to cancellation (relative score errors of 1.5e-3 with the interpreter's exp)."""
    b_hit = b_id[:, None] == b_vid[None, :]
    b_p = tl.exp(_scale(b_z, inv_t) - b_logz[:, None])
    return tl.where(m_tv, tl.where(b_hit, -_expm1(b_lp)[:, None], -b_p), 0.0)


@triton.jit
def _select(b_s, o_t, m_t, SEG, i_s, THR, ADV, OUT_ADV, OUT_SEL):
    """The threshold and rescale of negative tokens: ``selected = s > tau``; the advantage (``ADV``) is
    multiplied by eta where selected. (Inputs and outputs apart: the autotuner may run a launch repeatedly.)"""
    i_g = _seg(SEG, i_s, SEG_GROUP)
    tau = tl.load(THR + 2 * i_g)
    eta = tl.load(THR + 2 * i_g + 1)
    b_sel = b_s > tau
    b_adv = tl.load(ADV + o_t, mask=m_t, other=0.0)
    tl.store(OUT_ADV + o_t, tl.where(b_sel, b_adv * eta, b_adv), mask=m_t)
    tl.store(OUT_SEL + o_t, b_sel.to(tl.int8), mask=m_t)


# --------------------------------------------------------------------------------------------------
# kernels
# --------------------------------------------------------------------------------------------------
@triton.jit
def _zy_kernel(
    # data pointers
    H, ROW_H, W, IDS, LP, OUT,
    # shapes
    n, D,
    # strides
    h_sd, w_sv, w_sd,
    # constants
    inv_t,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Old-log-prob shortcut: ``log Z_t = (w_{y_t} . h_t) / T - l_t``, ``LP`` the old log-probs in plan order
    (float32; the errors read the same vector)."""
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    m_t = o_t < n
    o_h = _rows(ROW_H, o_t, m_t, False)
    b_id = tl.load(IDS + o_t, mask=m_t, other=0)
    b_acc = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        m_tk = m_t[:, None] & (o_k < D)[None, :]
        b_h = tl.load(H + o_h[:, None] + o_k[None, :] * h_sd, mask=m_tk, other=0.0)  # [BT, BK]
        b_w = tl.load(W + b_id[:, None] * w_sv + o_k[None, :] * w_sd, mask=m_tk, other=0.0)  # [BT, BK]
        b_acc += tl.sum(b_h.to(tl.float32) * b_w.to(tl.float32), axis=1)
    b_lp = tl.load(LP + o_t, mask=m_t, other=0.0)
    tl.store(OUT + o_t, b_acc * inv_t - b_lp, mask=m_t)


@triton.jit
def _lse_kernel(
    # data pointers
    H, ROW_H, W, IDS, OUT, OUT_LP,
    # shapes
    n, V, D,
    # strides
    h_sd, w_sv, w_sd,
    # constants
    inv_t,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    """The normaliser of a block of tokens without old log-probs: an online logsumexp of ``W h / T`` over the
    whole vocabulary but the sampled token, whose logit ``z_y`` comes from the same tile; from them the sampled
    token's log-prob ``l = -softplus(L - z_y)`` (``OUT_LP``, :func:`_sampled_logprob`) and ``log Z = z_y - l``
    (``OUT``). The errors take the sampled token's error from ``l`` (:func:`_errors`): as ``1 - exp(z_y - log Z)``
    a float32 ``log Z`` (one step of ``|log Z| 2^-24``) would swamp a near-certain token's error."""
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    m_t = o_t < n
    o_h = _rows(ROW_H, o_t, m_t, False)
    b_id = tl.load(IDS + o_t, mask=m_t, other=-1)
    b_max = tl.full([BT], -float("inf"), dtype=tl.float32)
    b_sum = tl.zeros([BT], dtype=tl.float32)
    b_zy = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        o_v = v0 + tl.arange(0, BV).to(tl.int64)  # [BV]
        m_v = o_v < V
        b_z = _gram_tile(H, o_h, m_t, h_sd, W, o_v * w_sv, m_v, w_sd, D, BT, BV, BK)  # [BT, BV]
        b_z = tl.where(m_v[None, :], _scale(b_z, inv_t), -float("inf"))  # z / T rounded as _errors rounds it
        b_own = o_v[None, :] == b_id[:, None]
        b_zy += tl.sum(tl.where(b_own, b_z, 0.0), axis=1)  # one tile holds y_t
        b_z = tl.where(b_own, -float("inf"), b_z)  # the sampled token leaves the sum
        b_new = tl.maximum(b_max, tl.max(b_z, axis=1))
        b_shift = tl.where(b_new == -float("inf"), 0.0, b_new)  # no other token yet (|V| = 1)
        b_sum = b_sum * tl.exp(b_max - b_shift) + tl.sum(tl.exp(b_z - b_shift[:, None]), axis=1)
        b_max = b_new
    b_lp = _sampled_logprob(b_max + tl.log(b_sum), b_zy)
    tl.store(OUT + o_t, b_zy - b_lp, mask=m_t)
    tl.store(OUT_LP + o_t, b_lp, mask=m_t)


@triton.heuristics({"FROM_LOGITS": lambda args: args["LG"] is not None})
@triton.jit
def _err_kernel(
    # data pointers
    H, ROW_H, W, LG, ROW_LG, IDS, LOGZ, LP, VS, SEG, GP,
    # shapes
    D, max_rows, max_nv,
    # strides
    h_sd, w_sv, w_sd, lg_sv,
    # constants
    inv_t,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, FROM_LOGITS: tl.constexpr, ALIGN: tl.constexpr,
):
    """Prediction errors of a segment's error rows on its ``V*``, stored transposed in the segment's
    buffer (``[|V*|, ld]``, ``ld`` = rows rounded up to 16) for the M GEMM and the pairwise kernel.
    ``LP``: the tokens' sampled log-probs, in plan order (see :func:`_errors`)."""
    i_s, i_t, i_v = _tile(tl.cdiv(max_rows, BT), tl.cdiv(max_nv, BV))  # V* tiles of a row block share its H rows
    n_err = _seg(SEG, i_s, SEG_NERR)
    n_v = _seg(SEG, i_s, SEG_NV)
    if (i_t * BT < n_err) & (i_v * BV < n_v):
        ld = _round16(n_err)
        o_r = i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT] rows of the buffer
        m_r = o_r < n_err
        o_t = _seg(SEG, i_s, SEG_ROW0) + o_r  # [BT] tokens
        o_v = i_v * BV + tl.arange(0, BV).to(tl.int64)  # [BV] positions in V*
        m_v = o_v < n_v
        m_tv = m_r[:, None] & m_v[None, :]
        b_vid = tl.load(VS + _seg(SEG, i_s, SEG_VS0) + o_v, mask=m_v, other=0)  # [BV] token ids
        if FROM_LOGITS:
            o_lg = _rows(ROW_LG, o_t, m_r, False)
            b_z = tl.load(LG + o_lg[:, None] + b_vid[None, :] * lg_sv, mask=m_tv, other=0.0).to(tl.float32)
        else:
            o_h = _rows(ROW_H, o_t, m_r, ALIGN)
            b_z = _gram_tile(H, o_h, m_r, h_sd, W, b_vid * w_sv, m_v, w_sd, D, BT, BV, BK)  # [BT, BV]
        b_logz = tl.load(LOGZ + o_t, mask=m_r, other=0.0)
        b_id = tl.load(IDS + o_t, mask=m_r, other=-1)
        b_lp = tl.load(LP + o_t, mask=m_r, other=0.0)
        b_g = _errors(b_z, b_id, b_logz, b_vid, m_tv, inv_t, b_lp)  # [BT, BV]
        o_gp = tl.multiple_of(_seg(SEG, i_s, SEG_GP), 16)
        # the columns past the error rows up to ld get zeros (b_g is 0 there): the M kernel reads whole rows
        tl.store(GP + o_gp + o_v[None, :] * ld + o_r[:, None], b_g.to(GP.dtype.element_ty), mask=(o_r < ld)[:, None] & m_v[None, :])


@triton.heuristics({"G_F32": lambda args: args["GP"].dtype == torch.float32 and args["H"].dtype != torch.float32})
@triton.jit
def _m_kernel(
    # data pointers
    GP, H, ROW_H, SEG, M,
    # shapes
    D, max_nv,
    # strides
    h_sd,
    # constants
    BV: tl.constexpr, BD: tl.constexpr, BU: tl.constexpr, G_F32: tl.constexpr, ALIGN: tl.constexpr,
):
    """``G^T H`` per segment, ``[|V*|, D]`` at offset ``m`` of ``M`` (float32 accumulation): an NN GEMM of
    the transposed errors ``[|V*|, ld]`` in the segment's buffer and the same tokens' rows of ``H``, over
    the segment's ``npos`` rows from ``row0``, which sit in buffer columns ``col0 ..`` (a group: ``M``
    from its positive rows, ``col0 = 0``; a positive response: its ``N_i``, ``col0`` its first row's column).

    The K-loop starts at the column rounded down to 16, so every load of the buffer is aligned and masked
    only by the row end ``ld`` (a multiple of 16; the error kernel zeroes the columns past the error rows):
    the loads vectorise. Columns outside the segment's rows meet masked (zero) rows of ``H``.
    G_F32: float32 errors with fp16 ``H`` (:func:`err_dtype`), multiplied at ``_Q_PRECISION``.
    """
    i_s, i_v, i_d = _tile(tl.cdiv(max_nv, BV), tl.cdiv(D, BD))  # the D tiles of a V* block share its error rows
    n_v = _seg(SEG, i_s, SEG_NV)
    if i_v * BV < n_v:
        ld = _round16(_seg(SEG, i_s, SEG_NERR))
        row0 = _seg(SEG, i_s, SEG_ROW0)
        c0 = _seg(SEG, i_s, SEG_COL0)
        n_u = _seg(SEG, i_s, SEG_NPOS)
        c_lo = tl.multiple_of(c0 // 16 * 16, 16)
        o_gp = tl.multiple_of(_seg(SEG, i_s, SEG_GP), 16)
        o_v = i_v * BV + tl.arange(0, BV).to(tl.int64)  # [BV]
        m_v = o_v < n_v
        o_d = i_d * BD + tl.arange(0, BD).to(tl.int64)  # [BD]
        m_d = o_d < D
        b_acc = tl.zeros([BV, BD], dtype=tl.float32)
        for k0 in range(0, c0 - c_lo + n_u, BU):
            o_c = c_lo + k0 + tl.arange(0, BU).to(tl.int64)  # [BU] buffer columns
            m_u = (o_c >= c0) & (o_c < c0 + n_u)  # the segment's rows
            b_g = tl.load(GP + o_gp + o_v[:, None] * ld + o_c[None, :], mask=m_v[:, None] & (o_c < ld)[None, :], other=0.0)  # [BV, BU]
            b_g = tl.where(m_u[None, :], b_g, 0.0)  # other rows' errors may be non-finite: 0 * inf is NaN
            o_h = _rows(ROW_H, row0 + (o_c - c0), m_u, ALIGN)
            b_h = tl.load(H + o_h[:, None] + o_d[None, :] * h_sd, mask=m_u[:, None] & m_d[None, :], other=0.0)  # [BU, BD]
            if G_F32:
                b_acc += tl.dot(b_g, b_h.to(tl.float32), input_precision=_Q_PRECISION)
            else:
                b_acc += _dot(b_g, b_h)
        o_m = _seg(SEG, i_s, SEG_M)
        if ALIGN:
            o_m = tl.multiple_of(o_m, 16)
        tl.store(M + o_m + o_v[:, None] * D + o_d[None, :], b_acc.to(M.dtype.element_ty), mask=m_v[:, None] & m_d[None, :])


@triton.jit
def _anchor_kernel(
    # data pointers
    NBUF, SEG, RSEG, M, PART,
    # shapes
    D, max_nv,
    # constants
    BV: tl.constexpr, BD: tl.constexpr, ALIGN: tl.constexpr,
):
    """The anchor pass of a group (segment of ``SEG``): ``M = sum_i N_i`` over its positive responses (rows
    ``r0 .. r0 + nr`` of ``RSEG``, whose ``N_i`` the M kernel wrote in float32 at offset ``m`` of ``NBUF``),
    in response order, stored in ``M``'s dtype; then per response the tile's parts of ``<M, N_i>`` (the sum of
    the response's scores, docs/NTHR.md) and ``<N_i, N_i>`` (its own part, removed for ``anchor="others"``),
    with the float32 ``M``, into ``PART``: each response has :func:`anchor_tiles` slots of 2 from slot
    ``sc0`` of its row of ``RSEG``, one per tile, each written by one program (the caller sums them in a
    fixed order)."""
    n_tv, n_td = tl.cdiv(max_nv, BV), tl.cdiv(D, BD)
    i_s, i_v, i_d = _tile(n_tv, n_td)
    n_v = _seg(SEG, i_s, SEG_NV)
    if i_v * BV < n_v:
        o_v = i_v * BV + tl.arange(0, BV).to(tl.int64)  # [BV]
        o_d = i_d * BD + tl.arange(0, BD).to(tl.int64)  # [BD]
        m_vd = (o_v < n_v)[:, None] & (o_d < D)[None, :]
        o_vd = o_v[:, None] * D + o_d[None, :]  # [BV, BD] offsets in a [|V*|, D] matrix
        r0 = _seg(SEG, i_s, SEG_R0)
        r1 = r0 + _seg(SEG, i_s, SEG_NR)
        b_m = tl.zeros([BV, BD], dtype=tl.float32)
        for i_r in range(r0, r1):
            b_m += tl.load(NBUF + _seg(RSEG, i_r, SEG_M) + o_vd, mask=m_vd, other=0.0)
        o_m = _seg(SEG, i_s, SEG_M)
        if ALIGN:
            o_m = tl.multiple_of(o_m, 16)
        tl.store(M + o_m + o_vd, b_m.to(M.dtype.element_ty), mask=m_vd)
        for i_r in range(r0, r1):
            b_n = tl.load(NBUF + _seg(RSEG, i_r, SEG_M) + o_vd, mask=m_vd, other=0.0)
            o_part = (_seg(RSEG, i_r, SEG_SC0) + i_v * n_td + i_d) * 2  # the response's own tiles
            tl.store(PART + o_part, tl.sum(tl.sum(b_m * b_n, axis=1), axis=0))
            tl.store(PART + o_part + 1, tl.sum(tl.sum(b_n * b_n, axis=1), axis=0))


@triton.heuristics({
    "FROM_LOGITS": lambda args: args["LG"] is not None,
    "FROM_BUFFER": lambda args: args["GP"] is not None,
    "FUSE_SELECT": lambda args: args["THR"] is not None,
    "M_F32": lambda args: args["M"].dtype == torch.float32 and args["H"].dtype != torch.float32,
})
@triton.jit
def _score_kernel(
    # data pointers
    H, ROW_H, W, LG, ROW_LG, IDS, LOGZ, LP, VS, SEG, M, GP, THR, ADV, OUT_S, OUT_ADV, OUT_SEL,
    # shapes
    D, max_sc,
    # strides
    h_sd, w_sv, w_sd, lg_sv,
    # constants
    inv_t,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    FROM_LOGITS: tl.constexpr, FROM_BUFFER: tl.constexpr, FUSE_SELECT: tl.constexpr,
    M_F32: tl.constexpr, ALIGN: tl.constexpr,
):
    """``s_t = sum_v g_t[v] (M h_t)[v]`` for a block of a segment's scored tokens.

    ``g`` comes from ``z = h W*^T`` (in the same K-loop as ``q = h M^T``), from logits rows
    (FROM_LOGITS), or from the segment's transposed error buffer (FROM_BUFFER; the scored tokens are
    then error rows of the segment), which saves recomputing the logits of positive tokens.
    FUSE_SELECT applies the threshold and the rescale of the advantages too.
    """
    i_s, _, i_t = _tile(1, tl.cdiv(max_sc, BT))  # a segment's token blocks together: they share its M / errors
    n_sc = _seg(SEG, i_s, SEG_NSC)
    if i_t * BT < n_sc:
        o_t = _seg(SEG, i_s, SEG_SC0) + i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT] tokens
        m_t = i_t * BT + tl.arange(0, BT) < n_sc
        o_h = _rows(ROW_H, o_t, m_t, ALIGN)
        if FROM_BUFFER:
            o_r = o_t - _seg(SEG, i_s, SEG_ROW0)  # [BT] rows of the error buffer
            ld = _round16(_seg(SEG, i_s, SEG_NERR))
            o_gp = tl.multiple_of(_seg(SEG, i_s, SEG_GP), 16)
        else:
            b_id = tl.load(IDS + o_t, mask=m_t, other=-1)
            b_logz = tl.load(LOGZ + o_t, mask=m_t, other=0.0)
            b_lp = tl.load(LP + o_t, mask=m_t, other=0.0)
            vs0 = _seg(SEG, i_s, SEG_VS0)
        if FROM_LOGITS:
            o_lg = _rows(ROW_LG, o_t, m_t, False)
        n_v = _seg(SEG, i_s, SEG_NV)
        o_m = _seg(SEG, i_s, SEG_M)
        if ALIGN:
            o_m = tl.multiple_of(o_m, 16)
        b_s = tl.zeros([BT], dtype=tl.float32)
        for v0 in range(0, n_v, BV):
            o_v = v0 + tl.arange(0, BV).to(tl.int64)  # [BV] positions in V*
            m_v = o_v < n_v
            m_tv = m_t[:, None] & m_v[None, :]
            if not FROM_BUFFER:
                b_vid = tl.load(VS + vs0 + o_v, mask=m_v, other=0)  # [BV] token ids
            b_q = tl.zeros([BT, BV], dtype=tl.float32)
            b_z = tl.zeros([BT, BV], dtype=tl.float32)
            for k0 in range(0, D, BK):
                o_k = k0 + tl.arange(0, BK).to(tl.int64)
                m_k = o_k < D
                b_h = tl.load(H + o_h[:, None] + o_k[None, :] * h_sd, mask=m_t[:, None] & m_k[None, :], other=0.0)  # [BT, BK]
                b_mt = tl.load(M + o_m + o_v[:, None] * D + o_k[None, :], mask=m_v[:, None] & m_k[None, :], other=0.0)  # [BV, BK]
                if M_F32:  # fp16 inputs keep M in float32
                    b_q += tl.dot(b_h.to(tl.float32), tl.trans(b_mt), input_precision=_Q_PRECISION)
                else:
                    b_q += _dot(b_h, tl.trans(b_mt))
                if not FROM_BUFFER and not FROM_LOGITS:
                    b_w = tl.load(W + b_vid[:, None] * w_sv + o_k[None, :] * w_sd, mask=m_v[:, None] & m_k[None, :], other=0.0)  # [BV, BK]
                    b_z += _dot(b_h, tl.trans(b_w))
            if FROM_BUFFER:
                b_g = tl.load(GP + o_gp + o_v[None, :] * ld + o_r[:, None], mask=m_tv, other=0.0).to(tl.float32)  # [BT, BV]
            else:
                if FROM_LOGITS:
                    b_z = tl.load(LG + o_lg[:, None] + b_vid[None, :] * lg_sv, mask=m_tv, other=0.0).to(tl.float32)
                b_g = _errors(b_z, b_id, b_logz, b_vid, m_tv, inv_t, b_lp)  # [BT, BV]
            b_s += tl.sum(b_g * b_q, axis=1)
        tl.store(OUT_S + o_t, b_s, mask=m_t)
        if FUSE_SELECT:
            _select(b_s, o_t, m_t, SEG, i_s, THR, ADV, OUT_ADV, OUT_SEL)


@triton.heuristics({
    "SELF_ONLY": lambda args: args["RESP"] is not None,
    "FUSE_SELECT": lambda args: args["THR"] is not None,
    "G_F32": lambda args: args["GP"].dtype == torch.float32 and args["H"].dtype != torch.float32,
})
@triton.jit
def _seg_pair_kernel(
    # data pointers
    H, ROW_H, GP, SEG, RESP, THR, ADV, OUT_S, OUT_ADV, OUT_SEL,
    # shapes
    D, max_sc,
    # strides
    h_sd,
    # constants
    BT: tl.constexpr, BU: tl.constexpr, BK: tl.constexpr,
    SELF_ONLY: tl.constexpr, FUSE_SELECT: tl.constexpr, G_F32: tl.constexpr, ALIGN: tl.constexpr,
):
    """Pairwise path of a group, flash-attention style: for a block of its scored tokens, stream the
    group's positive tokens in blocks of BU and accumulate the row sums of ``(G_t G_u^T) * (H_t H_u^T)``.

    The group's errors (every token, positive first) were written transposed, ``[|V*|, ld]``, by the
    error kernel. SELF_ONLY keeps only pairs of the same response (``RESP``: response per token), the
    own contribution that ``anchor="others"`` removes. G_F32: float32 errors with fp16 ``H`` (:func:`err_dtype`),
    multiplied at ``_Q_PRECISION``."""
    i_s, _, i_t = _tile(1, tl.cdiv(max_sc, BT))  # a segment's token blocks together: they share its M / errors
    n_sc = _seg(SEG, i_s, SEG_NSC)
    if i_t * BT < n_sc:
        o_t = _seg(SEG, i_s, SEG_SC0) + i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT] tokens
        m_t = i_t * BT + tl.arange(0, BT) < n_sc
        row0 = _seg(SEG, i_s, SEG_ROW0)
        o_r = o_t - row0  # [BT] rows of the error buffer
        ld = _round16(_seg(SEG, i_s, SEG_NERR))
        n_v = _seg(SEG, i_s, SEG_NV)
        n_pos = _seg(SEG, i_s, SEG_NPOS)
        o_gp = tl.multiple_of(_seg(SEG, i_s, SEG_GP), 16)
        o_h = _rows(ROW_H, o_t, m_t, ALIGN)
        if SELF_ONLY:
            b_resp_t = tl.load(RESP + o_t, mask=m_t, other=-1)
        b_s = tl.zeros([BT], dtype=tl.float32)
        for u0 in range(0, n_pos, BU):
            o_u = u0 + tl.arange(0, BU).to(tl.int64)  # [BU] positive rows
            m_u = o_u < n_pos
            o_hu = _rows(ROW_H, row0 + o_u, m_u, ALIGN)
            b_gg = tl.zeros([BT, BU], dtype=tl.float32)  # G_t G_u^T
            for v0 in range(0, n_v, BK):
                o_v = v0 + tl.arange(0, BK).to(tl.int64)
                m_v = o_v < n_v
                b_gt = tl.load(GP + o_gp + o_v[None, :] * ld + o_r[:, None], mask=m_t[:, None] & m_v[None, :], other=0.0)  # [BT, BK]
                b_gu = tl.load(GP + o_gp + o_v[:, None] * ld + o_u[None, :], mask=m_v[:, None] & m_u[None, :], other=0.0)  # [BK, BU]
                if G_F32:
                    b_gg += tl.dot(b_gt, b_gu, input_precision=_Q_PRECISION)
                else:
                    b_gg += _dot(b_gt, b_gu)
            b_hh = _gram_tile(H, o_h, m_t, h_sd, H, o_hu, m_u, h_sd, D, BT, BU, BK)  # [BT, BU] H_t H_u^T
            b_p = b_gg * b_hh
            if SELF_ONLY:
                b_resp_u = tl.load(RESP + row0 + o_u, mask=m_u, other=-2)
                b_p = tl.where(b_resp_t[:, None] == b_resp_u[None, :], b_p, 0.0)
            b_s += tl.sum(b_p, axis=1)
        tl.store(OUT_S + o_t, b_s, mask=m_t)
        if FUSE_SELECT:
            _select(b_s, o_t, m_t, SEG, i_s, THR, ADV, OUT_ADV, OUT_SEL)


@triton.jit
def _pair_kernel(
    # data pointers
    HP, HN, EP, EN, OUT,
    # shapes
    TP, TN, V, D,
    # strides
    hp_s0, hp_sd, hn_s0, hn_sd, ep_s0, ep_sv, en_s0, en_sv,
    # constants
    BT: tl.constexpr, BU: tl.constexpr, BK: tl.constexpr,
):
    """Pairwise scores from dense errors: for a block of BT negative tokens, stream the positive tokens
    in blocks of BU and accumulate the row sums of ``(E_n E_p^T) * (H_n H_p^T)``."""
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    m_t = o_t < TN
    b_s = tl.zeros([BT], dtype=tl.float32)
    for u0 in range(0, TP, BU):
        o_u = u0 + tl.arange(0, BU).to(tl.int64)  # [BU]
        m_u = o_u < TP
        b_ee = _gram_tile(EN, o_t * en_s0, m_t, en_sv, EP, o_u * ep_s0, m_u, ep_sv, V, BT, BU, BK)  # [BT, BU]
        b_hh = _gram_tile(HN, o_t * hn_s0, m_t, hn_sd, HP, o_u * hp_s0, m_u, hp_sd, D, BT, BU, BK)  # [BT, BU]
        b_s += tl.sum(b_ee * b_hh, axis=1)
    tl.store(OUT + o_t, b_s, mask=m_t)


@triton.jit
def _span_sum_kernel(
    # data pointers
    X, START, N, OUT,
    # strides
    x_s,
    # constants
    BS: tl.constexpr,
):
    """``OUT[i] = sum_j X[(START[i] + j) * x_s]`` over ``j < N[i]``, in float64, for span ``i`` (this program):
    each span summed on its own, in a fixed order, so a value in one span (inf, NaN, or a large magnitude)
    cannot reach another's sum, as it would through a running total."""
    i_s = tl.program_id(0).to(tl.int64)
    start = tl.load(START + i_s)
    n = tl.load(N + i_s)
    b_acc = tl.zeros([BS], dtype=tl.float64)
    for j0 in range(0, n, BS):
        o_j = j0 + tl.arange(0, BS).to(tl.int64)
        b_acc += tl.load(X + (start + o_j) * x_s, mask=o_j < n, other=0.0).to(tl.float64)
    tl.store(OUT + i_s, tl.sum(b_acc, axis=0))


@triton.heuristics({"GATHER": lambda args: args["ROW"] is not None, "MASKED": lambda args: args["KEEP"] is not None})
@triton.jit
def _norm_kernel(
    # data pointers
    X, ROW, KEEP, OUT,
    # shapes
    n, D,
    # strides
    x_s0, x_sd,
    # constants
    BT: tl.constexpr, BK: tl.constexpr, GATHER: tl.constexpr, MASKED: tl.constexpr,
):
    """Largest squared Euclidean norm (float32) of a block of rows of ``X`` into ``OUT[block]``: the rows at
    the offsets ``ROW`` (GATHER) or rows ``0 .. n`` (stride ``x_s0``), those where ``KEEP`` is nonzero
    (MASKED). A row holding NaN counts as ``inf``, so the caller's finiteness check sees it (a maximum
    would skip NaN)."""
    i_t = tl.program_id(0).to(tl.int64)
    o_t = i_t * BT + tl.arange(0, BT).to(tl.int64)  # [BT]
    m_t = o_t < n
    if MASKED:
        m_t = m_t & (tl.load(KEEP + o_t, mask=m_t, other=0) != 0)
    if GATHER:
        o_x = tl.load(ROW + o_t, mask=m_t, other=0)
    else:
        o_x = o_t * x_s0
    b_acc = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        b_x = tl.load(X + o_x[:, None] + o_k[None, :] * x_sd, mask=m_t[:, None] & (o_k < D)[None, :], other=0.0).to(tl.float32)
        b_acc += tl.sum(b_x * b_x, axis=1)
    b_acc = tl.where(b_acc == b_acc, b_acc, float("inf"))
    tl.store(OUT + i_t, tl.max(tl.where(m_t, b_acc, 0.0), axis=0))


@triton.jit
def _implied_kernel(
    # data pointers
    H, ROW_H, W, IDS, DK, LO, CNT, PERM, OUT,
    # shapes
    k, D, vocab,
    # strides
    h_sd, w_sv, w_sd,
    # constants
    temperature,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
):
    """The ``old_logprobs`` check's log-sum-exp for a block of ``BT`` sampled tokens (``docs/NTHR.md``):
    ``logsumexp_{v in V*} (w_v - w_y) . h / T`` over each token's group's ``V*``, the ``CNT`` sorted keys
    ``group * vocab + id`` from ``LO`` in ``DK``. ``PERM`` lists the sampled tokens in group order, so a
    block's groups are neighbours in ``DK``: the block reads the keys from its first token's ``LO`` (rounded
    down to a multiple of ``BV``) to its last token's end once, as ``[BT, BV]`` tiles of ``h W^T`` (one
    weight tile for every token of the block, not one per token), and masks each token's row to its own
    range (float32, online over the tiles). Results go to ``OUT`` at the tokens' own positions."""
    i_b = tl.program_id(0).to(tl.int64)
    o_j = i_b * BT + tl.arange(0, BT).to(tl.int64)  # [BT] slots in group order
    m_t = o_j < k
    o_t = tl.load(PERM + o_j, mask=m_t, other=0)  # [BT] sampled tokens
    o_h = tl.load(ROW_H + o_t, mask=m_t, other=0)
    b_y = tl.load(IDS + o_t, mask=m_t, other=0)
    b_lo = tl.load(LO + o_t, mask=m_t, other=0)
    b_hi = b_lo + tl.load(CNT + o_t, mask=m_t, other=0)
    lo = tl.load(LO + tl.load(PERM + i_b * BT))  # the block's first token is a real one: its range starts first
    hi = tl.max(tl.where(m_t, b_hi, lo), axis=0)
    b_zy = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, D, BK):
        o_k = k0 + tl.arange(0, BK).to(tl.int64)
        m_tk = m_t[:, None] & (o_k < D)[None, :]
        b_h = tl.load(H + o_h[:, None] + o_k[None, :] * h_sd, mask=m_tk, other=0.0).to(tl.float32)
        b_w = tl.load(W + b_y[:, None] * w_sv + o_k[None, :] * w_sd, mask=m_tk, other=0.0).to(tl.float32)
        b_zy += tl.sum(b_h * b_w, axis=1)
    b_max = tl.full([BT], -float("inf"), tl.float32)
    b_sum = tl.zeros([BT], dtype=tl.float32)
    # tiles at multiples of BV in DK, not from the block's first LO: a token's sum runs over the same tiles
    # whichever tokens share its block (ORDER_BLOCKS)
    for v0 in range(lo // BV * BV, hi, BV):
        o_v = v0 + tl.arange(0, BV).to(tl.int64)  # [BV] positions in DK
        m_v = o_v < hi
        o_w = (tl.load(DK + o_v, mask=m_v, other=0) % vocab) * w_sv
        b_z = _gram_tile(H, o_h, m_t, h_sd, W, o_w, m_v, w_sd, D, BT, BV, BK)  # [BT, BV]
        m_tv = m_t[:, None] & (o_v[None, :] >= b_lo[:, None]) & (o_v[None, :] < b_hi[:, None])
        b_z = tl.where(m_tv, (b_z - b_zy[:, None]) / temperature, -float("inf"))
        b_new = tl.maximum(b_max, tl.max(b_z, axis=1))
        b_ref = tl.where(b_new == -float("inf"), 0.0, b_new)  # a row with no key in this tile yet
        b_sum = b_sum * tl.exp(b_max - b_ref) + tl.sum(tl.exp(b_z - b_ref[:, None]), axis=1)
        b_max = b_new
    tl.store(OUT + o_t, b_max + tl.log(b_sum), mask=m_t)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def m_dtype(wd: torch.dtype) -> torch.dtype:
    """dtype of ``M``: fp16 has too little range (sums of g h^T over thousands of tokens): float32."""
    return torch.bfloat16 if wd == torch.bfloat16 else torch.float32


def err_dtype(wd: torch.dtype) -> torch.dtype:
    """dtype of the error buffer: the input dtype, but float32 for fp16, whose range is too small for the
    prediction errors: a near-certain token's error (most sampled tokens have errors far below 1e-6) is
    subnormal in fp16 below 6.1e-5 (relative precision lost) and 0 below 3e-8, so groups of near-certain
    tokens got scores off by up to 100 % (tests/test_triton.py,
    ``test_fp16_near_certain_tokens_keep_their_small_errors``). The tiles are multiplied at
    ``_Q_PRECISION`` (TF32 on a GPU: fp16's 10-bit mantissa, float32's range)."""
    return torch.float32 if wd == torch.float16 else wd


def product_precision(wd: torch.dtype) -> Optional[str]:
    """How the kernels multiply tiles of the work dtype ``wd`` (:func:`work_dtype`): float32 tiles at
    :data:`F32_PRECISION` (Triton's ``input_precision``); bf16 and fp16 tiles on the tensor cores in their
    own dtype (None). fp16 inputs also form ``q = h M^T`` with a float32 ``M``, and ``G^T H`` and the pairwise
    products from a float32 error buffer (:func:`err_dtype`), at ``_Q_PRECISION`` (TF32)."""
    return F32_PRECISION.value if wd == torch.float32 else None


def work_dtype(*tensors: Optional[torch.Tensor]) -> torch.dtype:
    """The dtype the kernels read ``tensors`` in (None ones skipped): their common dtype for fp32/bf16/fp16,
    float32 otherwise (fp64, or mixed dtypes: casting a float32 weight down to fp16 hidden states would
    turn values beyond 65504 into inf)."""
    dts = {x.dtype for x in tensors if x is not None}
    dtype = dts.pop() if len(dts) == 1 else torch.float32
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def anchor_tiles(nv: int, d: int) -> int:
    """Tiles of the anchor kernel over one group's ``[|V*|, d]`` (its one fixed tile, ``_ANCHOR_TILE``, or
    the interpreter's small one): partial-sum slots per positive response."""
    bv, bd = (_SMALL["anchor"]["BV"], _SMALL["anchor"]["BD"]) if interpreting() else _ANCHOR_TILE[:2]
    return triton.cdiv(nv, bv) * triton.cdiv(d, bd)


def round16(n: int) -> int:
    return (n + 15) // 16 * 16


def span_sums(x: torch.Tensor, start: torch.Tensor, n: torch.Tensor, stride: int = 1) -> torch.Tensor:
    """float64 ``[k]``: the sum of ``x[(start[i] + j) * stride]`` over ``j < n[i]`` for each span ``i``
    (:func:`_span_sum_kernel`: each span on its own, in a fixed order; no host synchronisation)."""
    out = torch.empty(start.numel(), dtype=torch.float64, device=x.device)
    if start.numel():
        launch("span_sum", lambda meta: (start.numel(),), torch.float32, x, start.contiguous(), n.contiguous(), out, stride)
    return out


# Autotuning (GPU only; the interpreter uses the small fixed blocks). Each entry: tuned block sizes,
# num_warps, num_stages. Keyed on the hidden size, the mode flags and (implicitly) the dtypes.
#
# The autotuner picks a config by timing, so two processes may pick different ones; the bits must not
# depend on that pick. A kernel that reduces a tile outside a tl.dot (a tl.sum or tl.max over one of its
# axes, then a running sum over the tiles) has ONE config in each table: on the GPU the order of that
# reduction follows the tile's layout over the threads, which every block size and num_warps set. On an
# H200 (2026-11-28) the score and log-sum-exp kernels gave other bits with BT=128 than with BT=64, and the
# implied-mass kernel with BT=16, 32 and 64, though BT only tiles independent rows. ORDER_BLOCKS names
# the blocks that set the tiles a running sum walks over (the interpreter's order, and the partial-sum
# slots of the anchor pass). Only the kernels whose sole sums are tl.dot's own keep several configs (err
# and m): ``acc += tl.dot(a, b)`` is one chain of MMAs on the accumulator, in K order, whatever the tile
# and the step (test_autotune_pick_does_not_change_the_bits forces each config on the GPU and compares).
ORDER_BLOCKS = {"score": ("BV",), "lse": ("BV",), "pair": ("BU",), "seg_pair": ("BU",), "anchor": ("BV", "BD"),
                "implied": ("BV", "BK"), "norm": ("BK",), "zy": ("BK",), "span_sum": ("BS",)}
MULTI_CONFIG = ("err", "m")  # the kernels with no reduction outside a tl.dot: free to autotune
# The anchor kernel reads the float32 N_i whatever the input dtype, and is bandwidth-bound: one fixed tile
# for both tables (the partial-sum slots are sized for it). BV=64, 8 warps: 3.63 ms on the first chunk of
# qwen1.5b-step on an H200, against 4.38 for 32x128 with 4 warps (gpu_stages sweep, 2026-11-27).
_ANCHOR_TILE = (64, 128, 8, 2)
_TUNE_16 = {
    "zy": (("BT", "BK"), [(32, 128, 4, 3)]),
    # the reducing kernels' one config each: score 128x128x64, 8 warps, 3 stages, the autotuner's pick on
    # qwen1.5b-step in every H200 run and the sweep's fastest (2.92 ms on its first chunk, 64x128: 4.00); lse
    # 64x256x64 and seg_pair 64x64x64 / 4 warps, its picks there (h200-2026-11-28.json, "autotune")
    "score": (("BT", "BV", "BK"), [(128, 128, 64, 8, 3)]),
    "err": (("BT", "BV", "BK"), [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)]),
    "m": (("BV", "BD", "BU"), [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]),
    "anchor": (("BV", "BD"), [_ANCHOR_TILE]),
    # validation's kernels, one fixed tile each; the gpu_stages sweep on an H200 (value_checks of the whole
    # qwen1.5b-step batch, 3.12 ms with norm 32x128 / 4 warps / 2 stages and implied 16x64x64):
    # norm 32x256 with 3 stages 2.94 ms, implied BV=128 2.51 ms (h200-2026-11-27-run3-stages.log)
    "norm": (("BT", "BK"), [(32, 256, 4, 3)]),
    "span_sum": (("BS",), [(128, 4, 1)]),
    "implied": (("BT", "BV", "BK"), [(16, 128, 64, 4, 3)]),
    "lse": (("BT", "BV", "BK"), [(64, 256, 64, 8, 3)]),
    "pair": (("BT", "BU", "BK"), [(64, 64, 64, 4, 3)]),
    "seg_pair": (("BT", "BU", "BK"), [(64, 64, 64, 4, 3)]),
}
_TUNE_32 = {
    "zy": (("BT", "BK"), [(32, 128, 4, 3)]),
    "score": (("BT", "BV", "BK"), [(64, 64, 32, 4, 2)]),
    "err": (("BT", "BV", "BK"), [(64, 32, 32, 4, 2), (64, 64, 32, 4, 2)]),
    "m": (("BV", "BD", "BU"), [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]),
    "anchor": (("BV", "BD"), [_ANCHOR_TILE]),
    "norm": (("BT", "BK"), [(32, 128, 4, 2)]),
    "implied": (("BT", "BV", "BK"), [(16, 64, 32, 4, 2)]),
    "span_sum": (("BS",), [(128, 4, 1)]),
    "lse": (("BT", "BV", "BK"), [(64, 64, 32, 4, 2)]),
    "pair": (("BT", "BU", "BK"), [(64, 32, 32, 4, 2)]),
    "seg_pair": (("BT", "BU", "BK"), [(64, 32, 32, 4, 2)]),
}
_KERNELS = {"zy": _zy_kernel, "score": _score_kernel, "err": _err_kernel, "m": _m_kernel, "anchor": _anchor_kernel,
            "lse": _lse_kernel, "pair": _pair_kernel, "seg_pair": _seg_pair_kernel, "norm": _norm_kernel,
            "implied": _implied_kernel, "span_sum": _span_sum_kernel}
_KEYS = {
    "zy": ["D"],
    "score": ["D", "FROM_LOGITS", "FROM_BUFFER", "FUSE_SELECT", "M_F32"],
    "err": ["D", "FROM_LOGITS"],
    "m": ["D", "G_F32"],
    "anchor": ["D"],
    "norm": ["D"],
    "implied": ["D"],
    "span_sum": [],
    "lse": ["D", "V"],
    "pair": ["V", "D"],
    "seg_pair": ["D", "FUSE_SELECT", "SELF_ONLY", "G_F32"],
}
# Fixed blocks under the interpreter (validation's kernels larger: fewer interpreted steps).
_SMALL = {"zy": dict(BT=16, BK=16), "m": dict(BV=16, BD=16, BU=16), "anchor": dict(BV=16, BD=16), "norm": dict(BT=64, BK=64), "implied": dict(BT=16, BV=32, BK=32), "span_sum": dict(BS=16), "pair": dict(BT=16, BU=16, BK=16), "seg_pair": dict(BT=16, BU=16, BK=16)}
_SMALL_DEFAULT = dict(BT=16, BV=16, BK=16)
_tuned_cache: dict = {}


def _tuned(name: str, wide: bool):
    """Kernel ``name`` autotuned over the table for 16-bit (``wide``) or float32 inputs, built once.
    The heuristics stay outermost, so the flags they derive from ``None`` inputs key the tuning."""
    key = (name, wide)
    if key not in _tuned_cache:
        kernel = _KERNELS[name]
        names, table = (_TUNE_16 if wide else _TUNE_32)[name]
        configs = [triton.Config(dict(zip(names, c[:-2])), num_warps=c[-2], num_stages=c[-1]) for c in table]
        if isinstance(kernel, triton.runtime.Heuristics):
            _tuned_cache[key] = triton.heuristics(kernel.values)(triton.autotune(configs=configs, key=_KEYS[name])(kernel.fn))
        else:
            _tuned_cache[key] = triton.autotune(configs=configs, key=_KEYS[name])(kernel)
    return _tuned_cache[key]


def block_range(name: str, dtype: torch.dtype, block: str) -> tuple:
    """``(smallest, largest)`` value of the block size ``block`` a launch of kernel ``name`` may use; every
    value divides the largest and is a multiple of the smallest (powers of two)."""
    if interpreting():
        sizes = [_SMALL.get(name, _SMALL_DEFAULT)[block]]
    else:
        keys, table = (_TUNE_16 if dtype != torch.float32 else _TUNE_32)[name]
        sizes = [c[keys.index(block)] for c in table]
    lo, hi = min(sizes), max(sizes)
    if any(hi % b or b % lo for b in sizes):
        raise AssertionError(f"{name}: {block} sizes {sizes} are not nested powers of two")
    return lo, hi


def launch(name: str, grid, dtype: torch.dtype, *args, **flags):
    """Launch kernel ``name``: autotuned over the table for ``dtype`` on a GPU, with the small fixed
    blocks under the interpreter. ``grid(META)`` receives the block sizes."""
    if interpreting():
        small = _SMALL.get(name, _SMALL_DEFAULT)
        _KERNELS[name][grid(small)](*args, **flags, **small)
        return
    _tuned(name, dtype != torch.float32)[grid](*args, **flags)


def row_offsets(x: torch.Tensor, tok_a: torch.Tensor, tok_b: Optional[torch.Tensor]) -> torch.Tensor:
    """int64 element offset of each token's row in ``x`` (laid out like ``token_ids``: padded
    ``[R, T, ...]`` when ``tok_b`` is given, packed ``[N, ...]`` otherwise)."""
    off = tok_a * x.stride(0)
    return (off + tok_b * x.stride(1) if tok_b is not None else off).contiguous()


class Segments(NamedTuple):
    """A segment table on the device and the same rows on the host (grids and buffer sizes)."""

    table: torch.Tensor  # int64 [n, SEG_WIDTH]
    rows: list  # [Segment]

    def max(self, field: str) -> int:
        return max((getattr(r, field) for r in self.rows), default=0)


def upload(values: list, device: torch.device) -> torch.Tensor:
    """An int64 tensor of host ``values`` on ``device``, copied asynchronously (pinned) on a GPU, so no
    host synchronisation."""
    t = torch.tensor(values, dtype=torch.int64)
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


class Kernels:
    """The token data of one batch in plan order, shared by the launches of one call.

    ``h`` with ``row_h`` (row offset per token); the logits source: ``w`` (lm_head, ``z = h W^T``) or
    ``lg`` with ``row_lg``; ``ids`` and ``log_z`` per token and ``vs`` (V* ids by segment) when errors
    are computed from logits; ``lp``: the sampled token's log-prob per token (the old log-probs, else from
    the other tokens' log-sum-exp): its own probability, :func:`_errors`; ``wd``: the dtype the kernels read.
    """

    def __init__(self, h, row_h, wd, *, w=None, lg=None, row_lg=None, ids=None, log_z=None, lp=None, vs=None,
                 inv_t=1.0):
        self.h, self.row_h, self.wd, self.inv_t = h, row_h, wd, inv_t
        self.w, self.lg, self.row_lg, self.ids, self.log_z, self.lp, self.vs = w, lg, row_lg, ids, log_z, lp, vs
        self.d = h.shape[-1]
        self.md = m_dtype(wd)
        self.ed = err_dtype(wd)
        self.w_strides = (w.stride(0), w.stride(1)) if w is not None else (0, 0)
        self.lg_sv = lg.stride(-1) if lg is not None else 0
        # hints: row offsets (stride multiples) and M rows (multiples of d) are multiples of 16 elements
        self.align = self.d % 16 == 0 and all(s % 16 == 0 for s in h.stride()[:-1])
        self.dev = h.device

    def errors(self, seg: Segments, gp: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Transposed errors of every segment's error rows (``[nv, roundup16(nerr)]`` at offset ``gp``);
        ``gp``: a buffer to write into (else one of the exact size is allocated)."""
        if gp is None:
            gp = torch.empty(max(sum(r.nv * round16(r.nerr) for r in seg.rows), 1), dtype=self.ed, device=self.dev)
        max_nv, max_rows = seg.max("nv"), seg.max("nerr")
        if max_nv and max_rows:
            launch(
                "err", lambda meta: (len(seg.rows) * triton.cdiv(max_rows, meta["BT"]) * triton.cdiv(max_nv, meta["BV"]),),
                self.wd, self.h, self.row_h, self.w, self.lg, self.row_lg, self.ids, self.log_z, self.lp, self.vs, seg.table, gp,
                self.d, max_rows, max_nv, self.h.stride(-1), *self.w_strides, self.lg_sv, self.inv_t, ALIGN=self.align,
            )
        return gp

    def build_m(self, seg: Segments, gp: torch.Tensor, resp: Optional[Segments] = None):
        """``M_k = G+_k^T H+_k`` per segment from the error buffer ``gp`` (``M`` in ``self.md``, at offsets ``m``).

        ``resp``: the segments of the positive responses (see :class:`Segment`; the groups' ``r0``/``nr``
        point into it): ``M`` is then ``sum_i N_i`` over them, ``N_i = G_i^T H_i`` (float32, by the M
        kernel), and the call also returns float64 ``[n_resp, 2]``, ``(<M, N_i>, <N_i, N_i>)`` per response
        (:func:`_anchor_kernel`'s float32 tile sums, added per response in a fixed order). Returns
        ``(m, anchors or None)``.
        """
        max_nv = seg.max("nv")
        m = torch.empty(max(sum(r.nv for r in seg.rows) * self.d, 1), dtype=self.md, device=self.dev)
        if not max_nv:
            return m, None if resp is None else torch.zeros(len(resp.rows), 2, dtype=torch.float64, device=self.dev)
        if resp is None:
            self._gemm(seg, gp, m)
            return m, None
        nbuf = torch.empty(max(sum(r.nv for r in resp.rows) * self.d, 1), dtype=torch.float32, device=self.dev)
        self._gemm(resp, gp, nbuf)
        n_slot = sum(anchor_tiles(r.nv, self.d) for r in resp.rows)
        part = torch.zeros(max(n_slot, 1) * 2, dtype=torch.float32, device=self.dev)
        launch(
            "anchor", lambda meta: (len(seg.rows) * triton.cdiv(max_nv, meta["BV"]) * triton.cdiv(self.d, meta["BD"]),),
            self.wd, nbuf, seg.table, resp.table, m, part, self.d, max_nv, ALIGN=self.align,
        )
        # each response's own slots, summed on their own (a running total would carry other groups' values)
        first = resp.table[:, int(SEG_SC0)].contiguous()
        count = torch.cat([first[1:], first.new_full((1,), n_slot)]) - first
        return m, torch.stack([span_sums(part[c:], first, count, 2) for c in (0, 1)], 1)

    def _gemm(self, seg: Segments, gp: torch.Tensor, out: torch.Tensor) -> None:
        """The M kernel over ``seg``: ``G^T H`` of each segment's rows into ``out`` at its offset ``m``."""
        max_nv = seg.max("nv")
        if max_nv:
            launch(
                "m", lambda meta: (len(seg.rows) * triton.cdiv(max_nv, meta["BV"]) * triton.cdiv(self.d, meta["BD"]),),
                self.wd, gp, self.h, self.row_h, seg.table, out, self.d, max_nv, self.h.stride(-1), ALIGN=self.align,
            )

    def scores(self, seg: Segments, m: torch.Tensor, out: torch.Tensor, gp=None, select=None):
        """Score kernel over the segments' scored tokens into ``out``: errors from ``gp`` (the buffer
        :meth:`errors` wrote; scored tokens must be error rows) or recomputed; ``select = (thr, adv, out_adv,
        out_sel)`` fuses the threshold and the rescale."""
        max_sc = seg.max("nsc")
        if max_sc == 0:
            return
        thr, adv, out_adv, out_sel = select if select is not None else (None, None, None, None)
        src = (None,) * 6 if gp is not None else (self.w, self.lg, self.row_lg, self.ids, self.log_z, self.lp)
        launch(
            "score", lambda meta: (len(seg.rows) * triton.cdiv(max_sc, meta["BT"]),),
            self.wd, self.h, self.row_h, *src, self.vs if gp is None else None, seg.table, m, gp, thr, adv, out, out_adv,
            out_sel, self.d, max_sc, self.h.stride(-1), *self.w_strides, self.lg_sv, self.inv_t, ALIGN=self.align,
        )

    def pair_scores(self, seg: Segments, gp: torch.Tensor, out: torch.Tensor, resp=None, select=None):
        """Pairwise scores of the segments' scored tokens from the error buffer (every token of the group,
        positive first); ``resp`` (response per token) keeps only pairs within a response; ``select`` as
        in :meth:`scores`."""
        max_sc = seg.max("nsc")
        if max_sc == 0:
            return
        thr, adv, out_adv, out_sel = select if select is not None else (None, None, None, None)
        launch(
            "seg_pair", lambda meta: (len(seg.rows) * triton.cdiv(max_sc, meta["BT"]),),
            self.wd, self.h, self.row_h, gp, seg.table, resp, thr, adv, out, out_adv, out_sel, self.d, max_sc, self.h.stride(-1),
            ALIGN=self.align,
        )
