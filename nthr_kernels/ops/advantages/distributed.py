"""NTHR for rollout batches whose prompt groups are spread over the ranks of a ``torch.distributed`` group.

Each rank passes only its own, whole responses with *global* group ids. The result on every rank equals
the single-process result on the concatenated batch (up to the floating-point reduction order of the
all-reduced ``M``, see below); each rank gets the token-level outputs of its own responses and the
per-group outputs (``group_ids``, ``tau``, ``eta``, ``active``) of *all* groups, ordered by global id.

Algorithm (the factored form of the torch backend; every rank issues the same collectives in the same order):

1. Every rank runs every check (those of the single-process path and those of this one: ``group_ids``
   required, ``group_size`` refused, backend, ``comm_stats``) without raising, then one ``all_gather`` of a
   small descriptor (validation status, ``d``, ``|V|``, temperature, beta, anchor, eta, the longest local
   positive response and largest local hidden row norm, number of local groups). If any rank failed, one
   more ``all_gather_object`` shares the first failing rank's error and every rank raises it (same type,
   same message, with the rank named); if all agree, no rank raises later on its inputs. Then every rank
   checks that the shared scalars agree.
2. ``all_gather`` of the local sorted group ids: every rank knows the global sorted list of groups,
   including those it holds no response of.
3. ``all_reduce(SUM)`` of the per-group statistics ``[responses, positive responses, positive tokens,
   present]`` (int64): ``N+``, ``G``, ``p``, "mixed with a positive token" and "held by several ranks"
   (*shared*) are global. With ``check_finite``, the scores' float32 range (docs/NTHR.md, "Input contract")
   is checked on these global ``T+_g`` and the descriptor's maxima, as one process checks the whole batch
   (each rank's own check sees only its share of a group's positive tokens); only where it fails on the
   float32 norms does an ``all_gather`` (stage ``score_range``) bring the exact float64 norms, and every
   rank raises the same error where those confirm it.
4. ``V*``: ``all_gather`` of each rank's per-group count of local unique ids (int64 ``[n_active]``), then
   ``all_gather`` of the local ``(group, id)`` keys of the shared groups only (int32 when
   ``n_active * |V|`` fits, else int64); ``V*`` of a shared group is the union. A group held by a single
   rank needs no ids from anyone: the other ranks only need its size (from the counts) so that every
   rank walks the same chunks.
5. Per chunk, the rows of ``M = sum_{u in P} g_u h_u^T`` (float32) that belong to shared groups are
   ``all_reduce(SUM)``-ed (valid rows only, the chunk padding is not sent); unshared groups skip it.
6. Every rank scores its own tokens, computes its positive anchors, and the per-group minimum anchor is
   ``all_reduce(MIN)``-ed (float64 ``[n_groups]``) before ``tau``.

Bytes each rank contributes per call, by stage: :func:`payload_bytes` (the formula, evaluated from the
full batch and the rank of every response); :class:`CommStats` records what was actually sent, and
tests/test_distributed.py checks that the two agree. Figures for the qwen1.5b-step shape:
``python -m benchmarks.distributed_bytes`` (benchmarks/results/distributed-bytes.json, README.md).

Timeouts. The agreement above covers every rank that calls this function. A rank that dies, hangs or
never calls (e.g. it raised in its own code before the call) leaves the others blocked in the first
collective until the process group's timeout (``timeout=`` of ``torch.distributed.init_process_group``;
by default ``torch.distributed.constants.default_pg_timeout``, 30 minutes, for gloo and
``default_pg_nccl_timeout``, 10 minutes per the PyTorch documentation, for NCCL), after which they raise
torch.distributed's error. tests/test_distributed.py runs with a 20 s timeout.

Tolerance. Groups held by one rank are computed by the same arithmetic as in one process (same chunks,
same block order) when each rank keeps the global relative order of its responses; shared groups sum
``M`` over ranks, so their scores differ from the single-process ones by float32 rounding
(relative ``~1e-6`` of ``sum_u |<g_u, g_t>| |<h_u, h_t>|``). A negative token whose score lies within that
distance of ``tau`` may be selected differently; all else is identical.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.distributed as dist

from ...core.checks import (check_backend, hidden_norm_top, score_range_error, score_range_fails, score_terms,
                            several_rewards_error, validate_batch)
from ...core.plan import finish, make_plan
from ...core.rules import ANCHORS, ETA_NAMES, SCRATCH_ELEMS, Inputs, NTHRResult, Options
from . import torch_impl

__all__ = ["CommStats", "Payload", "nthr_advantages_distributed", "payload_bytes"]

# ok, d, vocab, temperature, beta, anchor index, eta kind, eta value, reward_threshold (inf: None),
# score_positive, check_finite, check_logprobs, the longest local positive response and the largest local
# hidden row norm (for the scores' float32 range, with check_finite), the local reward above and the one at or
# below reward_threshold (NaN: none here, or no threshold; one process allows one value on each side over the
# whole batch), local group count
_DESC = 17
_POS_LEN, _TOP_H, _REW_HI, _REW_LO = _DESC - 5, _DESC - 4, _DESC - 3, _DESC - 2


@dataclass
class CommStats:
    """Collectives issued by this rank in one call: ``(op, dtype, numel, payload_bytes)`` each.

    ``payload_bytes`` is the size of the tensor this rank contributes (for an all-gather, its own
    slice). ``bytes_by_stage`` sums them per stage name.
    """

    world_size: int = 1
    calls: list = field(default_factory=list)

    def record(self, stage: str, op: str, t: torch.Tensor) -> None:
        self.calls.append((stage, op, str(t.dtype).replace("torch.", ""), t.numel(), t.numel() * t.element_size()))

    @property
    def payload_bytes(self) -> int:
        return sum(c[4] for c in self.calls)

    @property
    def bytes_by_stage(self) -> dict:
        out: dict = {}
        for c in self.calls:
            out[c[0]] = out.get(c[0], 0) + c[4]
        return out


STAGES = ("descriptor", "group_ids", "group_stats", "vstar_counts", "vstar_keys", "M", "min_anchor")


@dataclass(frozen=True)
class Payload:
    """What :func:`payload_bytes` returns: ``stages`` (stage name -> bytes each rank contributes, every name
    of :data:`STAGES`, 0 where nothing is sent) and the group structure the bytes follow from."""

    stages: dict
    d: int
    vocab: int
    n_groups: int
    n_active: int  # active groups (mixed, with a positive token)
    n_shared: int  # active groups held by more than one rank
    vstar_shared: int  # sum of |V*_g| over the shared active groups
    k_shared: int  # the largest rank's count of local unique (group, id) pairs in shared active groups
    key_bytes: int  # 4 or 8: the dtype of the V* keys
    max_local_groups: int  # the largest rank's number of groups

    @property
    def total(self) -> int:
        return sum(self.stages.values())


def payload_bytes(
    token_ids: torch.Tensor,
    group_ids,
    rewards: torch.Tensor,
    owner,
    d: int,
    vocab: int,
    *,
    mask: Optional[torch.Tensor] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    reward_threshold: Optional[float] = None,
) -> Payload:
    """Bytes each rank contributes to the collectives of one :func:`nthr_advantages_distributed` call (the
    payload: a ring all-reduce moves about ``2 (W-1)/W`` times it per rank over the wire, an all-gather
    delivers ``W`` times it), computed from the *full* batch: ``token_ids`` with ``mask`` (padded) or
    ``cu_seqlens`` (packed), the global ``group_ids`` and ``rewards`` of every response, ``owner`` (the rank
    holding each response), the hidden size ``d`` and ``|V|``. Every rank sends the same amount::

        descriptor     136                      17 float64
        group_ids      8 * n_loc                int64, padded to the rank with most groups
        group_stats    32 * n_groups            4 int64 per group
        vstar_counts   8 * n_active             local |V*| count per active group
        vstar_keys     k * K_shared             V* keys of shared groups: k = 4 while n_active * |V| < 2**31,
                                                else 8; K_shared: the largest rank's count of local unique
                                                (group, id) pairs in shared active groups
        M              4 * d * sum_{g active, shared} |V*_g|   float32 rows, the dominant term
        min_anchor     8 * n_groups             float64

    A group is *shared* when responses of it sit on more than one rank; *active* as in the single-process
    path (mixed, some positive response has a token; the batch's own checks decide, with
    ``reward_threshold`` as there). With no active group the two V* stages send nothing.
    """
    with torch.no_grad():
        token_ids = torch.as_tensor(token_ids)
        n_resp = torch.as_tensor(rewards).shape[0]
        dev = token_ids.device
        x = Inputs(  # d = 1 zeros: the checks and the token list need shapes, not values
            torch.zeros(*token_ids.shape, 1, device=dev),
            token_ids,
            torch.as_tensor(rewards, device=dev),
            torch.zeros(n_resp, device=dev),
            lm_head_weight=torch.zeros(vocab, 1, device=dev),
            mask=mask,
            cu_seqlens=cu_seqlens,
            group_ids=group_ids,
        )
        batch = validate_batch(x, Options(reward_threshold=reward_threshold, check_finite=False, check_logprobs=False))
        owner = torch.as_tensor(owner, dtype=torch.int64, device=dev).reshape(-1)
        if owner.numel() != n_resp or (n_resp and int(owner.min()) < 0):
            raise ValueError(f"owner: expected {n_resp} ranks >= 0 (one per response), got {owner.tolist()[:8]}...")
        n_groups = batch.group_ids.numel()
        world = int(owner.max()) + 1 if n_resp else 1
        # (group, rank) pairs present: groups per rank, ranks per group
        pairs = torch.unique(batch.resp_group * world + owner)
        n_loc = int(torch.bincount(pairs % world, minlength=world).max()) if pairs.numel() else 0
        shared = torch.bincount(pairs // world, minlength=n_groups) > 1
        active = batch.group_active
        act_shared = active & shared
        n_active = int(active.sum())
        tok_group = batch.resp_group[batch.tok_resp]
        keys = torch.unique(tok_group * vocab + batch.tok_ids)
        vstar = torch.bincount(keys // vocab, minlength=n_groups)
        in_shared = act_shared[tok_group]
        gv = n_groups * vocab
        rank_keys = torch.unique((owner[batch.tok_resp][in_shared] * n_groups + tok_group[in_shared]) * vocab
                                 + batch.tok_ids[in_shared])
        k_shared = int(torch.bincount(rank_keys // gv, minlength=world).max()) if rank_keys.numel() else 0
        key_bytes = 4 if n_active * vocab < 2**31 else 8
        vstar_shared = int(vstar[act_shared].sum())
        stages = {
            "descriptor": 8 * _DESC,
            "group_ids": 8 * n_loc,
            "group_stats": 32 * n_groups,
            "vstar_counts": 8 * n_active,
            "vstar_keys": key_bytes * k_shared if n_active else 0,
            "M": 4 * d * vstar_shared,
            "min_anchor": 8 * n_groups,
        }
        return Payload(stages, d, vocab, n_groups, n_active, int(act_shared.sum()), vstar_shared, k_shared,
                       key_bytes, n_loc)


class _Comm:
    """The collectives, counted."""

    def __init__(self, group, stats: CommStats):
        self.group = group
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.stats = stats
        stats.world_size = self.world

    def all_gather(self, stage: str, t: torch.Tensor) -> torch.Tensor:
        """``[W, *t.shape]``: every rank's ``t`` (same shape on every rank)."""
        t = t.contiguous()
        self.stats.record(stage, "all_gather", t)
        out = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)

    def all_gather_var(self, stage: str, t: torch.Tensor, sizes: list) -> list:
        """Variable-length 1-D all-gather: ``t`` has ``sizes[rank]`` elements; padded to ``max(sizes)``."""
        n = max(sizes) if sizes else 0
        if n == 0:
            return [t.new_empty(0) for _ in sizes]
        pad = torch.zeros(n, dtype=t.dtype, device=t.device)
        pad[: t.numel()] = t
        rows = self.all_gather(stage, pad)
        return [rows[r, : sizes[r]] for r in range(self.world)]

    def all_reduce(self, stage: str, t: torch.Tensor, op) -> torch.Tensor:
        t = t.contiguous()
        self.stats.record(stage, "all_reduce", t)
        dist.all_reduce(t, op=op, group=self.group)
        return t


