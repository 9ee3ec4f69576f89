"""Distributed NTHR (gloo, CPU, 2 and 3 processes) against the single-process result on the same data.

One ``torch.multiprocessing.spawn`` per world size runs every case (process start-up dominates the cost);
each rank writes its outputs to a file and the tests compare them here.
"""
from __future__ import annotations

import datetime
import math
import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from nthr_kernels import nthr_advantages
from nthr_kernels.core.rules import Inputs, Options
from nthr_kernels.ops.advantages.distributed import STAGES, CommStats, payload_bytes
from nthr_kernels.synthetic import make_batch

D, VOCAB = 24, 200


# --------------------------------------------------------------------------------------------------
# cases: (name, batch builder kwargs, nthr kwargs, assignment rule)
# --------------------------------------------------------------------------------------------------
def _degenerate_lengths():
    # 8 groups of 4; group 5: the only positive response is empty; group 6: every response empty.
    lens = [int(x) for x in torch.randint(0, 30, (32,), generator=torch.Generator().manual_seed(5))]
    lens[20:24] = [0, 7, 9, 3]
    lens[24:28] = [0, 0, 0, 0]
    return lens


CASES = {
    # random assignment, padded layout with holes, old_logprobs shortcut
    "random_padded": dict(batch=dict(n_groups=10, group_size=5, lengths=(0, 40), holes=True, seed=3),
                          kw=dict(), assign="random"),
    # packed layout, anchor="others", beta=0, eta "1-p"
    "random_packed_others": dict(batch=dict(n_groups=9, group_size=4, lengths=(1, 30), packed=True, seed=2),
                                 kw=dict(anchor="others", beta=0.0, eta="1-p"), assign="random"),
    # logits instead of lm_head_weight, temperature 0.7, beta=-inf
    "random_logits": dict(batch=dict(n_groups=6, group_size=6, lengths=(2, 25), seed=3, temperature=0.7),
                          kw=dict(beta=-math.inf, eta=0.25, use_logits=True), assign="random"),
    # whole groups per rank, global order kept: bitwise identical to one process
    "unsplit_ordered": dict(batch=dict(n_groups=9, group_size=4, lengths=(0, 35), seed=4),
                            kw=dict(), assign="by_group"),
    # degenerate groups (all correct, all wrong, empty positive, all empty), contiguous split that cuts
    # a group, and (with 3 ranks) a rank that holds no response at all
    "degenerate": dict(batch=dict(n_groups=8, group_size=4, lengths=_degenerate_lengths(), seed=5,
                                  success=[1.0, 0.0, 0.5, 0.5, 1.0, 0.5, 0.5, 0.0]),
                       kw=dict(beta=0.0), assign="cut_inside_group"),
    # no active group anywhere
    "none_active": dict(batch=dict(n_groups=4, group_size=3, lengths=(1, 10), seed=6,
                                   success=[1.0, 0.0, 1.0, 0.0]),
                        kw=dict(), assign="random"),
    # lm_head_weight without old_logprobs: the full-vocabulary log Z and l_t on every rank, temperature 1.3
    "random_weight_no_logprobs": dict(batch=dict(n_groups=7, group_size=4, lengths=(1, 30), seed=7, temperature=1.3),
                                      kw=dict(no_logprobs=True), assign="random"),
}


def _full(case):
    spec = CASES[case]
    b = make_batch(d=D, vocab=VOCAB, **spec["batch"])
    if case == "degenerate":  # force the positive/empty structure regardless of the sampled rewards
        r = b.rewards.clone()
        r[20:24] = torch.tensor([1.0, 0.0, 0.0, 0.0])
        r[24:28] = torch.tensor([1.0, 0.0, 1.0, 0.0])
        b.rewards = r
    gid = torch.arange(b.rewards.numel()) // b.group_size * 7 + 100  # arbitrary global ids
    kw = dict(spec["kw"])
    use_logits = kw.pop("use_logits", False)
    src = dict(lm_head_weight=b.lm_head_weight, old_logprobs=b.old_logprobs)
    if kw.pop("no_logprobs", False):
        src = dict(lm_head_weight=b.lm_head_weight)
    if use_logits:
        src = dict(logits=b.hidden @ b.lm_head_weight.T)
    return b, gid, src, kw


