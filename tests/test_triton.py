"""The Triton path itself: host synchronisations per call, int64 offsets for huge strides, the record of
the measured code in the GPU results; on a CUDA machine also every GPU path against float64.

On a CPU-only machine the kernels run in the interpreter (``conftest.py``); with CUDA the same tests run
the compiled kernels on the GPU (``benchmarks/gpu_check.sh`` runs this file there).
"""
from __future__ import annotations

import dataclasses
import json
import re
import sys
import math
from pathlib import Path

import pytest
import torch

import nthr_kernels as nk
from nthr_kernels.registry import triton_available
from nthr_kernels.testing import HOST_SYNCS_PER_CALL, count_host_syncs

from _helpers import assert_matches_reference, case, group_of_tokens, run, stable_seed, validated

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import gpu_suite  # noqa: E402  (the sync counter and the kernel-source record the GPU suite writes)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="triton not available")
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")


def on_device(b):
    """The synthetic batch with its tensors on ``DEVICE``."""
    return dataclasses.replace(b, **{k: v.to(DEVICE) for k, v in vars(b).items() if isinstance(v, torch.Tensor)})


def triton_call(batch, **kw):
    from nthr_kernels.ops.advantages import triton_impl

    return triton_impl.nthr_advantages(batch, **kw)


# --------------------------------------------------------------------------------------------------
# anchors from the M pass, positive scores only when asked
# --------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("path", ["factored", "pairwise"])
@pytest.mark.parametrize("anchor", ["all", "others"])
@pytest.mark.parametrize("score_positive", [False, True])
def test_anchors_and_positive_scores(path, anchor, score_positive):
    """The factored path takes each positive response's anchor from the M pass (``<M, N_i>``, minus
    ``<N_i, N_i>`` for "others") and scores positive tokens only with ``score_positive=True``; tau and
    every score (positive ones included when asked) match the reference, also with one chunk per group."""
    b = on_device(case(seed=stable_seed(path, anchor, score_positive), n_groups=4, group_size=5, lengths=(0, 15), d=16,
                       vocab=61, holes=True))
    kw = dict(anchor=anchor, score_positive=score_positive, beta=0.7)
    ref = run(b, "reference", **kw)
    batch = validated(b, **kw)
    for budget in (None, 1):
        got = batch.result(*triton_call(batch, path=path, budget=budget))
        assert_matches_reference(got, ref, b)
        if score_positive:
            assert bool((got.scores[ref.scores != 0] != 0).all())


@needs_triton
@pytest.mark.parametrize("score_positive,anchor,picks", [
    (False, "all", "FFPF"), (True, "all", "FPPF"), (False, "others", "FFFF")])
def test_cost_model_counts_the_passes_each_call_runs(score_positive, anchor, picks, monkeypatch):
    """The call picks each group's path by its own options (core.rules.pairwise_cheaper): the factored path
    scores positive tokens only with ``score_positive``, and ``anchor="others"`` adds a pairwise pass over the
    positive tokens' own pairs. Group sizes (T+, T, |V*|) at d = 16: (13, 51, 26), (9, 34, 17), (8, 37, 17),
    (35, 46, 17); the old rule, ``2 T+ T (|V*| + d) < 2 |V*| d (T+ + T)`` for every call, picked "FPPF"."""
    from nthr_kernels.ops.advantages import triton_impl

    b = on_device(case(seed=15, n_groups=4, group_size=4, lengths=(4, 16), d=16, vocab=40))
    kw = dict(anchor=anchor, score_positive=score_positive)
    batch = validated(b, **kw)
    seen, plan_chunks = [], triton_impl._plan_chunks
    monkeypatch.setattr(triton_impl, "_plan_chunks", lambda plan, paths, *a: seen.append(paths) or plan_chunks(plan, paths, *a))
    got = batch.result(*triton_call(batch))
    assert "".join(p[0].upper() for p in seen[0]) == picks
    assert_matches_reference(got, run(b, "reference", **kw), b)


@needs_triton
def test_anchor_sums_do_not_depend_on_the_m_tiles():
    """The anchor pass: the M kernel writes each positive response's ``N_i`` (a response starting mid-way
    in a 16-column block of the error buffer, whose other columns hold values that must not leak in), then
    the anchor kernel sums them into ``M`` and forms ``<M, N_i>`` and ``<N_i, N_i>``. Launches with other
    tiles into the same buffers first (what the autotuner does) leave no trace: the same bits as a launch
    into fresh buffers; and every tiling agrees with float64."""
    import triton

    from nthr_kernels.ops import triton_kernels as tk

    g = torch.Generator().manual_seed(3)
    nv, npos, d, ld = 40, 21, 48, tk.round16(21)
    gp, h = torch.randn(nv * ld, generator=g).to(DEVICE), torch.randn(npos, d, generator=g).to(DEVICE)
    n_tiles = triton.cdiv(nv, 16) * triton.cdiv(d, 16)  # of the anchor launch below: each response's slots
    group = tk.Segment(0, nv, 0, npos, npos, 0, 0, 0, npos, 0, r0=0, nr=2)
    resp = [tk.Segment(0, nv, 0, npos, 9, 0, 0, 0, 0, 0, col0=0),  # rows 0..8, N_1 at 0
            tk.Segment(0, nv, 9, npos, 12, 0, nv * d, n_tiles, 0, 0, col0=9)]  # rows 9..20, N_2 at nv * d
    table, rtable = (torch.tensor([list(r) for r in rows], device=DEVICE) for rows in ([group], resp))
    row_h = torch.arange(npos, device=DEVICE) * d
    n_part = n_tiles * 2 * 2

    def buffers():  # N buffer, M, partial sums
        return torch.full((2 * nv * d,), math.nan, device=DEVICE), torch.empty(nv * d, device=DEVICE), torch.zeros(n_part, device=DEVICE)

    def anchor_pass(bufs, bv, bd, bu):
        nbuf, m, part = bufs
        tk._KERNELS["m"][(2 * triton.cdiv(nv, bv) * triton.cdiv(d, bd),)](
            gp, h, row_h, rtable, nbuf, d, nv, 1, BV=bv, BD=bd, BU=bu, ALIGN=False)
        tk._KERNELS["anchor"][(n_tiles,)](
            nbuf, table, rtable, m, part, d, nv, BV=16, BD=16, ALIGN=False)
        return m.clone(), part.view(2, -1, 2).sum(1)

    shared = buffers()
    for tiles in ((64, 32, 16), (32, 64, 32), (16, 16, 64), (16, 16, 16)):
        m, got = anchor_pass(shared, *tiles)
        m1, got1 = anchor_pass(buffers(), *tiles)
        assert torch.equal(m, m1) and torch.equal(got, got1), tiles
        e = gp.view(nv, ld)[:, :npos].double().cpu()
        m64 = e @ h.double().cpu()
        torch.testing.assert_close(m.double().cpu().view(nv, d), m64, rtol=1e-5, atol=1e-4)
        for i, (a, n) in enumerate(((0, 9), (9, 12))):
            n_i = e[:, a:a + n] @ h[a:a + n].double().cpu()
            want = torch.tensor([(m64 * n_i).sum(), (n_i * n_i).sum()], dtype=torch.float64)
            torch.testing.assert_close(got[i].double().cpu(), want, rtol=1e-5, atol=1e-4)