def _eta_code(eta) -> list:
    """``[kind, value]``: names by index, numbers by value, callables as one kind (not comparable)."""
    if isinstance(eta, str):
        return [0.0, float(ETA_NAMES.index(eta))]
    if callable(eta):
        return [2.0, 0.0]
    return [1.0, float(eta)]


def _descriptor(batch, rewards, dev) -> torch.Tensor:
    if batch is None:
        return torch.tensor([0.0] + [math.nan] * (_DESC - 2) + [0.0], dtype=torch.float64, device=dev)
    desc = torch.tensor(
        [
            1.0,
            float(batch.hidden.shape[-1]),
            float(batch.vocab_size),
            batch.opts.temperature,
            batch.opts.beta,
            float(ANCHORS.index(batch.opts.anchor)),
            *_eta_code(batch.opts.eta),
            math.inf if batch.opts.reward_threshold is None else batch.opts.reward_threshold,
            float(batch.opts.score_positive),
            float(batch.opts.check_finite),
            float(batch.opts.check_logprobs),
            0.0,  # _POS_LEN, _TOP_H, _REW_HI, _REW_LO: below
            0.0,
            math.nan,
            math.nan,
            float(batch.group_ids.numel()),
        ],
        dtype=torch.float64,
        device=dev,
    )
    if batch.opts.reward_threshold is not None and rewards.numel():  # validated: one value on each side here
        r = rewards.detach().to(torch.float64)
        for slot, side in ((_REW_HI, batch.positive), (_REW_LO, ~batch.positive)):
            if bool(side.any()):
                desc[slot] = r[side][0].to(dev)
    if batch.opts.check_finite:  # this rank's share of the scores' float32 range check (_check_score_range)
        pos_len = torch.bincount(batch.tok_resp, minlength=batch.positive.numel())[batch.positive]
        desc[_POS_LEN] = pos_len.max().to(dev) if pos_len.numel() else 0
        desc[_TOP_H] = hidden_norm_top(batch).to(dev)
    return desc