def _assignment(case, n_resp, world):
    rule = CASES[case]["assign"]
    g = torch.Generator().manual_seed(list(CASES).index(case) * 10 + world)
    if rule == "random":
        return torch.randint(0, world, (n_resp,), generator=g)
    if rule == "by_group":
        gs = CASES[case]["batch"]["group_size"]
        return (torch.arange(n_resp) // gs) % world
    # rows [0, 14) on rank 0, the rest on rank 1 (cuts group 3 of size 4); with 3 ranks, rank 2 is empty
    return (torch.arange(n_resp) >= 14).to(torch.int64)


def _local(b, gid, src, rows):
    """The responses ``rows`` (sorted) of the full batch, in either layout."""
    if b.cu_seqlens is None:
        loc = dict(hidden=b.hidden[rows], token_ids=b.token_ids[rows], mask=b.mask[rows])
        for k, v in src.items():
            loc[k] = v if k == "lm_head_weight" else v[rows]
        return loc
    cu = b.cu_seqlens.to(torch.int64)
    tok = torch.cat([torch.arange(int(cu[r]), int(cu[r + 1])) for r in rows.tolist()] + [torch.zeros(0, dtype=torch.int64)])
    lens = (cu[1:] - cu[:-1])[rows]
    loc_cu = torch.zeros(rows.numel() + 1, dtype=torch.int32)
    loc_cu[1:] = torch.cumsum(lens, 0)
    loc = dict(hidden=b.hidden[tok], token_ids=b.token_ids[tok], cu_seqlens=loc_cu)
    for k, v in src.items():
        loc[k] = v if k == "lm_head_weight" else v[tok]
    return loc


def _rank_main(rank, world, init_file, path, body, timeout=None):
    """One rank of a spawned test: join gloo, run ``body(rank, world)`` on one thread, save what it returns to
    ``path``, wait for every rank, then leave without tearing gloo down: its teardown still aborted a rank
    ("terminate called without an active exception", about 1 run in 10 here, after both ranks had passed
    the barrier). On an error the group is destroyed and the error raised (mp.spawn reports it)."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timeout)
    try:
        torch.set_num_threads(1)
        torch.save(body(rank, world), path)
        dist.barrier()  # every rank has saved its results
    except BaseException:
        dist.destroy_process_group()
        raise
    os._exit(0)


def _results(rank, world):
    res = {}
    for case in CASES:
        b, gid, src, kw = _full(case)
        n_resp = b.rewards.numel()
        rows = (_assignment(case, n_resp, world) == rank).nonzero().squeeze(1)
        loc = _local(b, gid, src, rows)
        snap = {k: v.clone() for k, v in loc.items() if isinstance(v, torch.Tensor)}
        stats = CommStats()
        from nthr_kernels.ops.advantages.distributed import nthr_advantages_distributed

        x = Inputs(loc.pop("hidden"), loc.pop("token_ids"), b.rewards[rows], b.advantages[rows],
                   group_ids=gid[rows], **loc)
        opts = Options(temperature=b.temperature, **kw)
        r = nthr_advantages_distributed(x, opts, dist.group.WORLD, comm_stats=stats)
        unchanged = all(torch.equal(snap[k], v) for k, v in _local(b, gid, src, rows).items() if k in snap)
        res[case] = dict(rows=rows, result=r.__dict__, unchanged=unchanged, bytes=stats.payload_bytes,
                         stages=stats.bytes_by_stage, calls=stats.calls)
    # the public entry point dispatches to the same code
    b, gid, src, kw = _full("random_padded")
    rows = (_assignment("random_padded", b.rewards.numel(), world) == rank).nonzero().squeeze(1)
    loc = _local(b, gid, src, rows)
    r = nthr_advantages(loc.pop("hidden"), loc.pop("token_ids"), b.rewards[rows], b.advantages[rows],
                        group_ids=gid[rows], process_group=dist.group.WORLD, **loc)
    res["api"] = dict(result=r.__dict__)
    # errors: every rank raises, none hangs
    errs = {}
    try:  # rank 1's rewards have the wrong length
        n = rows.numel() + (1 if rank == 1 else 0)
        nthr_advantages(b.hidden[rows], b.token_ids[rows], torch.zeros(n), torch.zeros(n),
                        group_ids=gid[rows], process_group=dist.group.WORLD, mask=b.mask[rows],
                        lm_head_weight=b.lm_head_weight)
    except ValueError as e:
        errs["bad_rank"] = str(e)
    try:  # temperatures disagree
        nthr_advantages(b.hidden[rows], b.token_ids[rows], b.rewards[rows], b.advantages[rows],
                        group_ids=gid[rows], process_group=dist.group.WORLD, mask=b.mask[rows],
                        lm_head_weight=b.lm_head_weight, temperature=1.0 + rank)
    except ValueError as e:
        errs["temperature"] = str(e)
    res["errors"] = errs
    return res


def _worker(rank, world, init_file, out_dir):
    _rank_main(rank, world, init_file, os.path.join(out_dir, f"rank{rank}.pt"), _results)


def _spawn(world, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"dist{world}")
    mp.spawn(_worker, args=(world, str(d / "init"), str(d)), nprocs=world, join=True)
    return [torch.load(d / f"rank{r}.pt", weights_only=False) for r in range(world)]


@pytest.fixture(scope="module", params=[2, 3])
def ranks(request, tmp_path_factory):
    return _spawn(request.param, tmp_path_factory)


def _single(case):
    b, gid, src, kw = _full(case)
    lay = dict(mask=b.mask) if b.cu_seqlens is None else dict(cu_seqlens=b.cu_seqlens)
    return nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, group_ids=gid, backend="torch",
                           temperature=b.temperature, **src, **lay, **kw), b


def _merge(ranks, case, key, full_like):
    """Token-level output of every rank placed back into the full batch's layout."""
    b = _full(case)[0]
    out = torch.zeros_like(full_like)
    for r in ranks:
        rows, val = r[case]["rows"], r[case]["result"][key]
        if b.cu_seqlens is None:
            out[rows] = val
        else:
            cu = b.cu_seqlens.to(torch.int64)
            tok = torch.cat([torch.arange(int(cu[i]), int(cu[i + 1])) for i in rows.tolist()] + [torch.zeros(0, dtype=torch.int64)])
            out[tok] = val
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_matches_single_process(ranks, case):
    ref, b = _single(case)
    for r in ranks:
        assert r[case]["unchanged"], "the caller's tensors were modified"
        res = r[case]["result"]
        # per-group outputs: global, identical on every rank
        assert torch.equal(res["group_ids"], ref.group_ids)
        assert torch.equal(res["active"], ref.active)
        assert torch.equal(res["eta"], ref.eta)
        torch.testing.assert_close(res["tau"], ref.tau, rtol=1e-5, atol=1e-6, equal_nan=True)
    scores = _merge(ranks, case, "scores", ref.scores)
    scale = float(ref.scores.abs().max()) if ref.scores.numel() else 0.0
    tol = 1e-5 * max(scale, 1e-6)
    assert float((scores - ref.scores).abs().max()) <= tol if scores.numel() else True
    sel = _merge(ranks, case, "selected", ref.selected)
    adv = _merge(ranks, case, "token_advantages", ref.token_advantages)
    # selection may differ only for a token whose score is within the tolerance of its group's tau
    differ = sel != ref.selected
    if bool(differ.any()):
        gid = _full(case)[1]
        tau_resp = ref.tau[torch.searchsorted(ref.group_ids, gid)]
        if b.cu_seqlens is None:
            tau_tok = tau_resp[:, None].expand_as(ref.scores)
        else:
            tau_tok = torch.repeat_interleave(tau_resp, (b.cu_seqlens[1:] - b.cu_seqlens[:-1]).to(torch.int64))
        assert bool(((ref.scores - tau_tok).abs()[differ] <= tol).all()), "a selection differs far from tau"
    same = ~differ
    assert torch.equal(adv[same], ref.token_advantages[same])
    if case == "unsplit_ordered":  # same arithmetic as one process: bit for bit
        assert torch.equal(scores, ref.scores)
        for r in ranks:
            assert torch.equal(r[case]["result"]["tau"].nan_to_num(7.0), ref.tau.nan_to_num(7.0))
    if case in ("random_padded", "degenerate", "random_weight_no_logprobs"):  # able to fail: NTHR changed something
        assert bool(ref.selected.any()) and bool((ref.token_advantages != 0).any())
    if case == "degenerate":
        assert ref.active.tolist() == [False, False, True, True, False, False, False, False]
    if case == "none_active":
        assert not bool(ref.active.any()) and not bool(ref.selected.any())


def test_api_dispatch_equals_module(ranks):
    for r in ranks:
        for k, v in r["api"]["result"].items():
            assert torch.equal(v.nan_to_num(7.0) if v.is_floating_point() else v,
                               r["random_padded"]["result"][k].nan_to_num(7.0) if v.is_floating_point()
                               else r["random_padded"]["result"][k]), k


def test_errors_raise_on_every_rank(ranks):
    for i, r in enumerate(ranks):
        e = r["errors"]
        assert "temperature" in e["temperature"]
        assert e["bad_rank"].startswith("rewards:") and "[rank 1 of process_group" in e["bad_rank"]


def test_unshared_groups_send_no_matrix(ranks):
    # by_group keeps every group on one rank: no M, no keys; only the small bookkeeping collectives
    for r in ranks:
        st = r["unsplit_ordered"]["stages"]
        assert "M" not in st and st.get("vstar_keys", 0) == 0
        assert "M" in r["random_padded"]["stages"]


def test_uninitialised_process_group_refused():
    b = make_batch(2, 2, (1, 3), 4, 10)
    with pytest.raises(ValueError, match="process_group"):
        nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, lm_head_weight=b.lm_head_weight,
                        mask=b.mask, group_ids=[0, 0, 1, 1], process_group=object())