@needs_triton
def test_m_kernel_reads_only_its_rows_of_the_error_buffer():
    """score_tokens (factored, check_finite=False): a non-finite error of one negative row must not reach
    the other rows' scores (the M GEMM is over the positive rows only). The M kernel loads whole
    16-aligned blocks of the buffer; H rows outside its rows are zero, but 0 * inf is NaN."""
    from nthr_kernels.ops.score_tokens import triton_impl

    g = torch.Generator().manual_seed(0)
    tp, tn, v, d = 5, 4, 24, 16
    hp, hn = torch.randn(tp, d, generator=g), torch.randn(tn, d, generator=g)
    ep, en = torch.randn(tp, v, generator=g), torch.randn(tn, v, generator=g)
    en[0, 3] = math.inf  # the first negative row: buffer column tp, in the positive rows' last block
    want = ((ep.double() @ en.double().T) * (hp.double() @ hn.double().T)).sum(0)
    got = triton_impl.score_tokens(*(x.to(DEVICE) for x in (hp, hn, ep, en)), path="factored").cpu()
    assert torch.isfinite(got[1:]).all(), got
    torch.testing.assert_close(got[1:].double(), want[1:], rtol=1e-4, atol=1e-4)


@needs_triton
def test_anchor_partial_sums_fit_the_scratch_budget():
    """What build_m allocates for a chunk, its anchor partial sums included, fits the budget the chunk was
    planned within (plus TOKEN_BYTES per token, the peak gpu_suite checks): one group with a large V* and
    many groups of one-token responses over one id. (The sums once took the chunk's largest V*'s tile count
    for every response, outside the budget.)"""
    from nthr_kernels.core.checks import validate_batch
    from nthr_kernels.core.rules import TOKEN_BYTES, Inputs, Options
    from nthr_kernels.ops import triton_kernels as tk
    from nthr_kernels.ops.advantages import triton_impl

    g = torch.Generator().manual_seed(1)
    d, vocab, n_small = 64, 5000, 3000
    lens = [1, 400, 400, 400] + [1, 1, 1, 1] * n_small  # group 0: one 1-token positive, long negatives
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0] + [1.0, 1.0, 1.0, 0.0] * n_small)
    ids = torch.zeros(sum(lens), dtype=torch.int64)
    ids[:1201] = torch.randint(0, vocab, (1201,), generator=g)
    cu = torch.tensor([0] + lens).cumsum(0)
    h = torch.randn(sum(lens), d, generator=g)
    w = torch.randn(vocab, d, generator=g) * 0.1
    batch = validate_batch(Inputs(h, ids, rewards, rewards - 0.5, lm_head_weight=w, cu_seqlens=cu, group_size=4),
                           Options(backend="triton"))
    plan = triton_impl.plan_on_device(batch)
    g0 = plan.groups[0]
    budget = 8 * (g0.nv * d * 4 * 2 + g0.nv * 16 * 4)
    chunks = triton_impl._plan_chunks(plan, ["factored"] * len(plan.groups), d, 4, 4, budget)
    c = chunks[0]
    assert len(c.pos) > 1000
    # what build_m allocates for this chunk (its launches stubbed out: the sizes are what matters)
    allocated = []
    real_zeros, real_empty = torch.zeros, torch.empty

    def rec(f):
        def g(*a, **kw):
            t = f(*a, **kw)
            allocated.append(t.numel() * t.element_size())
            return t
        return g

    staging = triton_impl._Staging()
    i_pos, i_resp = staging.segments(c.pos), staging.segments(c.resp)
    dev_parts = staging.upload(torch.device("cpu"))
    seg = lambda i, rows: tk.Segments(dev_parts[i].view(-1, int(tk.SEG_WIDTH)), rows)  # noqa: E731
    k = tk.Kernels(h, torch.arange(h.shape[0]) * d, torch.float32, w=w)
    monkey = pytest.MonkeyPatch()
    monkey.setattr(tk, "launch", lambda *a, **kw: None)
    monkey.setattr(torch, "zeros", rec(real_zeros))
    monkey.setattr(torch, "empty", rec(real_empty))
    try:
        k.build_m(seg(i_pos, c.pos), real_zeros(1), resp=seg(i_resp, c.resp))
    finally:
        monkey.undo()
    errors = sum(r.nv * tk.round16(r.npos) * 4 for r in c.pos)
    tokens = sum(r.npos + r.nsc for r in c.neg)
    assert errors + sum(allocated) <= budget + TOKEN_BYTES * tokens, (errors, allocated, budget, TOKEN_BYTES * tokens)