def _check_score_range(comm: "_Comm", batch, desc: torch.Tensor, pos_tok: torch.Tensor) -> None:
    """The float32 range of the scores and anchor sums (docs/NTHR.md, "Input contract") over the whole batch:
    a group's score sums run over its positive tokens on every rank, so the bound takes the global ``T+_g``
    (``pos_tok``, all-reduced), the longest positive response and the largest hidden row norm of all ranks
    (``desc``); each rank's own check saw only its share. Every rank decides alike from the same values;
    only where the float32 norms fail is the exact float64 norm gathered (one more collective, on every rank)."""
    terms = score_terms(pos_tok, desc[:, _POS_LEN])
    if not bool(score_range_fails(terms, desc[:, _TOP_H].max())):
        return
    exact = comm.all_gather("score_range", hidden_norm_top(batch, exact=True).reshape(1).to(desc.device))
    err = score_range_error(float(terms), float(exact.max()))
    if err is not None:
        raise err


def _check_call(x: Inputs, opts: Options, comm_stats) -> None:
    """The checks of this path on top of :func:`validate_batch`'s."""
    if x.group_size is not None:
        raise ValueError(
            "group_size: not accepted with process_group; pass the global group id of every local response in "
            "group_ids"
        )
    if x.group_ids is None:
        raise ValueError("group_ids: required with process_group (global group id of every local response)")
    backend = check_backend(opts.backend)
    if backend not in ("auto", "torch"):
        raise ValueError(f"backend: the distributed path runs on the torch backend ('auto' or 'torch'), got {backend!r}")
    if comm_stats is not None and not isinstance(comm_stats, CommStats):
        raise TypeError(f"comm_stats: expected a CommStats, got {type(comm_stats).__name__}")


