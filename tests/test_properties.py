"""Property tests (hypothesis): permutation equivariance and the c^2 scaling of the scores."""
import math

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import nthr_kernels as nk
from _helpers import case

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(seed=st.integers(0, 10_000), n_groups=st.integers(1, 4), g=st.integers(2, 5), packed=st.booleans())
def test_permuting_responses_permutes_outputs(seed, n_groups, g, packed):
    b = case(seed=seed, n_groups=n_groups, group_size=g, lengths=(0, 7), d=6, vocab=19, pattern="random")
    R = b.rewards.numel()
    gids = torch.arange(R) // g
    perm = torch.randperm(R, generator=torch.Generator().manual_seed(seed))
    kw = dict(lm_head_weight=b.lm_head_weight, backend="torch", beta=0.0)
    base = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, mask=b.mask,
                              old_logprobs=b.old_logprobs, group_ids=gids, **kw)
    res = nk.nthr_advantages(b.hidden[perm], b.token_ids[perm], b.rewards[perm], b.advantages[perm], mask=b.mask[perm],
                             old_logprobs=b.old_logprobs[perm], group_ids=gids[perm], **kw)
    torch.testing.assert_close(res.scores, base.scores[perm], rtol=1e-4, atol=1e-4 * (1 + float(base.scores.abs().max())))
    assert torch.equal(res.active, base.active)
    torch.testing.assert_close(res.tau, base.tau, equal_nan=True, rtol=1e-4, atol=1e-3)
    # selection may only flip within rounding of tau
    flips = res.selected != base.selected[perm]
    if bool(flips.any()):
        t = base.tau[gids[perm]][:, None].expand_as(flips)
        assert bool(((res.scores - t).abs()[flips] <= 1e-3 * (1 + res.scores.abs().max())).all())


@SETTINGS
@given(seed=st.integers(0, 10_000), c=st.sampled_from([0.5, 2.0, 3.0, -1.0]))
def test_scaling_hidden_scales_scores_by_c_squared(seed, c):
    """With the errors held fixed (logits given), s(c h) = c^2 s(h)."""
    b = case(seed=seed, n_groups=2, group_size=4, lengths=(1, 7), d=6, vocab=19)
    logits = b.hidden @ b.lm_head_weight.T
    kw = dict(mask=b.mask, group_size=b.group_size, backend="torch", logits=logits)
    s1 = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, **kw).scores
    s2 = nk.nthr_advantages(b.hidden * c, b.token_ids, b.rewards, b.advantages, **kw).scores
    torch.testing.assert_close(s2, s1 * c * c, rtol=1e-4, atol=1e-4 * (1 + float(s1.abs().max()) * c * c))


@SETTINGS
@given(seed=st.integers(0, 10_000))
def test_permuting_groups_permutes_group_outputs(seed):
    b = case(seed=seed, n_groups=3, group_size=3, lengths=(0, 6), d=5, vocab=17, pattern="random")
    order = torch.randperm(3, generator=torch.Generator().manual_seed(seed))
    perm = torch.cat([torch.arange(int(o) * 3, int(o) * 3 + 3) for o in order])
    kw = dict(lm_head_weight=b.lm_head_weight, group_size=3, backend="torch")
    base = nk.nthr_advantages(b.hidden, b.token_ids, b.rewards, b.advantages, mask=b.mask, old_logprobs=b.old_logprobs, **kw)
    res = nk.nthr_advantages(b.hidden[perm], b.token_ids[perm], b.rewards[perm], b.advantages[perm], mask=b.mask[perm],
                             old_logprobs=b.old_logprobs[perm], **kw)
    torch.testing.assert_close(res.tau, base.tau[order], equal_nan=True)
    torch.testing.assert_close(res.eta, base.eta[order])
    assert torch.equal(res.active, base.active[order])
    torch.testing.assert_close(res.token_advantages, base.token_advantages[perm])
    assert not math.isnan(float(res.eta.sum()))