def _scaled_group(seed=4):
    """Two mixed groups; group 0's hidden rows scaled by 1e6 and the weight by 1e-6 (group 0's logits are
    the original ones, group 1's about 1e-6 of them): every check passes, and group 0's anchor sums are
    about 1e12 times group 1's."""
    b = case(seed=seed, n_groups=2, group_size=4, lengths=(3, 9), d=16, vocab=41)
    h = b.hidden.clone()
    h[group_of_tokens(b) == 0] *= 1e6
    return on_device(dataclasses.replace(b, hidden=h, lm_head_weight=b.lm_head_weight * 1e-6))


@needs_triton
@pytest.mark.parametrize("anchor", ["all", "others"])
def test_factored_anchor_sums_do_not_depend_on_other_groups_in_the_chunk(anchor):
    """Each positive response's <M, N_i> (and <N_i, N_i>) is its own sum: a group's tau must not depend on
    the groups that share its chunk. (As differences of one float64 running total over the chunk's slots, a
    response's sum carried an error of ~1e-16 of that total: group 1's tau was 5e-4 off here, beyond the
    float32 tolerance.)"""
    b = _scaled_group()
    ref = run(b, "reference", with_logprobs=False, anchor=anchor)
    batch = validated(b, with_logprobs=False, anchor=anchor)
    for budget in (1, None):  # one chunk per group, then both groups in one chunk
        got = batch.result(*triton_call(batch, path="factored", budget=budget))
        assert_matches_reference(got, ref, b)


@needs_triton
@pytest.mark.parametrize("path", ["factored", "pairwise"])
def test_non_finite_anchor_stays_in_its_group(path):
    """check_finite=False with NaN in one positive hidden row of group 0: group 0's tau is NaN, the other
    groups' taus are those of the reference (as with one chunk per group, and as on the torch backend). A
    float64 running total over the chunk's slots (factored) or over every token of the call (pairwise)
    carried the NaN into every later response's sum."""
    b = on_device(case(seed=4, n_groups=3, group_size=4, lengths=(3, 9), d=16, vocab=41))
    pos = b.rewards[torch.arange(b.rewards.numel(), device=b.rewards.device)[:, None].expand_as(b.mask)] > 0
    r, t = ((group_of_tokens(b) == 0) & pos & b.mask).nonzero()[0].tolist()
    h = b.hidden.clone()
    h[r, t, 0] = math.nan
    b = dataclasses.replace(b, hidden=h)
    ref = run(b, "reference", check_finite=False)
    batch = validated(b, check_finite=False)
    for budget in (1, None):
        tau = batch.result(*triton_call(batch, path=path, budget=budget)).tau
        assert math.isnan(float(tau[0]))
        torch.testing.assert_close(tau[1:], ref.tau[1:], rtol=1e-5, atol=1e-6)


@needs_triton
@pytest.mark.parametrize("anchor", ["all", "others"])
def test_pairwise_anchor_sums_do_not_depend_on_other_groups(anchor):
    """The pairwise path's anchor sums are per response too: the same scaled batch as the factored test."""
    b = _scaled_group()
    ref = run(b, "reference", with_logprobs=False, anchor=anchor)
    batch = validated(b, with_logprobs=False, anchor=anchor)
    for budget in (1, None):
        assert_matches_reference(batch.result(*triton_call(batch, path="pairwise", budget=budget)), ref, b)


# --------------------------------------------------------------------------------------------------
# validation's arithmetic on the Triton kernels
# --------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("packed", [False, True])
def test_value_checks_match_the_torch_arithmetic(dtype, packed):
    """The Triton ``value_checks`` (row norms, the ``old_logprobs`` check's implied mass) give the values of
    the default torch arithmetic: the norms of the hidden rows at the completion tokens and of the weight
    rows read (all, or those of the completion ids), and ``implied_vstar_mass`` at the sampled tokens."""
    from nthr_kernels.core.checks import _max_row_norm, implied_vstar_mass, logprob_sample, weight_rows_read
    from nthr_kernels.ops.advantages import triton_impl

    # d = 72 and |V*| up to 97: two tiles of the interpreter's 64 on both loops of the implied-mass kernel
    b = on_device(case(seed=stable_seed(str(dtype), packed), n_groups=4, group_size=4, lengths=(0, 30), d=72, vocab=97,
                       dtype=dtype, packed=packed, holes=not packed))
    batch = validated(b)
    idx = logprob_sample(batch.tok_ids.numel(), batch.device)
    for all_rows in (True, False):
        norms, excess = triton_impl.value_checks(batch, all_rows, idx)
        rows = None if packed else b.mask
        top_w = _max_row_norm(batch.lm_head_weight, None if all_rows else weight_rows_read(batch.tok_ids, None, 97))
        want = torch.stack([_max_row_norm(batch.hidden, rows).double(), top_w.double()])
        torch.testing.assert_close(norms.cpu(), want.cpu(), rtol=1e-5, atol=0)
        torch.testing.assert_close(excess.cpu(), implied_vstar_mass(batch, idx).cpu(), rtol=0, atol=1e-4)
    assert triton_impl.value_checks(batch, None, None) == (None, None)