def _comm_device(process_group, hidden) -> torch.device:
    """Where the descriptor lives: the device NCCL needs, else hidden's (cpu if hidden is unusable)."""
    if dist.get_backend(process_group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    if isinstance(hidden, torch.Tensor) and hidden.device.type != "meta":
        return hidden.device
    return torch.device("cpu")


def _agree(comm: "_Comm", desc: torch.Tensor, err: Optional[BaseException]) -> None:
    """Raise the same error on every rank if any rank's validation failed: the first failing rank's
    ``ValueError``/``TypeError`` (any other exception becomes a ``ValueError``) with its rank named."""
    bad = (desc[:, 0] == 0).nonzero().squeeze(1).tolist()
    if not bad:
        return
    mine = None if err is None else (type(err).__name__, str(err))
    got = [None] * comm.world
    dist.all_gather_object(got, mine, group=comm.group)
    kind, msg = got[bad[0]]
    exc = TypeError if kind == "TypeError" else ValueError
    raise exc(f"{msg} [rank {bad[0]} of process_group; failing ranks: {bad}]") from err


def _check_consistent(desc: torch.Tensor) -> None:
    """Raise (on every rank alike) unless every rank agrees on the shared scalars."""
    names = ("hidden (d)", "lm_head_weight/logits (|V|)", "temperature", "beta", "anchor", "eta", "eta",
             "reward_threshold", "score_positive", "check_finite", "check_logprobs")
    for j, name in enumerate(names, start=1):
        col = desc[:, j]
        if not bool((col == col[0]).all()):
            raise ValueError(f"{name}: differs between ranks of process_group: {col.tolist()}")
    threshold = float(desc[0, 8])
    for slot, name in ((_REW_HI, "above"), (_REW_LO, "at or below")):
        col = desc[:, slot]
        vals = torch.unique(col[~torch.isnan(col)])
        if vals.numel() > 1:  # as one process refuses the whole batch (core.checks.binary_positive)
            raise several_rewards_error(name, threshold, vals[:6].tolist(), " over the ranks of process_group")


def nthr_advantages_distributed(
    x: Inputs,
    opts: Options,
    process_group,
    *,
    budget: Optional[int] = None,
    comm_stats: Optional[CommStats] = None,
) -> NTHRResult:
    """:func:`nthr_kernels.nthr_advantages` over the ranks of ``process_group`` (a collective: every rank
    of the group must call it, with its own responses and their global ``group_ids``).

    Same arguments and result type as :func:`nthr_kernels.nthr_advantages`; ``group_size`` is refused
    (a rank's responses are not whole groups in general). Only the torch backend implements the
    collectives (``backend`` must be ``"auto"`` or ``"torch"``). ``comm_stats`` (a :class:`CommStats`)
    receives every collective this rank issued. The eta rule must be the same on every rank (a callable
    cannot be compared across ranks; names and numbers are checked).
    """
    # Only what makes communicating impossible raises before the first collective (no peer can be told).
    if process_group is None:
        raise ValueError("process_group: required (pass torch.distributed.group.WORLD for the default group)")
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("process_group: torch.distributed is not initialised")
    stats = comm_stats if isinstance(comm_stats, CommStats) else CommStats()
    comm = _Comm(process_group, stats)
    dev = _comm_device(process_group, x.hidden)
    budget = budget or SCRATCH_ELEMS

    with torch.no_grad():
        # ---- 1. validate locally; every rank learns whether all succeeded --------------------------------
        err, batch = None, None
        try:
            _check_call(x, opts, comm_stats)
            batch = validate_batch(x, opts)
        except Exception as e:  # noqa: BLE001 - raised below on every rank, after every rank has heard of it
            err = e
        desc = comm.all_gather("descriptor", _descriptor(batch, x.rewards, dev))
        _agree(comm, desc, err)
        _check_consistent(desc)

        # ---- 2. global group list ----------------------------------------------------------------------
        sizes = [int(x) for x in desc[:, _DESC - 1].tolist()]
        parts = comm.all_gather_var("group_ids", batch.group_ids, sizes)
        gids = torch.unique(torch.cat(parts)) if parts else batch.group_ids
        n_groups = gids.numel()
        loc2glob = torch.searchsorted(gids, batch.group_ids)
        resp_group = loc2glob[batch.resp_group]

        # ---- 3. global group statistics -----------------------------------------------------------------
        st = torch.zeros(n_groups, 4, dtype=torch.int64, device=dev)
        pos_tok = batch.positive[batch.tok_resp]
        st[:, 0] = torch.bincount(resp_group, minlength=n_groups)
        st[:, 1] = torch.bincount(resp_group[batch.positive], minlength=n_groups)
        st[:, 2] = torch.bincount(resp_group[batch.tok_resp][pos_tok], minlength=n_groups)
        st[:, 3] = (st[:, 0] > 0).to(torch.int64)
        st = comm.all_reduce("group_stats", st, dist.ReduceOp.SUM)
        if batch.opts.check_finite:
            _check_score_range(comm, batch, desc, st[:, 2])
        n_resp, n_pos, n_ranks = st[:, 0], st[:, 1], st[:, 3]
        active = (n_pos > 0) & (n_pos < n_resp) & (st[:, 2] > 0)
        shared_g = n_ranks > 1  # [n_groups]
        gb = dataclasses.replace(
            batch, resp_group=resp_group, group_ids=gids, n_pos=n_pos, n_resp=n_resp, group_active=active
        )

        # ---- 4. V* per active group (union over ranks for shared groups) ---------------------------------
        vocab = gb.vocab_size
        act_shared = shared_g[active]  # [n_act], dense active order (same as make_plan's)

        def vstar(grp_of, ids, n_g):
            if n_g == 0:  # no active group anywhere (the list is global): nothing to exchange
                return grp_of[:0], ids[:0]
            key_dtype = torch.int32 if n_g * vocab < 2**31 else torch.int64
            keys = torch.unique(grp_of * vocab + ids)
            kg = keys // vocab
            cnt = torch.bincount(kg, minlength=n_g)
            counts = comm.all_gather("vstar_counts", cnt)  # [W, n_g]
            mine = keys[act_shared[kg]].to(key_dtype)
            key_sizes = counts[:, act_shared].sum(1).tolist() if n_g else [0] * comm.world
            got = comm.all_gather_var("vstar_keys", mine, key_sizes)
            union = torch.unique(torch.cat(got).to(torch.int64)) if got else keys[:0]
            # unshared groups: the owner knows its ids; the others only need the count (placeholder id 0)
            own = keys[~act_shared[kg]]
            others = ~act_shared & (cnt == 0)
            n_other = counts.sum(0)[others]
            ph_group = torch.repeat_interleave(others.nonzero().squeeze(1), n_other)
            all_keys = torch.cat([union, own, ph_group * vocab])
            all_keys, _ = torch.sort(all_keys, stable=True)
            return all_keys // vocab, all_keys % vocab

        plan = make_plan(gb, lambda order: torch_impl.plan_normaliser(gb, order, budget), vstar=vstar)

        # ---- 5. scores with M all-reduced over the shared groups -----------------------------------------
        def reduce_m(m, k0, k1, c0, c1):
            sg = torch.arange(k0, k1, device=dev)
            cols = c0 + torch.arange(c1 - c0, device=dev)
            rows = (cols[None, :] < plan.vs_count[sg][:, None]) & act_shared[sg][:, None]
            if not bool(rows.any()):
                return m
            packed = comm.all_reduce("M", m[rows], dist.ReduceOp.SUM)
            m[rows] = packed
            return m

        scores, anchors = torch_impl.nthr_scores(gb, budget, plan, reduce_m)

        # ---- 6. anchors, tau (min over ranks), selection -------------------------------------------------
        def reduce_min(min_anchor):
            return comm.all_reduce("min_anchor", min_anchor.contiguous(), dist.ReduceOp.MIN)

        selected, token_adv, tau, eta_g = finish(gb, scores, anchors, reduce_min)
        return gb.result(scores, selected, token_adv, tau, eta_g)