@pytest.mark.parametrize("case", list(CASES))
def test_bytes_match_formula(ranks, case):
    """payload_bytes (the formula of nthr_kernels.ops.advantages.distributed), evaluated on the full batch,
    equals what every rank's collectives sent, stage by stage."""
    ref, b = _single(case)
    gid = _full(case)[1]
    world = len(ranks)
    assert all([c[:4] for c in r[case]["calls"]] == [c[:4] for c in ranks[0][case]["calls"]] for r in ranks)
    owner = torch.zeros(gid.numel(), dtype=torch.int64)
    for i, r in enumerate(ranks):
        owner[r[case]["rows"]] = i
    lay = dict(mask=b.mask) if b.cu_seqlens is None else dict(cu_seqlens=b.cu_seqlens)
    p = payload_bytes(b.token_ids, gid, b.rewards, owner, D, VOCAB, **lay)
    # the structure it counts, against the single-process result and the placement
    assert p.n_groups == ref.group_ids.numel() and p.n_active == int(ref.active.sum())
    ranks_of = {g: set(owner[gid == g].tolist()) for g in ref.group_ids.tolist()}
    act = [g for g, a in zip(ref.group_ids.tolist(), ref.active.tolist()) if a]
    assert p.n_shared == sum(len(ranks_of[g]) > 1 for g in act)
    assert p.max_local_groups == max(sum(i in s for s in ranks_of.values()) for i in range(world))
    sent = {k: v for k, v in p.stages.items() if v}
    for r in ranks:
        assert {k: v for k, v in r[case]["stages"].items() if v} == sent, (r[case]["stages"], p)
        assert r[case]["bytes"] == p.total
    if case == "random_padded":  # every term is exercised
        assert set(sent) == set(STAGES)