@needs_triton
def test_value_checks_refuse_what_the_torch_checks_refuse():
    """Through the public call on the Triton backend: NaN or inf at a completion position of ``hidden``, NaN
    in a weight row a completion token reads, and log-probs that do not belong to the hidden states raise
    ValueError naming the argument; NaN in padding and in unread weight rows does not."""
    b = on_device(case(seed=11, n_groups=3, group_size=4, lengths=(2, 12), d=16, vocab=53, holes=True))
    run(b, "triton")  # clean

    def with_(**kw):
        return dataclasses.replace(b, **kw)

    pos = b.mask.nonzero()[0]
    for bad in (math.nan, math.inf):
        h = b.hidden.clone()
        h[pos[0], pos[1], 3] = bad
        with pytest.raises(ValueError, match="hidden"):
            run(with_(hidden=h), "triton")
    pad = (~b.mask).nonzero()[0]
    h = b.hidden.clone()
    h[pad[0], pad[1], 0] = math.nan
    run(with_(hidden=h), "triton")
    w = b.lm_head_weight.clone()
    used = torch.zeros(53, dtype=torch.bool, device=w.device)
    used[b.token_ids[b.mask]] = True
    w[int(used.nonzero()[0]), 1] = math.nan
    with pytest.raises(ValueError, match="lm_head_weight"):
        run(with_(lm_head_weight=w), "triton")
    if not bool(used.all()):
        w = b.lm_head_weight.clone()
        w[int((~used).nonzero()[0]), 1] = math.nan
        run(with_(lm_head_weight=w), "triton")
    with pytest.raises(ValueError, match="old_logprobs"):
        run(with_(old_logprobs=torch.zeros_like(b.old_logprobs)), "triton")


