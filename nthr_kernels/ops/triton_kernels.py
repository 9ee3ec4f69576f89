"""Fused Triton kernels for NTHR on a whole rollout batch.

Pipeline (factored path, ``docs/NTHR.md``), for all active groups of the batch at once:

1. ``log Z_t``: the old-log-prob shortcut ``z_t[y_t] / T - l_t`` (one gathered dot per token), or
   :func:`_lse_kernel`, a chunked online logsumexp over the vocabulary (tensor-core tiles of ``W h``,
   never storing logits), or a logsumexp of the given logits rows.
2. :func:`_pos_err_kernel`: prediction errors of the positive tokens on the group's ``V*``,
   ``g = onehot - exp(z / T - log Z)`` with ``z`` from tensor-core tiles of ``h`` and the ``V*`` rows of
   ``W`` (or gathered logits), written in the input dtype, transposed, to a scratch buffer
   ``[|V*_g|, roundup16(T+_g)]`` for the groups in flight.
3. :func:`_m_kernel`: ``M_g = G+_g^T H+_g`` (``[|V*_g|, d]``, float32 accumulation), a varlen grouped
   GEMM over the transposed error buffer.
4. :func:`_score_kernel`: for a block of tokens, loop over ``V*`` tiles; in one K-loop over ``d`` it
   forms both ``z = h W*^T`` and ``q = h M^T`` and accumulates ``s_t += sum_v g_t[v] q_t[v]``, so
   ``s_t = g_t^T M h_t`` without ever storing ``g`` or ``G M``. The first launch scores the positive
   tokens (their means are the anchors, ``tau`` follows); the second scores the negative tokens and,
   in the same pass, applies the threshold and writes the selection and token advantages. The positive
   tokens' errors are read back from the buffer of step 2 instead of being recomputed.
5. The pairwise path, flash-attention style (``[BT, BU]`` tiles of ``G G+^T`` and ``H H+^T``, row sums
   accumulated, never materialising tokens x tokens): the cost model picks it per group when
   ``2 T+ T (|V*| + d) < 2 |V*| d (T+ + T)`` (short groups); :func:`_seg_pair_kernel` then scores the
   group's tokens from its error buffer (every token's errors, written by step 2), with the same two
   passes and the same fused threshold. ``_pair_kernel`` is the dense-error version for
   ``score_tokens``.

Scratch memory: ``M`` for the groups in flight (``sum_g |V*_g| d`` elements; bf16 for bf16 inputs,
float32 otherwise, since fp16 lacks the range) plus the transposed positive-error buffer
(``sum_g |V*_g| * roundup16(T+_g)`` elements of the input dtype), bounded together by
``SCRATCH_BYTES`` (default 1 GiB; groups are processed in chunks that fit; a group larger than the
bound on its own is processed alone); a pairwise group holds its error buffer for all its tokens,
``|V*_g| * roundup16(T_g)`` elements, within the same bound. ``anchor="others"`` adds one ``M`` per
positive response of the chunk. Plus ``O(N)`` per-token vectors (about 60 bytes per completion token) and, without old
log-probs, nothing more: the vocabulary logsumexp keeps its logits in registers. No ``[N, |V|]`` or
``[N, N]`` tensor is formed.

Determinism: every output element is written by exactly one program, with a fixed reduction order
(no atomics), so the same inputs give the same bits.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..core.rules import interpreting


# --------------------------------------------------------------------------------------------------
# kernels
#
# Token rows are addressed as ``base + TA[p] * s0 + TB[p] * s1`` (padded layout: response, position;
# packed: row, with s1 = 0), so that the strides, specialised by Triton when divisible by 16, let the
# compiler vectorise the row loads. ALIGN marks ``D % 16 == 0`` (M offsets are multiples of D).
# --------------------------------------------------------------------------------------------------
@triton.jit
def _zy_kernel(
    H, TA, TB, h_s0, h_s1, h_sd, W, w_sv, w_sd, IDS, LP, lp_s0, lp_s1, OUT, n, inv_t, D,
    BT: tl.constexpr, BK: tl.constexpr,
):
    """Old-log-prob shortcut: ``log Z_t = (w_{y_t} . h_t) / T - l_t``."""
    tb = tl.program_id(0).to(tl.int64)
    rows = tb * BT + tl.arange(0, BT).to(tl.int64)
    rm = rows < n
    ta = tl.load(TA + rows, mask=rm, other=0)
    tb_ = tl.load(TB + rows, mask=rm, other=0)
    ids = tl.load(IDS + rows, mask=rm, other=0)
    acc = tl.zeros([BT], dtype=tl.float32)
    for k0 in range(0, D, BK):
        kk = k0 + tl.arange(0, BK)
        km = rm[:, None] & (kk < D)[None, :]
        h = tl.load(H + ta[:, None] * h_s0 + tb_[:, None] * h_s1 + kk[None, :] * h_sd, mask=km, other=0.0)
        w = tl.load(W + ids[:, None] * w_sv + kk[None, :] * w_sd, mask=km, other=0.0)
        acc += tl.sum(h.to(tl.float32) * w.to(tl.float32), axis=1)
    lp = tl.load(LP + ta * lp_s0 + tb_ * lp_s1, mask=rm, other=0.0).to(tl.float32)
    tl.store(OUT + rows, acc * inv_t - lp, mask=rm)


@triton.jit
def _pos_err_kernel(
    H, TA, TB, h_s0, h_s1, h_sd,
    IDS, LOGZ,
    W, w_sv, w_sd,
    LG, lg_s0, lg_s1, lg_sv,
    VS, SEG_VS0, SEG_NV, SEG_POS0, SEG_NPOS, SEG_GP,
    GP,
    inv_t, D,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    FROM_LOGITS: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Prediction errors of a segment's positive tokens on ``V*``, stored transposed (``[|V*|, ld]``,
    ``ld`` = positive tokens rounded up to 16) for the M GEMM."""
    s = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1).to(tl.int64)
    vb = tl.program_id(2).to(tl.int64)
    npos = tl.load(SEG_NPOS + s)
    nv = tl.load(SEG_NV + s)
    if (tb * BT < npos) & (vb * BV < nv):
        ld = tl.multiple_of((npos + 15) // 16 * 16, 16)
        rows = tb * BT + tl.arange(0, BT).to(tl.int64)
        rm = rows < npos
        pos = tl.load(SEG_POS0 + s) + rows
        ta = tl.load(TA + pos, mask=rm, other=0)
        tb_ = tl.load(TB + pos, mask=rm, other=0)
        cols = vb * BV + tl.arange(0, BV).to(tl.int64)
        cm = cols < nv
        vid = tl.load(VS + tl.load(SEG_VS0 + s) + cols, mask=cm, other=0)
        if FROM_LOGITS:
            z = tl.load(LG + ta[:, None] * lg_s0 + tb_[:, None] * lg_s1 + vid[None, :] * lg_sv,
                        mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
        else:
            z = tl.zeros([BT, BV], dtype=tl.float32)
            for k0 in range(0, D, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < D
                h = tl.load(H + ta[:, None] * h_s0 + tb_[:, None] * h_s1 + kk[None, :] * h_sd,
                            mask=rm[:, None] & km[None, :], other=0.0)
                w = tl.load(W + vid[:, None] * w_sv + kk[None, :] * w_sd, mask=cm[:, None] & km[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                    w = w.to(tl.float32)
                z += tl.dot(h, tl.trans(w), input_precision=PREC)
        logz = tl.load(LOGZ + pos, mask=rm, other=0.0)
        ids = tl.load(IDS + pos, mask=rm, other=-1)
        g = (ids[:, None] == vid[None, :]).to(tl.float32) - tl.exp(z * inv_t - logz[:, None])
        ok = rm[:, None] & cm[None, :]
        g = tl.where(ok, g, 0.0)
        gp = tl.multiple_of(tl.load(SEG_GP + s), 16)
        tl.store(GP + gp + cols[None, :] * ld + rows[:, None], g.to(GP.dtype.element_ty), mask=ok)


@triton.jit
def _m_kernel(
    GP, H, TA, TB, h_s0, h_s1, h_sd,
    SEG_NV, SEG_POS0, SEG_NPOS, SEG_GP, SEG_M,
    M, D,
    BV: tl.constexpr, BD: tl.constexpr, BU: tl.constexpr,
    UPCAST: tl.constexpr, PREC: tl.constexpr, ALIGN: tl.constexpr,
):
    """``M = G+^T H+`` per segment: an NN GEMM of the transposed errors ``[|V*|, ld]`` and the
    positive rows of ``H`` (float32 accumulation)."""
    s = tl.program_id(0).to(tl.int64)
    vb = tl.program_id(1).to(tl.int64)
    db = tl.program_id(2).to(tl.int64)
    nv = tl.load(SEG_NV + s)
    if vb * BV < nv:
        npos = tl.load(SEG_NPOS + s)
        ld = tl.multiple_of((npos + 15) // 16 * 16, 16)
        pos0 = tl.load(SEG_POS0 + s)
        gp = tl.multiple_of(tl.load(SEG_GP + s), 16)
        cols = vb * BV + tl.arange(0, BV).to(tl.int64)
        cm = cols < nv
        dd = db * BD + tl.arange(0, BD)
        dm = dd < D
        acc = tl.zeros([BV, BD], dtype=tl.float32)
        for u0 in range(0, npos, BU):
            u = u0 + tl.arange(0, BU).to(tl.int64)
            um = u < npos
            gt = tl.load(GP + gp + cols[:, None] * ld + u[None, :], mask=cm[:, None] & um[None, :], other=0.0)
            ta = tl.load(TA + pos0 + u, mask=um, other=0)
            tb_ = tl.load(TB + pos0 + u, mask=um, other=0)
            h = tl.load(H + ta[:, None] * h_s0 + tb_[:, None] * h_s1 + dd[None, :] * h_sd,
                        mask=um[:, None] & dm[None, :], other=0.0)
            if UPCAST:
                gt = gt.to(tl.float32)
                h = h.to(tl.float32)
            acc += tl.dot(gt, h, input_precision=PREC)
        m_off = tl.load(SEG_M + s)
        if ALIGN:
            m_off = tl.multiple_of(m_off, 16)
        tl.store(M + m_off + cols[:, None] * D + dd[None, :], acc.to(M.dtype.element_ty), mask=cm[:, None] & dm[None, :])


@triton.jit
def _score_kernel(
    H, TA, TB, h_s0, h_s1, h_sd,
    IDS, LOGZ,
    W, w_sv, w_sd,
    LG, lg_s0, lg_s1, lg_sv,
    VS, SEG_VS0, SEG_NV, SEG_M, M,
    SEG_SC0, SEG_NSC,
    OUT_S,
    SEG_TAU, SEG_ETA, ADV, OUT_ADV, OUT_SEL,
    GP, SEG_GP,
    inv_t, D,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr,
    SRC: tl.constexpr, FUSE_SELECT: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
    M_F32: tl.constexpr, PREC_Q: tl.constexpr, ALIGN: tl.constexpr,
):
    """``s_t = sum_v g_t[v] (M h_t)[v]`` for a block of tokens of one segment.

    SRC 0: ``g`` from ``z = h W*^T`` (same K-loop as ``q = h M^T``); 1: ``z`` gathered from logits;
    2: ``g`` read from a dense error matrix (``LG``, columns = ``V*`` positions, ``VS`` = identity);
    3: ``g`` read back from the transposed positive-error scratch the M pass wrote (the scored tokens
    are then exactly that segment's positive tokens), which saves recomputing their logits.
    With FUSE_SELECT the threshold and the rescale of the advantages happen here too.
    """
    s = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1).to(tl.int64)
    n = tl.load(SEG_NSC + s)
    if tb * BT < n:
        rows = tb * BT + tl.arange(0, BT).to(tl.int64)
        rm = rows < n
        pos = tl.load(SEG_SC0 + s) + rows
        ta = tl.load(TA + pos, mask=rm, other=0)
        tb_ = tl.load(TB + pos, mask=rm, other=0)
        hrow = ta * h_s0 + tb_ * h_s1
        if SRC < 2:
            ids = tl.load(IDS + pos, mask=rm, other=-1)
            logz = tl.load(LOGZ + pos, mask=rm, other=0.0)
        if (SRC == 1) | (SRC == 2):
            lrow = ta * lg_s0 + tb_ * lg_s1
        if SRC == 3:
            gp = tl.multiple_of(tl.load(SEG_GP + s), 16)
            ld = tl.multiple_of((n + 15) // 16 * 16, 16)
        nv = tl.load(SEG_NV + s)
        vs0 = tl.load(SEG_VS0 + s)
        m_off = tl.load(SEG_M + s)
        if ALIGN:
            m_off = tl.multiple_of(m_off, 16)
        score = tl.zeros([BT], dtype=tl.float32)
        for v0 in range(0, nv, BV):
            cols = v0 + tl.arange(0, BV).to(tl.int64)
            cm = cols < nv
            vid = tl.load(VS + vs0 + cols, mask=cm, other=0)
            q = tl.zeros([BT, BV], dtype=tl.float32)
            z = tl.zeros([BT, BV], dtype=tl.float32)
            for k0 in range(0, D, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < D
                h = tl.load(H + hrow[:, None] + kk[None, :] * h_sd, mask=rm[:, None] & km[None, :], other=0.0)
                mt = tl.load(M + m_off + cols[:, None] * D + kk[None, :], mask=cm[:, None] & km[None, :], other=0.0)
                if UPCAST:
                    h = h.to(tl.float32)
                    mt = mt.to(tl.float32)
                if M_F32:
                    q += tl.dot(h.to(tl.float32), tl.trans(mt), input_precision=PREC_Q)
                else:
                    q += tl.dot(h, tl.trans(mt), input_precision=PREC)
                if SRC == 0:
                    w = tl.load(W + vid[:, None] * w_sv + kk[None, :] * w_sd, mask=cm[:, None] & km[None, :], other=0.0)
                    if UPCAST:
                        w = w.to(tl.float32)
                    z += tl.dot(h, tl.trans(w), input_precision=PREC)
            if SRC == 3:
                g = tl.load(GP + gp + cols[None, :] * ld + rows[:, None], mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
            elif SRC == 2:
                g = tl.load(LG + lrow[:, None] + vid[None, :] * lg_sv, mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
            else:
                if SRC == 1:
                    z = tl.load(LG + lrow[:, None] + vid[None, :] * lg_sv, mask=rm[:, None] & cm[None, :], other=0.0).to(tl.float32)
                g = (ids[:, None] == vid[None, :]).to(tl.float32) - tl.exp(z * inv_t - logz[:, None])
                g = tl.where(rm[:, None] & cm[None, :], g, 0.0)
            score += tl.sum(g * q, axis=1)
        tl.store(OUT_S + pos, score, mask=rm)
        if FUSE_SELECT:
            tau = tl.load(SEG_TAU + s)
            eta = tl.load(SEG_ETA + s)
            sel = score > tau
            a = tl.load(ADV + pos, mask=rm, other=0.0)
            tl.store(OUT_ADV + pos, tl.where(sel, a * eta, a), mask=rm)
            tl.store(OUT_SEL + pos, sel.to(tl.int8), mask=rm)


@triton.jit
def _lse_kernel(
    H, TA, TB, h_s0, h_s1, h_sd, W, w_sv, w_sd, OUT, n, V, inv_t, D,
    BT: tl.constexpr, BV: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Online logsumexp of ``W h / T`` over the whole vocabulary for a block of tokens."""
    tb = tl.program_id(0).to(tl.int64)
    rows = tb * BT + tl.arange(0, BT).to(tl.int64)
    rm = rows < n
    ta = tl.load(TA + rows, mask=rm, other=0)
    tb_ = tl.load(TB + rows, mask=rm, other=0)
    hrow = ta * h_s0 + tb_ * h_s1
    run_max = tl.full([BT], -float("inf"), dtype=tl.float32)
    run_sum = tl.zeros([BT], dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV).to(tl.int64)
        cm = cols < V
        z = tl.zeros([BT, BV], dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < D
            h = tl.load(H + hrow[:, None] + kk[None, :] * h_sd, mask=rm[:, None] & km[None, :], other=0.0)
            w = tl.load(W + cols[:, None] * w_sv + kk[None, :] * w_sd, mask=cm[:, None] & km[None, :], other=0.0)
            if UPCAST:
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            z += tl.dot(h, tl.trans(w), input_precision=PREC)
        z = tl.where(cm[None, :], z * inv_t, -float("inf"))
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        run_sum = run_sum * tl.exp(run_max - new_max) + tl.sum(tl.exp(z - new_max[:, None]), axis=1)
        run_max = new_max
    tl.store(OUT + rows, run_max + tl.log(run_sum), mask=rm)


@triton.jit
def _seg_pair_kernel(
    H, TA, TB, h_s0, h_s1, h_sd,
    GP, SEG_GP, SEG_NV, SEG_G0, SEG_NT, SEG_NPOS, SEG_SC0, SEG_NSC, RESP,
    OUT_S, SEG_TAU, SEG_ETA, ADV, OUT_ADV, OUT_SEL,
    D,
    BT: tl.constexpr, BU: tl.constexpr, BK: tl.constexpr,
    FUSE_SELECT: tl.constexpr, SELF_ONLY: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Pairwise path of a group, flash-attention style: for a block of its tokens, stream the group's
    positive tokens in blocks of BU and accumulate the row sums of ``(G_t G_u^T) * (H_t H_u^T)``.

    The group's errors (every token, positive first) were written transposed, ``[|V*|, ld]``, by the
    error kernel. SELF_ONLY keeps only pairs of the same response (``anchor="others"``)."""
    s = tl.program_id(0).to(tl.int64)
    tb = tl.program_id(1).to(tl.int64)
    n = tl.load(SEG_NSC + s)
    if tb * BT < n:
        loc = tl.load(SEG_SC0 + s) + tb * BT + tl.arange(0, BT).to(tl.int64)
        rm = tb * BT + tl.arange(0, BT) < n
        g0 = tl.load(SEG_G0 + s)
        nt = tl.load(SEG_NT + s)
        ld = tl.multiple_of((nt + 15) // 16 * 16, 16)
        nv = tl.load(SEG_NV + s)
        npos = tl.load(SEG_NPOS + s)
        gp = tl.multiple_of(tl.load(SEG_GP + s), 16)
        pos = g0 + loc
        ta = tl.load(TA + pos, mask=rm, other=0)
        tb_ = tl.load(TB + pos, mask=rm, other=0)
        hrow = ta * h_s0 + tb_ * h_s1
        if SELF_ONLY:
            resp_t = tl.load(RESP + pos, mask=rm, other=-1)
        acc = tl.zeros([BT], dtype=tl.float32)
        for u0 in range(0, npos, BU):
            u = u0 + tl.arange(0, BU).to(tl.int64)
            um = u < npos
            ua = tl.load(TA + g0 + u, mask=um, other=0)
            ub = tl.load(TB + g0 + u, mask=um, other=0)
            urow = ua * h_s0 + ub * h_s1
            a = tl.zeros([BT, BU], dtype=tl.float32)
            for v0 in range(0, nv, BK):
                vv = v0 + tl.arange(0, BK).to(tl.int64)
                vm = vv < nv
                gt = tl.load(GP + gp + vv[None, :] * ld + loc[:, None], mask=rm[:, None] & vm[None, :], other=0.0)
                gu = tl.load(GP + gp + vv[:, None] * ld + u[None, :], mask=vm[:, None] & um[None, :], other=0.0)
                if UPCAST:
                    gt = gt.to(tl.float32)
                    gu = gu.to(tl.float32)
                a += tl.dot(gt, gu, input_precision=PREC)
            b = tl.zeros([BT, BU], dtype=tl.float32)
            for k0 in range(0, D, BK):
                kk = k0 + tl.arange(0, BK)
                km = kk < D
                ht = tl.load(H + hrow[:, None] + kk[None, :] * h_sd, mask=rm[:, None] & km[None, :], other=0.0)
                hu = tl.load(H + urow[:, None] + kk[None, :] * h_sd, mask=um[:, None] & km[None, :], other=0.0)
                if UPCAST:
                    ht = ht.to(tl.float32)
                    hu = hu.to(tl.float32)
                b += tl.dot(ht, tl.trans(hu), input_precision=PREC)
            prod = a * b
            if SELF_ONLY:
                resp_u = tl.load(RESP + g0 + u, mask=um, other=-2)
                prod = tl.where(resp_t[:, None] == resp_u[None, :], prod, 0.0)
            acc += tl.sum(prod, axis=1)
        tl.store(OUT_S + pos, acc, mask=rm)
        if FUSE_SELECT:
            tau = tl.load(SEG_TAU + s)
            eta = tl.load(SEG_ETA + s)
            sel = acc > tau
            adv = tl.load(ADV + pos, mask=rm, other=0.0)
            tl.store(OUT_ADV + pos, tl.where(sel, adv * eta, adv), mask=rm)
            tl.store(OUT_SEL + pos, sel.to(tl.int8), mask=rm)


@triton.jit
def _pair_kernel(
    HP, hp_s0, hp_sd, HN, hn_s0, hn_sd, EP, ep_s0, ep_sv, EN, en_s0, en_sv,
    OUT, TP, TN, V, D,
    BT: tl.constexpr, BU: tl.constexpr, BK: tl.constexpr, UPCAST: tl.constexpr, PREC: tl.constexpr,
):
    """Pairwise scores: for a block of BT tokens, stream the positive tokens in blocks of BU and
    accumulate the row sums of (E_n E_p^T) * (H_n H_p^T)."""
    tb = tl.program_id(0).to(tl.int64)
    rows = tb * BT + tl.arange(0, BT).to(tl.int64)
    rm = rows < TN
    acc = tl.zeros([BT], dtype=tl.float32)
    for u0 in range(0, TP, BU):
        u = u0 + tl.arange(0, BU).to(tl.int64)
        um = u < TP
        a = tl.zeros([BT, BU], dtype=tl.float32)
        for k0 in range(0, V, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < V
            en = tl.load(EN + rows[:, None] * en_s0 + kk[None, :] * en_sv, mask=rm[:, None] & km[None, :], other=0.0)
            ep = tl.load(EP + u[:, None] * ep_s0 + kk[None, :] * ep_sv, mask=um[:, None] & km[None, :], other=0.0)
            if UPCAST:
                en = en.to(tl.float32)
                ep = ep.to(tl.float32)
            a += tl.dot(en, tl.trans(ep), input_precision=PREC)
        b = tl.zeros([BT, BU], dtype=tl.float32)
        for k0 in range(0, D, BK):
            kk = k0 + tl.arange(0, BK)
            km = kk < D
            hn = tl.load(HN + rows[:, None] * hn_s0 + kk[None, :] * hn_sd, mask=rm[:, None] & km[None, :], other=0.0)
            hp = tl.load(HP + u[:, None] * hp_s0 + kk[None, :] * hp_sd, mask=um[:, None] & km[None, :], other=0.0)
            if UPCAST:
                hn = hn.to(tl.float32)
                hp = hp.to(tl.float32)
            b += tl.dot(hn, tl.trans(hp), input_precision=PREC)
        acc += tl.sum(a * b, axis=1)
    tl.store(OUT + rows, acc, mask=rm)


# --------------------------------------------------------------------------------------------------
# launchers
# --------------------------------------------------------------------------------------------------
def _dot_prec(dtype: torch.dtype) -> str:
    # float32 inputs (and bf16 upcast under the interpreter): exact IEEE float32 products, no TF32.
    return "ieee" if dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16) else "tf32"


def _m_dtype(wd: torch.dtype) -> torch.dtype:
    # fp16 has too little range for M (sums of g h^T over thousands of tokens): keep it in float32.
    return torch.bfloat16 if wd == torch.bfloat16 else torch.float32


# Autotuning (GPU only; the interpreter uses the small fixed blocks). Each entry: tuned block sizes,
# num_warps, num_stages. Keyed on the hidden size, the mode flags and (implicitly) the dtypes.
_TUNE_16 = {
    "score": (("BT", "BV", "BK"), [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 128, 64, 8, 3), (128, 128, 64, 8, 3), (128, 128, 32, 8, 4)]),
    "pos_err": (("BT", "BV", "BK"), [(64, 64, 64, 4, 3), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3), (128, 128, 64, 8, 4), (128, 256, 64, 8, 3)]),
    "m": (("BV", "BD", "BU"), [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4), (128, 128, 128, 8, 3), (256, 128, 64, 8, 3)]),
    "lse": (("BT", "BV", "BK"), [(64, 128, 64, 4, 3), (128, 128, 64, 8, 3), (128, 256, 64, 8, 3)]),
    "pair": (("BT", "BU", "BK"), [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3)]),
    "seg_pair": (("BT", "BU", "BK"), [(64, 64, 64, 4, 3), (128, 64, 64, 8, 3), (64, 32, 64, 4, 3)]),
}
_TUNE_32 = {
    "score": (("BT", "BV", "BK"), [(64, 32, 32, 4, 2), (64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]),
    "pos_err": (("BT", "BV", "BK"), [(64, 32, 32, 4, 2), (64, 64, 32, 4, 2)]),
    "m": (("BV", "BD", "BU"), [(64, 64, 32, 4, 2), (32, 64, 32, 4, 2)]),
    "lse": (("BT", "BV", "BK"), [(64, 64, 32, 4, 2), (64, 128, 32, 8, 2)]),
    "pair": (("BT", "BU", "BK"), [(64, 32, 32, 4, 2), (64, 64, 32, 4, 2)]),
    "seg_pair": (("BT", "BU", "BK"), [(64, 32, 32, 4, 2), (32, 32, 32, 4, 2)]),
}
_KERNELS = {"score": _score_kernel, "pos_err": _pos_err_kernel, "m": _m_kernel, "lse": _lse_kernel, "pair": _pair_kernel,
            "seg_pair": _seg_pair_kernel}
_KEYS = {
    "score": ["D", "SRC", "FUSE_SELECT", "M_F32"],
    "pos_err": ["D", "FROM_LOGITS"],
    "m": ["D"],
    "lse": ["D", "V"],
    "pair": ["V", "D"],
    "seg_pair": ["D", "FUSE_SELECT", "SELF_ONLY"],
}
_tuned_cache: dict = {}


def _launch(name: str, grid, args: tuple, flags: dict, dtype: torch.dtype, small: dict):
    """Launch kernel ``name``: autotuned over the table for ``dtype`` on a GPU, with the ``small``
    fixed blocks under the interpreter. ``grid(META)`` receives the block sizes."""
    if interpreting():
        _KERNELS[name][grid(small)](*args, **flags, **small)
        return
    wide = dtype != torch.float32
    key = (name, wide)
    if key not in _tuned_cache:
        names, table = (_TUNE_16 if wide else _TUNE_32)[name]
        configs = [triton.Config(dict(zip(names, c[:3])), num_warps=c[3], num_stages=c[4]) for c in table]
        _tuned_cache[key] = triton.autotune(configs=configs, key=_KEYS[name])(_KERNELS[name])
    _tuned_cache[key][grid](*args, **flags)


class _Rows:
    """Where each token's row lives: ``TA``/``TB`` index arrays (per position of the token list) and,
    per tensor laid out like ``token_ids``, its two leading strides."""

    def __init__(self, ta: torch.Tensor, tb: Optional[torch.Tensor]):
        self.ta = ta.contiguous()
        self.tb = tb.contiguous() if tb is not None else self.ta
        self.padded = tb is not None

    def strides(self, x: torch.Tensor):
        return (x.stride(0), x.stride(1) if self.padded else 0)


class _Kernels:
    """Arguments shared by the launches of one batch (or one dense score_tokens call)."""

    def __init__(self, h, rows: _Rows, ids, log_z, w, lg, src, wd, inv_t, dev):
        self.h, self.rows, self.inv_t, self.dev = h, rows, inv_t, dev
        self.hs = rows.strides(h) + (h.stride(-1),)
        # unused arguments of a mode still need a tensor to point at
        self.ids = ids if ids is not None else rows.ta
        self.log_z = log_z if log_z is not None else torch.zeros(1, dtype=torch.float32, device=dev)
        self.w = w if w is not None else h
        self.w_sv, self.w_sd = (w.stride(0), w.stride(1)) if w is not None else (0, 0)
        self.lg = lg if lg is not None else h
        self.ls = (rows.strides(lg) + (lg.stride(-1),)) if lg is not None else (0, 0, 0)
        self.src, self.wd, self.md = src, wd, _m_dtype(wd)
        self.d = h.shape[-1]
        self.align = self.d % 16 == 0
        self.upcast = interpreting() and wd == torch.bfloat16
        self.prec = _dot_prec(wd)
        self.prec_q = "ieee" if (wd == torch.float32 or interpreting()) else "tf32"
        # fixed blocks for the interpreter; on a GPU ``_launch`` autotunes
        self.bl = dict(BT=16, BV=16, BK=16)
        self.bm = dict(BV=16, BD=16, BU=16)

    def errors(self, vs_id, seg_vs0, seg_nv, seg_pos0, seg_npos, nv_host, np_host):
        """Prediction errors of each segment's ``seg_npos`` tokens from ``seg_pos0`` on its ``V*``,
        transposed: ``[|V*|, roundup16(n)]`` per segment. Returns ``(gp, seg_gp)``."""
        n_seg = seg_nv.numel()
        ld = (seg_npos + 15) // 16 * 16
        sizes = ld * seg_nv
        seg_gp = (torch.cumsum(sizes, 0) - sizes).contiguous()
        gp_elems = sum(a * ((b + 15) // 16 * 16) for a, b in zip(nv_host, np_host))
        gp = torch.empty(max(gp_elems, 1), dtype=self.wd, device=self.dev)
        max_nv, max_np = max(nv_host, default=0), max(np_host, default=0)
        if max_nv and max_np:
            _launch(
                "pos_err",
                lambda m_: (n_seg, triton.cdiv(max_np, m_["BT"]), triton.cdiv(max_nv, m_["BV"])),
                (self.h, self.rows.ta, self.rows.tb) + self.hs
                + (self.ids, self.log_z, self.w, self.w_sv, self.w_sd, self.lg) + self.ls
                + (vs_id, seg_vs0, seg_nv, seg_pos0, seg_npos, seg_gp, gp, self.inv_t, self.d),
                dict(FROM_LOGITS=self.src == 1, UPCAST=self.upcast, PREC=self.prec),
                self.wd, self.bl,
            )
        return gp, seg_gp

    def pair_scores(self, gp, seg_gp, seg_nv, seg_g0, seg_nt, seg_npos, seg_sc0, seg_nsc, max_sc, resp, out,
                    select=None, self_only=False):
        """Pairwise scores of the tokens ``seg_sc0 .. seg_sc0 + seg_nsc`` (group-local) of each group
        from its error buffer (every token, positive first); ``select`` as in :meth:`scores`."""
        n_seg = seg_nv.numel()
        if max_sc == 0 or n_seg == 0:
            return
        fuse = select is not None
        tau, eta, adv, out_adv, out_sel = select if fuse else (out, out, out, out, out)
        _launch(
            "seg_pair",
            lambda m_: (n_seg, triton.cdiv(max_sc, m_["BT"])),
            (self.h, self.rows.ta, self.rows.tb) + self.hs
            + (gp, seg_gp, seg_nv, seg_g0, seg_nt, seg_npos, seg_sc0, seg_nsc, resp, out, tau, eta, adv, out_adv,
               out_sel, self.d),
            dict(FUSE_SELECT=fuse, SELF_ONLY=self_only, UPCAST=self.upcast, PREC=self.prec),
            self.wd, dict(BT=16, BU=16, BK=16),
        )

    def build_m(self, vs_id, seg_vs0, seg_nv, seg_pos0, seg_npos, nv_host, np_host, gp=None):
        """``M_k = G+_k^T H+_k`` per segment (``M`` in ``self.md``, segments back to back).

        ``nv_host``/``np_host``: the same sizes as host lists (grids and exact buffer sizes without a
        device sync).
        ``gp`` (dense transposed errors laid out as the error kernel writes them) skips that kernel.
        Returns ``(m, seg_m, (gp, seg_gp))``; the last pair lets the score pass reuse the errors.
        """
        n_seg = seg_nv.numel()
        d = self.d
        m_sizes = seg_nv * d
        seg_m = (torch.cumsum(m_sizes, 0) - m_sizes).contiguous()
        max_nv = max(nv_host, default=0)
        m = torch.empty(max(sum(nv_host) * d, 1), dtype=self.md, device=self.dev)
        rows = (self.h, self.rows.ta, self.rows.tb) + self.hs
        if gp is None:
            gp, seg_gp = self.errors(vs_id, seg_vs0, seg_nv, seg_pos0, seg_npos, nv_host, np_host)
        else:
            ld = (seg_npos + 15) // 16 * 16
            seg_gp = (torch.cumsum(ld * seg_nv, 0) - ld * seg_nv).contiguous()
        if max_nv:
            _launch(
                "m",
                lambda m_: (n_seg, triton.cdiv(max_nv, m_["BV"]), triton.cdiv(d, m_["BD"])),
                (gp,) + rows + (seg_nv, seg_pos0, seg_npos, seg_gp, seg_m, m, d),
                dict(UPCAST=self.upcast, PREC=self.prec, ALIGN=self.align),
                self.wd, self.bm,
            )
        return m, seg_m, (gp, seg_gp)

    def scores(self, vs_id, seg_vs0, seg_nv, seg_m, m, seg_sc0, seg_nsc, max_sc, out, select=None, errors=None):
        """Score kernel over segments (``max_sc``: host-side max of ``seg_nsc``).

        ``select = (seg_tau, seg_eta, adv, out_adv, out_sel)`` fuses the threshold and the rescale;
        ``errors = (gp, seg_gp)`` from :meth:`build_m` reads the positive tokens' errors back instead
        of recomputing them (the scored ranges must then be the segments' positive tokens).
        """
        n_seg = seg_nv.numel()
        if max_sc == 0 or n_seg == 0:
            return
        fuse = select is not None
        tau, eta, adv, out_adv, out_sel = select if fuse else (out, out, out, out, out)
        gp, seg_gp = errors if errors is not None else (out, seg_m)
        src = 3 if errors is not None else self.src
        _launch(
            "score",
            lambda m_: (n_seg, triton.cdiv(max_sc, m_["BT"])),
            (self.h, self.rows.ta, self.rows.tb) + self.hs
            + (self.ids, self.log_z, self.w, self.w_sv, self.w_sd, self.lg) + self.ls
            + (vs_id, seg_vs0, seg_nv, seg_m, m, seg_sc0, seg_nsc, out, tau, eta, adv, out_adv, out_sel, gp, seg_gp,
               self.inv_t, self.d),
            dict(SRC=src, FUSE_SELECT=fuse, UPCAST=self.upcast, PREC=self.prec,
                 M_F32=self.md == torch.float32 and self.wd != torch.float32, PREC_Q=self.prec_q, ALIGN=self.align),
            self.wd, self.bl,
        )


def _work_dtype(dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32