# --------------------------------------------------------------------------------------------------
# finding 4: a bad argument on one rank raises the same clear error on every rank, within seconds
# --------------------------------------------------------------------------------------------------
def _shifted(lp):
    out = torch.zeros_like(lp)
    out[:, :-1] = lp[:, 1:]
    return out


def _beyond_float32(h):
    h = h.double()
    h[0, 0, 0] = 1e39
    return h


# rank 1's override of its own arguments -> (exception type, the argument its message starts with)
BAD_ON_RANK_1 = {
    "group_size given": (lambda k: k.update(group_size=4), ValueError, "group_size"),
    "group_ids missing": (lambda k: k.update(group_ids=None), ValueError, "group_ids"),
    "backend unknown": (lambda k: k.update(backend="gpu"), ValueError, "backend"),
    "backend not distributed": (lambda k: k.update(backend="reference"), ValueError, "backend"),
    "rewards shape": (lambda k: k.update(rewards=k["rewards"][:-1]), ValueError, "rewards"),
    "rewards not binary": (lambda k: k.update(rewards=k["rewards"] * 0.5 + 0.25), ValueError, "rewards"),
    "hidden dtype": (lambda k: k.update(hidden=k["hidden"].to(torch.int32)), TypeError, "hidden"),
    "hidden meta": (lambda k: k.update(hidden=k["hidden"].to("meta")), ValueError, "hidden"),
    "hidden beyond float32": (lambda k: k.update(hidden=_beyond_float32(k["hidden"])), ValueError, "hidden"),
    "mask missing": (lambda k: k.update(mask=None), ValueError, "mask"),
    "token id out of range": (lambda k: k.update(token_ids=k["token_ids"] + VOCAB), ValueError, "token_ids"),
    "temperature overflows": (lambda k: k.update(temperature=1e-8, old_logprobs=None), ValueError, "temperature"),
    "old_logprobs off by one": (lambda k: k.update(old_logprobs=_shifted(k["old_logprobs"])), ValueError,
                                "old_logprobs"),
    "eta out of range": (lambda k: k.update(eta=1.5), ValueError, "eta"),
    "anchor unknown": (lambda k: k.update(anchor="mine"), ValueError, "anchor"),
}


