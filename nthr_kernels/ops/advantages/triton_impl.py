"""``nthr_advantages`` on the fused Triton kernels of :mod:`nthr_kernels.ops.triton_kernels` (the pipeline
is described there): planning, chunking within ``SCRATCH_BYTES``, the two score passes per chunk."""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton

from ...core.plan import group_tau, make_plan, runs
from ...core.rules import SCRATCH_BYTES, cheaper_path, group_eta, interpreting
from ..triton_kernels import _Kernels, _Rows, _dot_prec, _launch, _work_dtype, _zy_kernel
from .torch_impl import log_normaliser


def _log_z(batch, order: torch.Tensor, rows: _Rows, h: torch.Tensor, w, wd) -> torch.Tensor:
    """``log Z`` per token of ``order``: shortcut kernel, vocabulary logsumexp kernel, or (logits) torch."""
    n = order.numel()
    if batch.lm_head_weight is None:
        return log_normaliser(batch, order, 1 << 24)
    out = torch.empty(n, dtype=torch.float32, device=h.device)
    if n == 0:
        return out
    inv_t = 1.0 / batch.opts.temperature
    hs = rows.strides(h) + (h.stride(-1),)
    if batch.old_logprobs is not None:
        lp = batch.old_logprobs
        bt, bk = (16, 16) if interpreting() else (32, 128)
        _zy_kernel[(triton.cdiv(n, bt),)](
            h, rows.ta, rows.tb, *hs, w, w.stride(0), w.stride(1), batch.tok_ids[order].contiguous(),
            lp, *rows.strides(lp), out, n, inv_t, h.shape[-1], BT=bt, BK=bk,
        )
        return out
    _launch(
        "lse",
        lambda m_: (triton.cdiv(n, m_["BT"]),),
        (h, rows.ta, rows.tb) + hs + (w, w.stride(0), w.stride(1), out, n, w.shape[0], inv_t, h.shape[-1]),
        dict(UPCAST=interpreting() and wd == torch.bfloat16, PREC=_dot_prec(wd)),
        wd, dict(BT=16, BV=16, BK=16),
    )
    return out


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


def choose_paths(nv: list, t_pos: list, t_all: list, d: int) -> list:
    """Per group: "pairwise" iff ``2 T+ T (|V*| + d) < 2 |V*| d (T+ + T)``."""
    return [cheaper_path(p, t, v, d) for v, p, t in zip(nv, t_pos, t_all)]


def _ranges(start: torch.Tensor, length: torch.Tensor, total: int) -> torch.Tensor:
    """Concatenation of ``arange(start[i], start[i] + length[i])`` (``total = sum(length)``)."""
    if total == 0:
        return start.new_zeros(0)
    seg = torch.repeat_interleave(torch.arange(length.numel(), device=start.device), length)
    first = torch.cumsum(length, 0) - length
    return start[seg] + torch.arange(total, device=start.device) - first[seg]