@needs_triton
@pytest.mark.parametrize("variant", ["float64", "mixed", "w_strided", "vocab1", "temp", "many", "interleaved"])
def test_value_checks_edge_inputs(variant):
    """value_checks equals the torch arithmetic on edge inputs: float64, mixed dtypes, a weight with
    stride(1) != 1, a one-token vocabulary, T != 1, more tokens than LOGPROB_SAMPLE (packed), and many
    small groups whose responses are shuffled under arbitrary group ids (each block of sampled tokens of
    the check kernel then spans several groups, which are not neighbours in the token order)."""
    from nthr_kernels.core.checks import _max_row_norm, implied_vstar_mass, logprob_sample, weight_rows_read
    from nthr_kernels.ops.advantages import triton_impl

    kw = dict(n_groups=3, group_size=4, lengths=(0, 12), d=24, vocab=1 if variant == "vocab1" else 37, holes=True)
    if variant == "many":
        kw.update(n_groups=12, group_size=8, lengths=(5, 30), packed=True, holes=False)
    b = case(seed=5, temperature=0.7 if variant == "temp" else 1.0, **kw)
    if variant == "float64":
        b = dataclasses.replace(b, hidden=b.hidden.double(), lm_head_weight=b.lm_head_weight.double())
    if variant == "mixed":
        b = dataclasses.replace(b, hidden=b.hidden.to(torch.bfloat16))
    if variant == "w_strided":
        b = dataclasses.replace(b, lm_head_weight=b.lm_head_weight.t().contiguous().t())
    extra = {}
    if variant == "interleaved":
        b = case(seed=8, n_groups=40, group_size=3, lengths=(1, 5), d=24, vocab=37)
        perm = torch.randperm(b.rewards.numel(), generator=torch.Generator().manual_seed(7))
        b = dataclasses.replace(b, **{f: getattr(b, f)[perm] for f in ("hidden", "token_ids", "rewards", "advantages",
                                                                        "mask", "old_logprobs")})
        extra = dict(group_size=None, group_ids=(torch.arange(b.rewards.numel()) // 3 * 7919 % 1009)[perm].to(DEVICE))
    b = on_device(b)
    batch = validated(b, check_logprobs=False, **extra)
    idx = logprob_sample(batch.tok_ids.numel(), DEVICE)
    norms, excess = triton_impl.value_checks(batch, False, idx)
    torch.testing.assert_close(excess, implied_vstar_mass(batch, idx), rtol=0, atol=1e-4)
    want = torch.stack([_max_row_norm(batch.hidden.float(), None if b.mask is None else b.mask).double(),
                        _max_row_norm(batch.lm_head_weight.float(), weight_rows_read(batch.tok_ids, None, batch.vocab_size)).double()])
    torch.testing.assert_close(norms, want, rtol=1e-5, atol=0)


def test_gpu_check_steps_fit_one_device_call():
    """The steps of benchmarks/gpu_check.sh time out, all together, within one 10-minute command on the lent
    GPU machine (with a margin for the start of the script), so a slow step cannot cost the results of
    the others."""
    text = (ROOT / "benchmarks" / "gpu_check.sh").read_text()
    limits = [int(x) for x in re.findall(r"^\s*step [\w-]+ (\d+) ", text, flags=re.M)]
    assert len(limits) == 5 and sum(limits) <= 590, limits


@needs_triton
def test_only_kernels_without_tile_reductions_autotune():
    """A kernel that reduces a tile outside a tl.dot has one config in each table: on the GPU the order of
    that reduction follows the tile's layout (every block size, num_warps), so a pick by timing, which may
    differ between processes, would change the bits (it did on an H200: score and log-sum-exp with BT=128
    against 64). Only ``MULTI_CONFIG`` kernels, whose sums are tl.dot's own, list several; every kernel
    says which blocks set the tiles its running sums walk over."""
    from nthr_kernels.ops import triton_kernels as tk

    for table in (tk._TUNE_16, tk._TUNE_32):
        assert set(table) == set(tk._KERNELS)
        for name, (keys, configs) in table.items():
            if name in tk.MULTI_CONFIG:
                assert name not in tk.ORDER_BLOCKS, f"{name} reduces a tile: one config"
            else:
                assert name in tk.ORDER_BLOCKS, f"{name}: which blocks set its summation order?"
                assert len(configs) == 1, f"{name} reduces a tile outside a tl.dot: one config, not {len(configs)}"


_MULTI_CONFIG_CALLS = [("err", "factored"), ("m", "factored"), ("err", "pairwise")]


def test_every_autotuned_kernel_is_forced_through_its_configs():
    """The GPU test below covers every kernel that keeps several configs."""
    from nthr_kernels.ops import triton_kernels as tk

    assert {name for name, _ in _MULTI_CONFIG_CALLS} == set(tk.MULTI_CONFIG)


@needs_cuda
@pytest.mark.parametrize("name,path", _MULTI_CONFIG_CALLS)
def test_autotune_pick_does_not_change_the_bits(name, path):
    """Each config of an autotuned kernel's table, forced in turn, gives the bits of the first: its only
    sums are tl.dot's (one chain of MMAs on the accumulator in K order, whatever the tile and the step),
    which is what this checks on the GPU."""
    import gpu_stages

    from nthr_kernels.ops import triton_kernels as tk

    b = on_device(case(seed=12, n_groups=4, group_size=8, lengths=(40, 300), d=192, vocab=3000, dtype=torch.bfloat16))
    batch = validated(b, with_logprobs=True)
    keys, configs = tk._TUNE_16[name]
    assert len(configs) > 1
    first = None
    for cfg in configs:
        with gpu_stages.forced(tk, name, dict(zip(keys, cfg[:-2])), cfg[-2], cfg[-1]):
            scores, selected, _, tau, _ = triton_call(batch, path=path)
        got = (scores.cpu(), selected.cpu(), tau.cpu())
        if first is None:
            first = got
            continue
        assert torch.equal(got[0], first[0]) and torch.equal(got[1], first[1]), f"{name} {cfg}: other score bits"
        assert torch.equal(got[2].nan_to_num(), first[2].nan_to_num()), f"{name} {cfg}: other tau bits"


@needs_triton
def test_implied_mass_bits_do_not_depend_on_the_tokens_sharing_a_block():
    """A sampled token's implied log-sum-exp runs over the V* tiles at multiples of BV in the sorted keys,
    whichever sampled tokens share its block: the same token gives the same bits when only every second,
    or every third, sampled token is kept (every block then holds other neighbours, and the token another
    row). Integer-valued inputs
    make every logit exact (the interpreter's matmul sums in an order that depends on the tile's rows), so
    only the tiles of the log-sum-exp could change the bits."""
    from nthr_kernels.core.checks import implied_vstar_mass, logprob_sample
    from nthr_kernels.ops.advantages import triton_impl

    b = case(seed=3, n_groups=12, group_size=3, lengths=(2, 12), d=24, vocab=300, packed=True)
    g = torch.Generator().manual_seed(0)
    b = on_device(dataclasses.replace(
        b, hidden=torch.randint(-2, 3, b.hidden.shape, generator=g).float(),
        lm_head_weight=torch.randint(-2, 3, b.lm_head_weight.shape, generator=g).float() / 4))
    batch = validated(b, check_logprobs=False)
    idx = logprob_sample(batch.tok_ids.numel(), DEVICE)
    assert idx.numel() >= 4 * 16  # several blocks of the implied kernel (BT=16 in both tables and the interpreter)
    full = triton_impl.value_checks(batch, None, idx)[1]
    for keep in (slice(None, None, 2), slice(1, None, 3)):
        assert torch.equal(triton_impl.value_checks(batch, None, idx[keep])[1], full[keep])
    torch.testing.assert_close(full, implied_vstar_mass(batch, idx), rtol=0, atol=1e-4)


@needs_triton
def test_gpu_stages_forced_tiles_reach_every_caller_of_launch():
    """gpu_stages' sweeps force a tile on every module that imported ``launch`` (validation's kernels are
    launched from triton_impl, not from triton_kernels), and restore the table afterwards."""
    import gpu_stages

    from nthr_kernels.ops import triton_kernels as tk
    from nthr_kernels.ops.advantages import triton_impl

    orig = tk.launch
    assert triton_impl.launch is orig
    with gpu_stages.forced(tk, "implied", dict(BT=16, BV=16, BK=16), 4, 1):
        assert tk.launch is not orig and triton_impl.launch is tk.launch
    assert tk.launch is orig and triton_impl.launch is orig


@needs_triton
def test_gpu_stages_times_the_validation_of_the_triton_call(monkeypatch):
    """gpu_stages' validation column and host profile measure what the public Triton call runs (its
    value_checks kernels), not the default torch blocks of _implied_mass."""
    import gpu_stages

    from nthr_kernels.core import checks

    def torch_blocks(*a, **kw):
        raise AssertionError("validation ran the torch blocks (_implied_mass), not the Triton value_checks")

    monkeypatch.setattr(checks, "_implied_mass", torch_blocks)
    b = on_device(case(seed=2, n_groups=2, group_size=4, lengths=(1, 9), d=16, vocab=41))
    gpu_stages.validated(b, b.kwargs(with_logprobs=True))


# --------------------------------------------------------------------------------------------------
# host synchronisations
# --------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("path", ["factored", "pairwise", None])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
@pytest.mark.parametrize("anchor", ["all", "others"])
def test_host_syncs_per_call(path, source, anchor):
    """One host read plans the call; nothing else in the Triton implementation waits for the device
    (validation, which reads values by design, is outside: the batch is validated first)."""
    b = on_device(case(seed=stable_seed(path, source, anchor), n_groups=4, group_size=4, lengths=(0, 12), d=16,
                       vocab=53, holes=True))
    batch = validated(b, anchor=anchor, with_logprobs=source == "weight+logprobs", use_logits=source == "logits")
    for budget in (None, 1):  # one chunk, and one chunk per group
        triton_call(batch, path=path, budget=budget)  # warm-up (autotuning synchronises on a GPU)
        n, events = count_host_syncs(lambda: triton_call(batch, path=path, budget=budget))
        assert n <= HOST_SYNCS_PER_CALL, events


@needs_triton
@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
def test_host_syncs_per_public_call(layout, source):
    """The whole public call, validation and the old_logprobs check included: the checks are read in one
    copy and the check of old_logprobs rides with the plan's read, so at most two per call."""
    b = on_device(case(seed=stable_seed(layout, source), n_groups=5, group_size=4, lengths=(0, 12), d=16,
                       vocab=53, holes=layout == "padded", packed=layout == "packed"))
    call = lambda: run(b, "triton", with_logprobs=source == "weight+logprobs", use_logits=source == "logits")  # noqa: E731
    call()  # warm-up
    n, events = count_host_syncs(call)
    assert n <= HOST_SYNCS_PER_CALL, events


def test_sync_counter_sees_device_reads():
    """The counter of the test above counts each kind of read (so that test can fail)."""
    x = torch.arange(6.0, device=DEVICE)
    reads = [lambda: x.sum().item(), lambda: bool(x.any()), lambda: x[x > 2], lambda: torch.nonzero(x),
             lambda: x.tolist(), lambda: torch.unique(x), lambda: x[: int(x[2])], lambda: float(x[0]),
             lambda: torch.bincount(x.long()), lambda: x.long().repeat_interleave(x.long())]
    for read in reads:
        n, _ = count_host_syncs(read)
        assert n >= 1
    assert count_host_syncs(lambda: torch.cumsum(x, 0) * 2)[0] == 0


# --------------------------------------------------------------------------------------------------
# int64 offsets
# --------------------------------------------------------------------------------------------------
@needs_triton
@pytest.mark.parametrize("feature_stride", [1 << 30, (1 << 31) + 64])
@pytest.mark.parametrize("source", ["weight+logprobs", "weight"])
def test_huge_strides_read_the_right_rows(feature_stride, source):
    """Hidden states and lm_head as views whose feature stride is 2^30 (an int32 offset overflows from
    the third feature on) or above 2^31 elements, in one big empty storage (virtual memory: only the
    used elements are touched): the results equal the contiguous call's, bit for bit."""
    d = 3 if feature_stride < 1 << 31 else 2
    b = on_device(case(seed=81, n_groups=2, group_size=4, lengths=(1, 9), d=d, vocab=37, dtype=torch.float16))
    kw = dict(with_logprobs=source == "weight+logprobs")
    want = batch_result(b, **kw)
    r, t, _ = b.hidden.shape
    v = b.lm_head_weight.shape[0]
    storage = torch.empty((d - 1) * feature_stride + r * t + v, dtype=b.hidden.dtype, device=DEVICE)
    hidden = storage.as_strided((r, t, d), (t, 1, feature_stride))
    weight = storage.as_strided((v, d), (1, feature_stride), r * t)
    hidden.copy_(b.hidden)
    weight.copy_(b.lm_head_weight)
    strided = validated(dataclasses.replace(b, hidden=hidden, lm_head_weight=weight), **kw)
    assert strided.hidden.stride(-1) == strided.lm_head_weight.stride(-1) == feature_stride  # no copy on the way
    got = strided.result(*triton_call(strided))
    for name in ("scores", "selected", "token_advantages", "tau", "eta"):
        a, c = getattr(want, name), getattr(got, name)
        assert torch.equal(a.nan_to_num(7.0), c.nan_to_num(7.0)), name
    del storage, hidden, weight


def batch_result(b, **kw):
    batch = validated(b, **kw)
    return batch.result(*triton_call(batch))


@needs_triton
def test_one_token_vocabulary_with_logits_scores_zero():
    """|V| = 1 with ``logits`` at T != 1: every token is certain (p = 1, error 0, score exactly 0, nothing
    selected), as in the reference. The kernels apply z * (1/T) and took log Z from z / T: one ulp apart,
    scores of about 1e-12 above tau = 0 and 3 or 4 tokens selected."""
    b = on_device(case(seed=0, n_groups=3, group_size=4, lengths=(1, 9), d=8, vocab=1, temperature=0.3))
    for beta in (1.0, 0.0):
        ref = run(b, "reference", use_logits=True, beta=beta)
        got = run(b, "triton", use_logits=True, beta=beta)
        assert not bool(ref.selected.any()) and not bool(got.selected.any())
        assert bool((got.scores == 0).all())


@needs_triton
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("with_logprobs", [True, False], ids=["old_logprobs", "vocab_lse"])
def test_one_token_vocabulary_with_lm_head_scores_zero(temperature, with_logprobs):
    """|V| = 1 with ``lm_head_weight``: every token is certain, so every score is exactly 0 and nothing is
    selected, as in the reference. With old log-probs the kernels took the sampled token's probability
    from z_y summed in another order than log Z's (errors of about 1e-7, scores of 1e-12, tokens selected);
    it is now exp(l_t). Without them, the log-sum-exp kernel's z / T must round as the error kernels' does."""
    b = on_device(case(seed=3, n_groups=3, group_size=4, lengths=(1, 9), d=8, vocab=1, temperature=temperature))
    for beta in (1.0, 0.0):
        ref = run(b, "reference", with_logprobs=with_logprobs, beta=beta)
        got = run(b, "triton", with_logprobs=with_logprobs, beta=beta)
        assert not bool(ref.selected.any()) and not bool(got.selected.any())
        assert bool((got.scores == 0).all()), float(got.scores.abs().max())


def _near_certain_path_errors(args, kw, ref):
    """``(path, group, relative score error)`` of a :func:`_helpers.near_certain_call` batch on each Triton path
    against the reference result ``ref`` (:func:`_helpers.group_score_errors`)."""
    from nthr_kernels.core.checks import validate_batch
    from nthr_kernels.core.rules import Inputs, Options

    from _helpers import group_score_errors

    batch = validate_batch(Inputs(*args, lm_head_weight=kw.get("lm_head_weight"), logits=kw.get("logits"),
                                  old_logprobs=kw.get("old_logprobs"), mask=kw["mask"], group_size=kw["group_size"]),
                           Options(backend="triton", temperature=kw["temperature"]))
    for path in ("factored", "pairwise"):
        got = batch.result(*triton_call(batch, path=path))
        for grp, err in enumerate(group_score_errors(got, ref)):
            yield path, grp, err


@needs_triton
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
@pytest.mark.parametrize("seed,scale", [(37, 2.0), (13, 4.0)])
def test_near_certain_tokens_keep_their_small_errors(seed, scale, source):
    """|V| = 2 with large logits: a near-certain sampled token's error ``1 - pi(y_t)`` is ``-expm1(l_t)``, from
    the old log-prob or (without) from ``l_t = -softplus(L - z_y)``, ``L`` the log-sum-exp of the other tokens
    (:func:`_lse_kernel`, or torch over the logits rows). As ``1 - exp(l_t)`` in float32 it lost its digits to
    cancellation (relative score errors of 1.5e-3 and 0.5 with old log-probs in the interpreter), and as
    ``1 - exp(z_y / T - log Z)`` to the float32 ``log Z``'s rounding; against the float32 tolerance of 2e-4,
    both paths."""
    from nthr_kernels.core.rules import SCORE_TOLERANCE

    from _helpers import near_certain_call

    args, kw = near_certain_call(seed, scale, scale, DEVICE, source=source)
    ref = nk.nthr_advantages(*args, backend="reference", **kw)
    for path, grp, err in _near_certain_path_errors(args, kw, ref):
        assert err <= SCORE_TOLERANCE[torch.float32], f"{path}, group {grp}: relative score error {err:.2e}"


@needs_triton
@pytest.mark.parametrize("source", ["weight+logprobs", "weight", "logits"])
def test_fp16_near_certain_tokens_keep_their_small_errors(source):
    """fp16 inputs, |V| = 2 with large logits: in the second group every token is near-certain (errors of
    1e-8 and below, group scores of 2.3e-8). The error buffer of the M GEMM and of the pairwise kernel was
    fp16, where such errors are subnormal (below 6.1e-5) or 0 (below 3e-8): that group's scores were off by
    100 % of its largest on both paths and every source. The buffer is float32 for fp16 inputs
    (``triton_kernels.err_dtype``); the fp16 tolerance of the group's largest score, both paths."""
    from nthr_kernels.core.rules import SCORE_TOLERANCE

    from _helpers import near_certain_call

    args, kw = near_certain_call(13, 4.0, 4.0, DEVICE, source=source, dtype=torch.float16)
    ref = nk.nthr_advantages(*args, backend="reference", **kw)
    assert float(ref.scores[4:].abs().max()) < 1e-6  # the second group: near-certain tokens only
    for path, grp, err in _near_certain_path_errors(args, kw, ref):
        assert err <= SCORE_TOLERANCE[torch.float16], f"{path}, group {grp}: relative score error {err:.2e}"


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_near_certain_tokens_without_old_logprobs_take_log_z_from_one_tile(dtype):
    """|V| = 2 with very large logits (logit_scale 200) and no old log-probs: the sampled token's error comes
    from the log-sum-exp kernel's own tile (``z_y`` and the other tokens' ``L`` there, ``l = -softplus(L - z_y)``),
    not from ``z_y`` summed again by the error kernels in tiles of another shape. Their ``z_y`` differed by one
    float32 step (1e-5 at |z| of a few hundred; the interpreter's tile products are numpy matmuls, whose
    summation order follows the tile's shape): certain tokens got errors of 1e-5 (a probability of 1.0000152)
    and negative tokens scores of 2.5e-5 where the reference has -3.4e-7 and 5.8e-21. Then the float32
    ``log Z`` still halved the score of the last token (as on the torch backend); from ``l`` every score is
    within the input dtype's tolerance of the group's largest."""
    from nthr_kernels.core.rules import SCORE_TOLERANCE, group_advantages
    from nthr_kernels.synthetic import make_batch

    from _helpers import rewards_for

    b = make_batch(3, 2, (0, 5), 16, 2, seed=1107, dtype=dtype, packed=True, logit_scale=200.0)
    b.rewards = rewards_for("mixed", 3, 2, torch.Generator().manual_seed(2107))
    b.advantages = group_advantages(b.rewards, 2)
    b = on_device(b)
    ref = run(b, "reference", with_logprobs=False, beta=-math.inf)
    batch = validated(b, with_logprobs=False, beta=-math.inf)
    for path in ("factored", "pairwise"):
        got = batch.result(*triton_call(batch, path=path))
        s, s_ref = got.scores.double().cpu(), ref.scores.double().cpu()
        err = float((s - s_ref).abs().max() / s_ref.abs().max())
        assert err <= SCORE_TOLERANCE[dtype], (path, err, s.tolist(), s_ref.tolist())


@needs_triton
@pytest.mark.parametrize("source", ["weight+logprobs", "weight"])
def test_mixed_dtypes_compute_in_float32(source):
    """fp16 hidden states with a float32 weight holding values beyond fp16's range (within the contract:
    finite, in float32 range): the kernels work in float32. They used to cast the weight down to the hidden
    states' dtype: inf weights, NaN scores and tau, the group still marked active."""
    b = on_device(case(seed=82, n_groups=3, group_size=4, lengths=(1, 9), d=16, vocab=40))
    h, w = (b.hidden * 1e-4).half(), b.lm_head_weight * 1e5  # logits about 10x the original ones
    z = (h.float() @ w.T) / b.temperature
    lp = torch.log_softmax(z, -1).gather(-1, b.token_ids[..., None].long())[..., 0]  # exact for these inputs
    b = dataclasses.replace(b, hidden=h, lm_head_weight=w, old_logprobs=lp)
    kw = dict(with_logprobs=source == "weight+logprobs")
    ref = run(b, "reference", **kw)
    got = batch_result(b, **kw)
    assert torch.isfinite(got.tau[got.active]).all()
    assert_matches_reference(got, ref, b)


# --------------------------------------------------------------------------------------------------
# the kernels build for a GPU (compiled for sm_90 on the CPU: the interpreter does not compile them)
# --------------------------------------------------------------------------------------------------
@needs_triton
def test_kernels_compile_for_a_gpu_target():
    """The bf16 kernel variants of both paths (``gpu_suite.py --compile-only 90 --quick``) compile to
    cubin for sm_90 without a GPU; the full matrix (every dtype and source) is the same command without
    ``--quick``."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--compile-only", "90", "--quick"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert re.search(r"compiled [1-9]\d* kernel variants for sm_90", done.stdout)


# --------------------------------------------------------------------------------------------------
# the record of the measured code
# --------------------------------------------------------------------------------------------------
def test_newest_gpu_results_match_the_code_or_the_readme_says_they_predate_it():
    """The newest committed GPU results either record ``kernel_sources`` equal to the Triton path's
    sources now, or the README's GPU figures, which must come from that file, say they predate the code."""
    import gpu_readme

    results = gpu_readme.gpu_results()  # the GPU results files, oldest first (the README renders the newest)
    if not results:
        pytest.skip("no GPU results committed")
    newest = results[-1]
    recorded = json.loads(newest.read_text()).get("kernel_sources")
    readme = (ROOT / "README.md").read_text()
    perf = readme.split("## Performance", 1)[-1].split("\n## ", 1)[0]
    gpu_part = re.split(r"\n\nCPU\b", perf, maxsplit=1)[0]
    assert f"benchmarks/results/{newest.stem}" in gpu_part, f"the README's GPU figures do not come from {newest.name}"
    if recorded != gpu_suite.kernel_sources():
        assert "predate" in gpu_part, (
            f"{newest.name} measured other Triton sources than the code's (kernel_sources "
            f"{'missing' if recorded is None else 'differ'}) and the README does not say its GPU figures predate the code")


def test_kernel_sources_cover_the_triton_path():
    src = gpu_suite.kernel_sources()
    for path in ("nthr_kernels/ops/triton_kernels.py", "nthr_kernels/ops/advantages/triton_impl.py",
                 "nthr_kernels/ops/score_tokens/triton_impl.py", "nthr_kernels/core/rules.py"):
        assert re.fullmatch(r"[0-9a-f]{64}", src.pop(path))


# --------------------------------------------------------------------------------------------------
# every GPU path on the GPU (compiled kernels; skipped on CPU, where tests/test_backends.py runs them in
# the interpreter)
# --------------------------------------------------------------------------------------------------
GPU_CASES = [  # (path, anchor, dtype, source): every path, dtype, source and anchor at least once
    ("factored", "all", torch.bfloat16, "weight+logprobs"),
    ("factored", "others", torch.float16, "weight"),
    ("factored", "all", torch.float32, "logits"),
    ("pairwise", "others", torch.bfloat16, "weight+logprobs"),
    ("pairwise", "all", torch.float32, "weight"),
    ("pairwise", "all", torch.float16, "logits"),
    (None, "others", torch.float32, "weight+logprobs"),
    (None, "all", torch.bfloat16, "logits"),
]


@needs_cuda
@pytest.mark.parametrize("path,anchor,dtype,source", GPU_CASES,
                         ids=[f"{p}-{a}-{str(t)[6:]}-{s}" for p, a, t, s in GPU_CASES])
def test_gpu_paths_match_reference_and_repeat_bitwise(path, anchor, dtype, source):
    b = on_device(case(seed=stable_seed(path, anchor, str(dtype), source), n_groups=6, group_size=8, lengths=(0, 90),
                       d=64, vocab=500, dtype=dtype, holes=True))
    kw = dict(anchor=anchor, with_logprobs=source == "weight+logprobs", use_logits=source == "logits", beta=0.5)
    batch = validated(b, **kw)
    got = batch.result(*triton_call(batch, path=path))
    again = batch.result(*triton_call(batch, path=path))
    assert_matches_reference(got, run(b, "reference", **kw), b)
    for name in ("scores", "selected", "token_advantages"):
        assert torch.equal(getattr(got, name), getattr(again, name)), name


@needs_cuda
@pytest.mark.parametrize("path", ["factored", "pairwise"])
def test_gpu_score_tokens(path):
    from nthr_kernels.ops.score_tokens import reference, triton_impl

    g = torch.Generator(device=DEVICE).manual_seed(5)
    mk = lambda *s: torch.randn(*s, generator=g, device=DEVICE).to(torch.bfloat16)  # noqa: E731
    hp, hn, ep, en = mk(70, 64), mk(90, 64), mk(70, 300) * 0.1, mk(90, 300) * 0.1
    want = reference.factored_scores(hp, hn, ep, en)
    got = triton_impl.score_tokens(hp, hn, ep, en, path=path)
    assert float((got.double() - want).abs().max()) <= gpu_suite.MARGIN[torch.bfloat16] * float(want.abs().max())


@needs_cuda
def test_gpu_ops_layer_and_torch_compile():
    """``torch.ops.nthr.*`` on CUDA reaches the Triton implementation; ``torch.compile(fullgraph=True)``
    gives the eager bits."""
    b = on_device(case(seed=91, n_groups=3, group_size=4, lengths=(1, 20), d=32, vocab=101))

    def pipeline(hidden, w, lp):
        r = nk.nthr_advantages(hidden, b.token_ids, b.rewards, b.advantages, lm_head_weight=w, old_logprobs=lp,
                               mask=b.mask, group_size=b.group_size)
        return r.scores, r.selected, r.token_advantages, r.tau

    args = (b.hidden, b.lm_head_weight, b.old_logprobs)
    eager = pipeline(*args)
    assert_matches_reference(run(b, "triton"), run(b, "reference"), b)
    torch._dynamo.reset()
    compiled = torch.compile(pipeline, fullgraph=True)
    for e, c in zip(eager, compiled(*args)):
        assert torch.equal(e.nan_to_num(7.0), c.nan_to_num(7.0))