# options that are valid on each rank but differ between ranks -> the option the message names
DIFFERENT_ON_RANK_1 = {
    "beta": lambda k: k.update(beta=0.5),
    "eta": lambda k: k.update(eta="1-p"),
    "anchor": lambda k: k.update(anchor="others"),
    "reward_threshold": lambda k: k.update(reward_threshold=0.5),  # the same split of 0/1 rewards
    "score_positive": lambda k: k.update(score_positive=True),
    "check_finite": lambda k: k.update(check_finite=False),
    "check_logprobs": lambda k: k.update(check_logprobs=False),
}


# ||h||^2 as a share of FLOAT32_MAX: the scores' bound 2 T+ max|y_i| ||h||^2 is 4x the share over the whole
# group (T+ = 2), 2x on each rank (T+ = 1)
SCORE_RANGE = {"beyond": 0.35, "within": 0.2}


def _score_range_batch(share):
    """One group of four one-token responses: the positive ones (0, 2) sample id 0, the negative ones id 1,
    each sampled token improbable (``e = +-(1, -1)``, so ``|e_u . e_t| = 2``), every hidden row the same with
    ``||h||^2 = share * FLOAT32_MAX``: each score is ``2 T+ ||h||^2``, the bound itself."""
    c = math.sqrt(share * torch.finfo(torch.float32).max / 4)  # d = 4: ||h|| = 2c
    return dict(hidden=torch.full((4, 1, 4), c), token_ids=torch.tensor([[0], [1], [0], [1]]),
                rewards=torch.tensor([1.0, 0.0, 1.0, 0.0]), advantages=torch.tensor([1.0, -1.0, 1.0, -1.0]),
                logits=torch.tensor([[[0.0, 30.0]], [[30.0, 0.0]]]).repeat(2, 1, 1),
                mask=torch.ones(4, 1, dtype=torch.bool), group_ids=torch.zeros(4, dtype=torch.int64))