def nthr_advantages(batch, budget: Optional[int] = None, path: Optional[str] = None):
    """Fused NTHR on the batch; returns canonical-order ``(scores, selected, token_adv, tau, eta)``.

    ``budget``: scratch bytes (default ``SCRATCH_BYTES``); ``path``: ``"factored"`` or ``"pairwise"`` for
    every group instead of the cost model (the tests compare both).
    """
    dev = batch.device
    wd = _work_dtype(batch.hidden.dtype)
    h = batch.hidden if batch.hidden.dtype == wd else batch.hidden.to(wd)
    w = batch.lm_head_weight
    if w is not None and w.dtype != wd:
        w = w.to(wd)
    rows_of = lambda order: _Rows(batch.tok_a[order], None if batch.tok_b is None else batch.tok_b[order])  # noqa: E731
    plan = make_plan(batch, lambda order: _log_z(batch, order, rows_of(order), h, w, wd))
    n_act = plan.order.numel()
    n_groups = batch.group_ids.numel()
    lg = batch.logits
    k = _Kernels(h, rows_of(plan.order), batch.tok_ids[plan.order].contiguous(), plan.log_z, w, lg,
                 1 if lg is not None else 0, wd, 1.0 / batch.opts.temperature, dev)
    elem = torch.empty(0, dtype=wd).element_size()
    m_elem = torch.empty(0, dtype=k.md).element_size()

    is_pos = batch.positive[batch.tok_resp[plan.order]]
    adv_o = batch.adv[batch.tok_resp[plan.order]].contiguous()
    scores_o = torch.zeros(n_act, dtype=torch.float32, device=dev)
    out_adv = adv_o.clone()
    out_sel = torch.zeros(n_act, dtype=torch.int8, device=dev)
    self_buf = torch.zeros(n_act, dtype=torch.float32, device=dev) if batch.opts.anchor == "others" else None
    eta_all = group_eta(batch.opts.eta, batch.n_pos, batch.n_resp, batch.group_active).to(torch.float32)
    tau_all = torch.full((n_groups,), math.nan, dtype=torch.float32, device=dev)

    # per-group sizes on the host once: launch grids and buffer sizes need no further device syncs
    h_nv, h_pos, h_len = plan.vs_count.tolist(), plan.g_pos.tolist(), plan.g_len.tolist()
    paths = [path] * len(h_nv) if path else choose_paths(h_nv, h_pos, h_len, k.d)
    resp_o = batch.tok_resp[plan.order].contiguous()
    r16 = lambda x: (x + 15) // 16 * 16  # noqa: E731
    for kind in ("factored", "pairwise"):
        ids = [i for i, pth in enumerate(paths) if pth == kind]
        if kind == "factored":
            need = [h_nv[i] * k.d * m_elem + h_nv[i] * r16(h_pos[i]) * elem for i in ids]
        else:
            need = [h_nv[i] * r16(h_len[i]) * elem for i in ids]
        for c0, c1 in _chunks(need, budget or SCRATCH_BYTES):
            ix = ids[c0:c1]
            ixt = torch.tensor(ix, dtype=torch.int64, device=dev)
            vs0, nv = plan.vs_start[ixt].contiguous(), plan.vs_count[ixt].contiguous()
            g0, gpos, glen = plan.g_start[ixt].contiguous(), plan.g_pos[ixt].contiguous(), plan.g_len[ixt].contiguous()
            nv_h, pos_h, len_h = [h_nv[i] for i in ix], [h_pos[i] for i in ix], [h_len[i] for i in ix]
            pos_idx = _ranges(g0, gpos, sum(pos_h))
            resp = resp_o[pos_idx]
            zero = torch.zeros_like(gpos)
            if kind == "factored":
                m, seg_m, errs = k.build_m(plan.vs_id, vs0, nv, g0, gpos, nv_h, pos_h)
                # pass 1: positive tokens (errors read back from the M pass) -> anchors -> tau
                k.scores(plan.vs_id, vs0, nv, seg_m, m, g0, gpos, max(pos_h), scores_o, errors=errs)
                del errs
                if batch.opts.anchor == "others" and pos_idx.numel():
                    # each positive response's own contribution: segments = responses, V* of their group
                    firsts, r_len = runs(resp)
                    r_start = pos_idx[firsts].contiguous()
                    where = torch.full((plan.g_start.numel(),), -1, dtype=torch.int64, device=dev)
                    where[ixt] = torch.arange(len(ix), device=dev)
                    loc = where[plan.grp_of[r_start]]
                    r_vs0, r_nv, r_len = vs0[loc].contiguous(), nv[loc].contiguous(), r_len.contiguous()
                    r_len_h, r_nv_h = r_len.tolist(), r_nv.tolist()
                    m_r, seg_m_r, errs_r = k.build_m(plan.vs_id, r_vs0, r_nv, r_start, r_len, r_nv_h, r_len_h)
                    k.scores(plan.vs_id, r_vs0, r_nv, seg_m_r, m_r, r_start, r_len, max(r_len_h), self_buf, errors=errs_r)
                    del m_r, errs_r
            else:
                # errors of every token of the group, then the pairwise kernel (positive tokens first)
                gp, seg_gp = k.errors(plan.vs_id, vs0, nv, g0, glen, nv_h, len_h)
                k.pair_scores(gp, seg_gp, nv, g0, glen, gpos, zero, gpos, max(pos_h), resp_o, scores_o)
                if batch.opts.anchor == "others" and pos_idx.numel():
                    k.pair_scores(gp, seg_gp, nv, g0, glen, gpos, zero, gpos, max(pos_h), resp_o, self_buf,
                                  self_only=True)
            anchor_vals = scores_o[pos_idx]
            if batch.opts.anchor == "others" and pos_idx.numel():
                anchor_vals = anchor_vals - self_buf[pos_idx]
            gb = plan.g_batch[ixt]
            tau_c = group_tau(anchor_vals, resp, batch.resp_group, n_groups, batch.opts.beta)[gb].to(torch.float32)
            tau_all[gb] = tau_c
            # pass 2: negative tokens, threshold and rescale fused
            select = (tau_c.contiguous(), eta_all[gb].contiguous(), adv_o, out_adv, out_sel)
            max_neg = max(a - b for a, b in zip(len_h, pos_h))
            if kind == "factored":
                k.scores(plan.vs_id, vs0, nv, seg_m, m, (g0 + gpos).contiguous(), (glen - gpos).contiguous(), max_neg,
                         scores_o, select)
                del m
            else:
                k.pair_scores(gp, seg_gp, nv, g0, glen, gpos, gpos, (glen - gpos).contiguous(), max_neg, resp_o,
                              scores_o, select)
                del gp

    n = batch.n_tokens
    scores = torch.zeros(n, dtype=torch.float32, device=dev)
    scores[plan.order] = scores_o
    selected = torch.zeros(n, dtype=torch.bool, device=dev)
    selected[plan.order] = out_sel.to(torch.bool) & ~is_pos
    token_adv = batch.adv[batch.tok_resp]
    token_adv[plan.order] = torch.where(is_pos, adv_o, out_adv)
    return scores, selected, token_adv, tau_all, eta_all
