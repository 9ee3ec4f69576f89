"""``nthr_advantages`` on the fused Triton kernels of :mod:`nthr_kernels.ops.triton_kernels` (the pipeline
is described there): a plan made on the device with one host synchronisation, chunks within
``SCRATCH_BYTES``; per chunk the errors, ``M`` with the positive responses' anchor sums (factored) or
the positive tokens' scores (pairwise), ``tau`` on the device, then the negative tokens' scores with the
threshold fused.

Host synchronisations per call: one (``plan_on_device`` reads the per-group and per-response sizes);
grids, buffer sizes and every segment table follow from that host copy, and the tables reach the
device in one asynchronous copy.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Optional

import torch
import triton

from ...core.checks import vstar_ranges, weight_rows_read
from ...core.plan import tau_from_anchors
from ...core.rules import SCAN_ELEMS, SCRATCH_BYTES, group_eta, pairwise_cheaper
from ..triton_kernels import (
    SEG_WIDTH, Kernels, Segment, Segments, anchor_tiles, block_range, err_dtype, launch, m_dtype, round16, row_offsets,
    span_sums, upload, work_dtype,
)
from .torch_impl import log_normaliser


class Group(NamedTuple):
    """Host sizes of one active group in plan order."""

    batch: int  # batch group index
    start: int  # first token (plan order)
    n: int  # tokens
    npos: int  # positive tokens (the first ``npos``)
    vs0: int  # first entry of its V* in vs_id
    nv: int  # |V*|


class Response(NamedTuple):
    """Host span of one positive response with tokens (plan order)."""

    group: int  # index into the plan's groups
    start: int
    n: int


class DevicePlan(NamedTuple):
    order: torch.Tensor  # [n_act] canonical token index: active groups in batch order, positive tokens first
    vs_id: torch.Tensor  # [K] V* ids, by group, sorted within each
    groups: list  # [Group]
    responses: list  # [Response]


def plan_on_device(batch) -> DevicePlan:
    """Order the active tokens and build ``V*`` with sorts and segment sums on the device; the sizes
    (per group: tokens, positive tokens, ``|V*|``; per response: tokens, group, positive) come to the
    host in one read, the only host synchronisation of the call."""
    dev = batch.device
    n_groups, n_resp = batch.group_ids.numel(), batch.positive.numel()
    vocab = batch.vocab_size
    tok_group = batch.resp_group[batch.tok_resp]
    tok_pos = batch.positive[batch.tok_resp]
    act = batch.group_active[tok_group]
    zeros = lambda k: torch.zeros(k, dtype=torch.int64, device=dev)  # noqa: E731
    # active tokens by batch group, positive tokens first, by response and position within (stable); the rest last
    key = torch.where(act, tok_group * 2 + (~tok_pos).to(torch.int64), torch.full_like(tok_group, 2 * n_groups))
    _, perm = torch.sort(key, stable=True)
    g_len = zeros(n_groups).scatter_add_(0, tok_group, act.to(torch.int64))
    g_pos = zeros(n_groups).scatter_add_(0, tok_group, (act & tok_pos).to(torch.int64))
    # V*: the distinct (group, id) pairs of active tokens, sorted
    sentinel = n_groups * vocab
    vkey, _ = torch.sort(torch.where(act, tok_group * vocab + batch.tok_ids, torch.full_like(tok_group, sentinel)))
    valid = vkey < sentinel
    first = valid.clone()
    first[1:] &= vkey[1:] != vkey[:-1]
    vs_count = zeros(n_groups).scatter_add_(0, torch.where(valid, vkey // vocab, 0), first.to(torch.int64))
    resp_len = zeros(n_resp).scatter_add_(0, batch.tok_resp, torch.ones_like(batch.tok_resp))
    # the checks validate_batch left pending (with defer=True) are read in the same copy
    host = batch.pending.read(torch.cat([g_len, g_pos, vs_count, resp_len, batch.resp_group, batch.positive.to(torch.int64)]))[0]
    g_len, g_pos, vs_count = (host[i * n_groups:(i + 1) * n_groups] for i in range(3))
    resp_len, resp_group, positive = (host[3 * n_groups + i * n_resp:3 * n_groups + (i + 1) * n_resp] for i in range(3))

    groups, where, start, vs0 = [], {}, 0, 0
    for g in range(n_groups):
        if g_len[g]:  # an active group (inactive ones have no active token and no V*)
            where[g] = len(groups)
            groups.append(Group(g, start, g_len[g], g_pos[g], vs0, vs_count[g]))
        start += g_len[g]
        vs0 += vs_count[g]
    # positive responses keep their order within the group's positive run (the sort is stable)
    nxt = {g: groups[i].start for g, i in where.items()}
    responses = []
    for r in range(n_resp):
        g = resp_group[r]
        if positive[r] and resp_len[r] and g in where:
            responses.append(Response(where[g], nxt[g], resp_len[r]))
            nxt[g] += resp_len[r]
    n_vs = vs0
    slot = torch.where(valid, torch.cumsum(first, 0) - 1, n_vs)  # duplicates write the same id; slot n_vs is dropped
    vs_id = zeros(n_vs + 1).scatter_(0, slot, vkey % vocab)[:n_vs]
    return DevicePlan(perm[:start], vs_id, groups, responses)


def _log_z(batch, order, h, row_h, w, wd, ids):
    """``(log Z, l)`` per token of ``order``: ``l`` the sampled token's log-prob the errors take its error from
    (the old log-probs, gathered once in plan order for the shortcut kernel and the errors, else from the other
    tokens' log-sum-exp: the vocabulary kernel's, or torch's over the logits rows), ``log Z = z_y / T - l`` by the
    shortcut kernel, the vocabulary kernel or torch."""
    n = order.numel()
    if batch.lm_head_weight is None:
        return log_normaliser(batch, order, SCAN_ELEMS, logits_scale=1.0 / batch.opts.temperature)
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    if batch.old_logprobs is not None:
        lp = batch.gather(batch.old_logprobs, order).float().contiguous()
        if n:
            launch("zy", lambda meta: (triton.cdiv(n, meta["BT"]),), wd, h, row_h, w, ids, lp, out,
                   n, h.shape[-1], h.stride(-1), w.stride(0), w.stride(1), 1.0 / batch.opts.temperature)
        return out, lp
    lp = torch.empty(n, dtype=torch.float32, device=h.device)
    if n:
        launch("lse", lambda meta: (triton.cdiv(n, meta["BT"]),), wd,
               h, row_h, w, ids, out, lp, n, w.shape[0], h.shape[-1], h.stride(-1), w.stride(0), w.stride(1),
               1.0 / batch.opts.temperature)
    return out, lp


def _chunks(need: list, budget: int):
    """Consecutive runs of items whose ``need`` (bytes) sum within ``budget`` (an item larger than the
    budget forms a run of its own). Yields ``(k0, k1)``."""
    k, n = 0, len(need)
    while k < n:
        tot, k1 = need[k], k + 1
        while k1 < n and tot + need[k1] <= budget:
            tot += need[k1]
            k1 += 1
        yield k, k1
        k = k1


def choose_paths(nv: list, t_pos: list, t_all: list, d: int, score_positive: bool = False, others: bool = False) -> list:
    """Per group: "pairwise" iff :func:`~nthr_kernels.core.rules.pairwise_cheaper` (the native backend's rule):
    ``2 T+ T (|V*| + d) < 2 |V*| d T``, plus ``2 |V*| d T+`` on the right with ``score_positive`` (the score
    kernel's pass over the positive tokens) and ``2 T+ T+ (|V*| + d)`` on the left with ``others`` (the second
    pairwise pass, over the positive tokens' own pairs). The errors' logits, the same for both, cancel."""
    return ["pairwise" if pairwise_cheaper(p, t, v, d, score_positive, own_pairs=others) else "factored"
            for v, p, t in zip(nv, t_pos, t_all)]


class _Staging:
    """Host integers of one call (segment tables, response spans), sent to the device in one copy."""

    def __init__(self):
        self.values: list = []
        self.parts: list = []

    def put(self, values: list) -> int:
        self.parts.append((len(self.values), len(values)))
        self.values.extend(values)
        return len(self.parts) - 1

    def segments(self, rows: list) -> int:
        return self.put([x for r in rows for x in r])

    def upload(self, device) -> list:
        flat = upload(self.values, device)
        return [flat[o:o + n] for o, n in self.parts]


class _Chunk(NamedTuple):
    kind: str  # "factored" or "pairwise"
    pos: list  # [Segment]: error rows (positive tokens; every token for pairwise), scored: positive tokens
    neg: list  # [Segment]: scored: negative tokens
    resp: list  # [Segment]: factored: each positive response's rows, for its N_i (Segment's note)
    groups: list  # batch group indices
    spans: tuple  # (first token, tokens, batch group) lists of the chunk's positive responses


def _plan_chunks(plan: DevicePlan, paths: list, d: int, elem: int, m_elem: int, budget: int) -> list:
    """Host-side chunking (groups whose scratch fits ``budget`` bytes together) and the segment rows
    of each chunk's launches."""
    by_group = [[] for _ in plan.groups]
    for r in plan.responses:
        by_group[r.group].append(r)
    chunks = []
    for kind in ("factored", "pairwise"):
        ids = [i for i, pth in enumerate(paths) if pth == kind]
        gs = [plan.groups[i] for i in ids]
        if kind == "factored":  # M, the positive errors, N_i (float32) and the anchor sums per positive response
            need = [g.nv * d * m_elem + g.nv * round16(g.npos) * elem + len(by_group[i]) * (g.nv * d * 4 + 8 * anchor_tiles(g.nv, d))
                    for i, g in zip(ids, gs)]
        else:
            need = [g.nv * round16(g.n) * elem for g in gs]
        for c0, c1 in _chunks(need, budget):
            pos, neg, resp, spans = [], [], [], ([], [], [])
            gp = m = nb = slot = 0
            for i in ids[c0:c1]:
                g = plan.groups[i]
                if sum(r.n for r in by_group[i]) != g.npos:
                    raise AssertionError("the positive responses' spans must tile the group's positive rows")
                nerr = g.npos if kind == "factored" else g.n
                r0, nr = len(spans[0]), len(by_group[i])
                pos.append(Segment(g.vs0, g.nv, g.start, nerr, g.npos, gp, m, g.start, g.npos, g.batch, r0, nr))
                neg.append(Segment(g.vs0, g.nv, g.start, nerr, g.npos, gp, m, g.start + g.npos, g.n - g.npos, g.batch))
                for r in by_group[i]:
                    spans[0].append(r.start)
                    spans[1].append(r.n)
                    spans[2].append(g.batch)
                    if kind == "factored":
                        resp.append(Segment(g.vs0, g.nv, r.start, nerr, r.n, gp, nb, slot, 0, g.batch, col0=r.start - g.start))
                        nb += g.nv * d
                        slot += anchor_tiles(g.nv, d)
                gp += g.nv * round16(nerr)
                m += g.nv * d if kind == "factored" else 0
            chunks.append(_Chunk(kind, pos, neg, resp, [plan.groups[i].batch for i in ids[c0:c1]], spans))
    return chunks


def _chunk_tau(sums, n, grp, groups, thr, n_groups: int, beta: float) -> None:
    """``tau`` of a chunk's groups into ``thr[:, 0]`` from the anchor-score sums of its positive
    responses (``n`` tokens each, batch group ``grp``): the minimum mean per group, times beta; on the device."""
    means = sums.to(torch.float64) / n.to(torch.float64)
    thr[groups, 0] = tau_from_anchors(grp, means, n_groups, beta)[groups].to(torch.float32)


def plan_kernels(batch, plan, h, w, wd) -> Kernels:
    """The :class:`Kernels` of a call: the tokens in plan order (``h`` and ``w`` already in ``wd``), their
    logits source, ``log Z`` and, with ``lm_head_weight``, the sampled token's log-prob ``l_t`` (the old
    log-probs, or the vocabulary logsumexp kernel's from ``log Z``'s own tile): its own probability is
    ``exp(l_t)`` and its error ``-expm1(l_t)`` (:func:`~nthr_kernels.ops.triton_kernels._errors`)."""
    order = plan.order
    tok_a = batch.tok_a[order]
    tok_b = batch.tok_b[order] if batch.tok_b is not None else None
    row_h = row_offsets(h, tok_a, tok_b)
    lg = batch.logits
    ids = batch.tok_ids[order].contiguous()
    log_z, lp = _log_z(batch, order, h, row_h, w, wd, ids)
    return Kernels(
        h, row_h, wd, w=w if lg is None else None, lg=lg, row_lg=row_offsets(lg, tok_a, tok_b) if lg is not None else None,
        ids=ids, log_z=log_z, lp=lp, vs=plan.vs_id, inv_t=1.0 / batch.opts.temperature,
    )


def nthr_advantages(batch, budget: Optional[int] = None, path: Optional[str] = None):
    """Fused NTHR on the batch; returns canonical-order ``(scores, selected, token_adv, tau, eta)``.

    ``budget``: scratch bytes (default ``SCRATCH_BYTES``); ``path``: ``"factored"`` or ``"pairwise"`` for
    every group instead of the cost model (the tests compare both).
    """
    dev = batch.device
    wd = work_dtype(batch.hidden, batch.lm_head_weight)
    h = batch.hidden if batch.hidden.dtype == wd else batch.hidden.to(wd)
    w = batch.lm_head_weight
    if w is not None and w.dtype != wd:
        w = w.to(wd)
    n_groups = batch.group_ids.numel()
    others = batch.opts.anchor == "others"
    plan = plan_on_device(batch)  # the host synchronisation
    order = plan.order
    k = plan_kernels(batch, plan, h, w, wd)

    # per token in plan order; per group (tau, eta) in THR
    resp_o = batch.tok_resp[order].contiguous()
    scores_o = torch.zeros(order.numel(), dtype=torch.float32, device=dev)
    adv_o = batch.adv[resp_o].contiguous()
    out_adv = adv_o.clone()  # positive tokens keep theirs; the fused threshold writes the negative ones
    out_sel = torch.zeros(order.numel(), dtype=torch.int8, device=dev)
    own_buf = torch.zeros_like(scores_o) if others else None
    thr = torch.empty(n_groups, 2, dtype=torch.float32, device=dev)
    thr[:, 0] = math.nan
    thr[:, 1] = group_eta(batch.opts.eta, batch.n_pos, batch.n_resp, batch.group_active)
    select = (thr, adv_o, out_adv, out_sel)

    gs = plan.groups
    paths = [path] * len(gs) if path else choose_paths([g.nv for g in gs], [g.npos for g in gs], [g.n for g in gs], k.d,
                                                       batch.opts.score_positive, others)
    elem = torch.empty(0, dtype=err_dtype(wd)).element_size()  # the error buffer's
    m_elem = torch.empty(0, dtype=m_dtype(wd)).element_size()
    chunks = _plan_chunks(plan, paths, k.d, elem, m_elem, budget or SCRATCH_BYTES)
    staging = _Staging()
    parts = [(staging.segments(c.pos), staging.segments(c.neg), staging.segments(c.resp), staging.put(c.groups),
              staging.put([x for r in zip(c.spans[0], c.spans[1]) for x in r]), staging.put(c.spans[2]))
             for c in chunks]
    dev_parts = staging.upload(dev)
    table = lambda i, rows: Segments(dev_parts[i].view(-1, int(SEG_WIDTH)), rows)  # noqa: E731

    for c, (i_pos, i_neg, i_resp, i_groups, i_spans, i_grp) in zip(chunks, parts):
        pos, neg = table(i_pos, c.pos), table(i_neg, c.neg)
        spans = dev_parts[i_spans].view(-1, 2)  # positive responses: (first token, tokens)
        gp = k.errors(pos)
        if c.kind == "factored":
            # anchors from the M pass: response i's score sum is <M, N_i>, its own part <N_i, N_i>
            m, sums = k.build_m(pos, gp, resp=table(i_resp, c.resp))
            sums = sums[:, 0] - sums[:, 1] if others else sums[:, 0]
            if batch.opts.score_positive:  # errors read back from the buffer the M pass used
                k.scores(pos, m, scores_o, gp=gp)
            del gp
        else:  # errors of every token of the group, then the pairwise kernel (positive tokens first)
            k.pair_scores(pos, gp, scores_o)
            anchor = scores_o
            if others:
                k.pair_scores(pos, gp, own_buf, resp=resp_o)
                anchor = scores_o - own_buf
            sums = span_sums(anchor, spans[:, 0], spans[:, 1])  # the positive responses' own tokens
        _chunk_tau(sums, spans[:, 1], dev_parts[i_grp], dev_parts[i_groups], thr, n_groups, batch.opts.beta)
        # pass 2: negative tokens, threshold and rescale fused
        if c.kind == "factored":
            k.scores(neg, m, scores_o, select=select)
            del m
        else:
            k.pair_scores(neg, gp, scores_o, select=select)
            del gp

    n = batch.n_tokens
    scores = torch.zeros(n, dtype=torch.float32, device=dev)
    scores[order] = scores_o
    selected = torch.zeros(n, dtype=torch.bool, device=dev)
    selected[order] = out_sel.to(torch.bool)
    token_adv = batch.adv[batch.tok_resp]
    token_adv[order] = out_adv
    return scores, selected, token_adv, thr[:, 0].contiguous(), thr[:, 1].contiguous()


def value_checks(batch, weight_all_rows: Optional[bool], idx: Optional[torch.Tensor]):
    """Validation's arithmetic on the Triton kernels (the hook :func:`~nthr_kernels.core.checks.validate_batch`
    documents): ``(norms, excess)``, with no host synchronisation. ``norms`` (unless ``weight_all_rows`` is
    None): float64 ``[2]``, the largest row norm of ``hidden`` at the canonical tokens and of the
    ``lm_head_weight`` rows read (all, or those of the completion ids), from float32 sums of squares (a
    float32 overflow or NaN gives inf, which sends validation to its exact scans). ``excess`` (unless
    ``idx`` is None): float64 ``[k]``, :func:`~nthr_kernels.core.checks.implied_vstar_mass` at the canonical
    tokens ``idx``: blocks of sampled tokens in group order, each block over its groups' ``V*`` (one weight
    tile for every token of the block). It replaces the torch blocks of the default path, whose many small
    launches took 17 of the 21 ms of host time of one validation at the qwen1.5b-step shape
    (``benchmarks/results/h200-2026-11-27-explore-run2-profile.txt``); one program per sampled token took
    2.9 ms of GPU time there, each reading its group's weight rows on its own (the kernel profile of
    ``h200-2026-11-27.json``)."""
    h, w = batch.hidden, batch.lm_head_weight
    d, dev, wd = h.shape[-1], batch.device, work_dtype(h, w)
    row_h = row_offsets(h, batch.tok_a, batch.tok_b)
    norms = excess = None
    if weight_all_rows is not None:
        def top(x, n, row, keep):
            out = torch.zeros(max(triton.cdiv(n, block_range("norm", wd, "BT")[0]), 1), dtype=torch.float32, device=dev)
            if n:
                launch("norm", lambda meta: (triton.cdiv(n, meta["BT"]),), wd, x, row, keep, out, n, d, x.stride(0), x.stride(-1))
            return out.max().double().sqrt()

        keep = None if weight_all_rows else weight_rows_read(batch.tok_ids, None, w.shape[0])
        norms = torch.stack([top(h, row_h.numel(), row_h, None), top(w, w.shape[0], None, keep)])
    if idx is not None:
        dk, lo, cnt = vstar_ranges(batch, idx)
        lse = torch.empty(idx.numel(), dtype=torch.float32, device=dev)
        if idx.numel():
            perm = torch.argsort(lo, stable=True)  # the sampled tokens in group order (V* ranges ascending)
            launch("implied", lambda meta: (triton.cdiv(idx.numel(), meta["BT"]),), wd, h, row_h[idx].contiguous(), w,
                   batch.tok_ids[idx].contiguous(), dk, lo.contiguous(), cnt.contiguous(), perm, lse, idx.numel(), d,
                   batch.vocab_size, h.stride(-1), w.stride(0), w.stride(1), float(batch.opts.temperature))
        excess = batch.gather(batch.old_logprobs, idx).double() + lse.double()
    return norms, excess


nthr_advantages.reads_pending = True  # plan_on_device reads batch.pending with the plan sizes
nthr_advantages.value_checks = value_checks  # read by nthr_kernels.library: validation's arithmetic