def _bad_arg_results(rank, world):
    b, gid, src, _ = _full("random_padded")
    rows = (_assignment("random_padded", b.rewards.numel(), world) == rank).nonzero().squeeze(1)
    out = {}
    cases = {**{n: m for n, (m, _, _) in BAD_ON_RANK_1.items()}, **{"differs: " + n: m for n, m in DIFFERENT_ON_RANK_1.items()}}
    for name, mutate in cases.items():
        kw = dict(_local(b, gid, src, rows), rewards=b.rewards[rows], advantages=b.advantages[rows],
                  group_ids=gid[rows])
        if rank == 1:
            mutate(kw)
        t0 = time.perf_counter()
        try:
            nthr_advantages(kw.pop("hidden"), kw.pop("token_ids"), kw.pop("rewards"), kw.pop("advantages"),
                            process_group=dist.group.WORLD, **kw)
            out[name] = ("no error", "", time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            out[name] = (type(e).__name__, str(e), time.perf_counter() - t0)
    # with reward_threshold, one value on each side over the whole batch: rank 0 scores wrong answers 0.2, rank 1
    # scores them 0.3 (each rank alone is binary); integer rewards beyond 2^53: rank 0 scores right answers
    # 2^53, rank 1 2^53 + 1 (the same float64)
    for name, rewards in (("rewards split over ranks", torch.where(b.rewards[rows] > 0.5, 0.9, 0.2 + 0.1 * rank)),
                          ("integer rewards beyond 2^53", torch.where(b.rewards[rows] > 0.5, 2**53 + rank, 0))):
        kw = dict(_local(b, gid, src, rows), advantages=b.advantages[rows], group_ids=gid[rows], reward_threshold=0.5)
        try:
            nthr_advantages(kw.pop("hidden"), kw.pop("token_ids"), rewards, kw.pop("advantages"),
                            process_group=dist.group.WORLD, **kw)
            out[name] = ("no error", "")
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            out[name] = (type(e).__name__, str(e))
    for case, share in SCORE_RANGE.items():  # rank r holds responses 2r and 2r + 1
        kw = {k: v[2 * rank : 2 * rank + 2] for k, v in _score_range_batch(share).items()}
        try:
            r = nthr_advantages(kw.pop("hidden"), kw.pop("token_ids"), kw.pop("rewards"), kw.pop("advantages"),
                                process_group=dist.group.WORLD, **kw)
            out["score range: " + case] = ("no error", "", r.__dict__)
        except Exception as e:  # noqa: BLE001 - recorded for the test to judge
            out["score range: " + case] = (type(e).__name__, str(e), None)
    return out


def _bad_arg_worker(rank, world, init_file, out_dir):
    # A short timeout: a rank left waiting in a collective fails the test within seconds instead of hanging.
    _rank_main(rank, world, init_file, os.path.join(out_dir, f"bad{rank}.pt"), _bad_arg_results,
               timeout=datetime.timedelta(seconds=20))


@pytest.fixture(scope="module")
def bad_arg_outcomes(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad_args")
    mp.spawn(_bad_arg_worker, args=(2, str(d / "init"), str(d)), nprocs=2, join=True)
    return [torch.load(d / f"bad{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.parametrize("case", list(BAD_ON_RANK_1))
def test_bad_argument_on_one_rank_raises_on_every_rank(bad_arg_outcomes, case):
    _, exc, name = BAD_ON_RANK_1[case]
    (kind0, msg0, t0), (kind1, msg1, t1) = (r[case] for r in bad_arg_outcomes)
    assert (kind0, msg0) == (kind1, msg1), "the ranks raised different errors"
    assert kind0 == exc.__name__ and msg0.startswith(name + ":"), msg0
    assert "[rank 1 of process_group" in msg0
    assert max(t0, t1) < 10.0, f"took {max(t0, t1):.1f} s"


@pytest.mark.parametrize("option", list(DIFFERENT_ON_RANK_1))
def test_options_that_differ_between_ranks_raise_on_every_rank(bad_arg_outcomes, option):
    # reward_threshold, score_positive and the check flags were not compared: ranks computed with different
    # rules without a word
    (kind0, msg0, _), (kind1, msg1, _) = (r["differs: " + option] for r in bad_arg_outcomes)
    assert (kind0, msg0) == (kind1, msg1), "the ranks raised different errors"
    assert kind0 == "ValueError" and msg0.startswith(f"{option}: differs between ranks"), msg0


@pytest.mark.parametrize("case", list(SCORE_RANGE))
def test_score_range_counts_the_positive_tokens_of_every_rank(bad_arg_outcomes, case):
    """The float32 range check of the scores (``2 max_g T+_g max_i |y_i| H^2``, docs/NTHR.md) takes the
    group's T+ over all ranks, as one process does: with T+ counted per rank it passed a group split over
    two ranks whose scores overflow (-inf scores, tau = inf, no error), which one process refuses."""
    b = _score_range_batch(SCORE_RANGE[case])
    try:
        single = nthr_advantages(b.pop("hidden"), b.pop("token_ids"), b.pop("rewards"), b.pop("advantages"),
                                 backend="torch", **b)
        want = ("no error", "")
    except ValueError as e:
        want = ("ValueError", str(e))
    for rank, r in enumerate(bad_arg_outcomes):
        kind, msg, res = r["score range: " + case]
        assert (kind, msg) == want
        if case == "within":
            assert torch.equal(res["scores"], single.scores[2 * rank : 2 * rank + 2])
            assert torch.equal(res["tau"], single.tau)
            assert bool(torch.isfinite(single.tau).all())
        else:
            assert msg.startswith("hidden: ") and "beyond float32 range" in msg


def test_rewards_with_several_values_on_one_side_over_the_ranks_are_refused(bad_arg_outcomes):
    """With ``reward_threshold``, one process refuses a batch with two distinct values on one side of it; the
    distributed path checked each rank's share alone and accepted the same batch split so that each rank saw
    one value per side (0.2 on rank 0, 0.3 on rank 1), scoring it as binary without a word."""
    b, gid, _, _ = _full("random_padded")
    owner = _assignment("random_padded", b.rewards.numel(), 2)
    assert bool((b.rewards[owner == 0] == 0).any()) and bool((b.rewards[owner == 1] == 0).any())
    rewards = torch.where(b.rewards > 0.5, 0.9, 0.2 + 0.1 * owner)
    with pytest.raises(ValueError) as single:
        nthr_advantages(b.hidden, b.token_ids, rewards, b.advantages, lm_head_weight=b.lm_head_weight, mask=b.mask,
                        group_ids=gid, reward_threshold=0.5)
    (kind0, msg0), (kind1, msg1) = (r["rewards split over ranks"] for r in bad_arg_outcomes)
    assert (kind0, msg0) == (kind1, msg1), "the ranks raised different errors"
    assert kind0 == "ValueError"
    want = str(single.value).split("got several")[0]
    assert msg0.startswith(want) and "process_group" in msg0, msg0


def test_integer_rewards_beyond_2_53_over_the_ranks_are_refused(bad_arg_outcomes):
    """The ranks compared their rewards as float64: 2^53 on rank 0 and 2^53 + 1 on rank 1, two values above
    reward_threshold, passed as one. Every rank refuses them, naming rewards, as one process does."""
    (kind0, msg0), (kind1, msg1) = (r["integer rewards beyond 2^53"] for r in bad_arg_outcomes)
    assert (kind0, msg0) == (kind1, msg1), "the ranks raised different errors"
    assert kind0 == "ValueError" and msg0.startswith("rewards: integer rewards"), msg0
