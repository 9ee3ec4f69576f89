"""Synthetic rollout batches shaped like a GRPO step (for tests, benchmarks and the demo).

Token ids are Zipf-distributed over the vocabulary (as in natural text); hidden states and the lm_head
weight are Gaussian, scaled so that logits have a realistic spread; ``old_logprobs`` are the exact
temperature-scaled log-probabilities of the sampled tokens under ``softmax(W h / T)``, computed in
float64 in vocabulary chunks.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .core.rules import group_advantages


@dataclass
class RolloutBatch:
    hidden: torch.Tensor  # [R, L, d] (padded) or [N, d] (packed)
    token_ids: torch.Tensor
    mask: Optional[torch.Tensor]
    cu_seqlens: Optional[torch.Tensor]
    rewards: torch.Tensor  # [R]
    advantages: torch.Tensor  # [R] float32, GRPO (r - mean) / (std + eps) per group
    lm_head_weight: torch.Tensor  # [V, d]
    old_logprobs: torch.Tensor  # layout of token_ids, float32
    group_size: int
    temperature: float

    def kwargs(self, *, with_logprobs: bool = True) -> dict:
        """Keyword arguments for :func:`nthr_kernels.nthr_advantages`."""
        kw = dict(lm_head_weight=self.lm_head_weight, group_size=self.group_size, temperature=self.temperature)
        if with_logprobs:
            kw["old_logprobs"] = self.old_logprobs
        if self.cu_seqlens is not None:
            kw["cu_seqlens"] = self.cu_seqlens
        else:
            kw["mask"] = self.mask
        return kw

    @property
    def n_tokens(self) -> int:
        return int(self.cu_seqlens[-1]) if self.cu_seqlens is not None else int(self.mask.sum())


def zipf_ids(n: int, vocab: int, generator: torch.Generator, s: float = 1.1) -> torch.Tensor:
    """``n`` ids in ``[0, vocab)`` with probability proportional to ``1 / (rank + 1) ** s`` (random ranks)."""
    w = 1.0 / torch.arange(1, vocab + 1, dtype=torch.float64) ** s
    ranks = torch.multinomial(w, n, replacement=True, generator=generator)
    perm = torch.randperm(vocab, generator=generator)
    return perm[ranks]


def _draw_tokens(g: torch.Generator, n_groups: int, group_size: int, lengths, vocab: int, success):
    """``(lengths [R] int64, rewards [R] float32, token ids [n] int64 in response order)`` from ``g``: the
    first draws of :func:`make_batch`, which depend on none of its other arguments."""
    n_resp = n_groups * group_size
    if isinstance(lengths, tuple) and len(lengths) == 2 and n_resp != 2:
        lens = torch.randint(lengths[0], lengths[1] + 1, (n_resp,), generator=g)
    else:
        lens = torch.as_tensor(list(lengths), dtype=torch.int64)
        if lens.numel() != n_resp:
            raise ValueError(f"lengths: expected {n_resp} lengths, got {lens.numel()}")
    n = int(lens.sum())
    p = torch.rand(n_groups, generator=g, dtype=torch.float64) if success is None else torch.as_tensor(success, dtype=torch.float64)
    rewards = (torch.rand(n_groups, group_size, generator=g, dtype=torch.float64) < p[:, None]).reshape(-1).to(torch.float32)
    return lens, rewards, zipf_ids(n, vocab, g)


def sample_tokens(
    n_groups: int,
    group_size: int,
    lengths: Sequence[int] | tuple[int, int],
    vocab: int,
    *,
    seed: int = 0,
    success: Optional[Sequence[float]] = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The response lengths ``[R]``, rewards ``[R]`` and token ids ``[n]`` (responses concatenated, the
    packed layout) that :func:`make_batch` draws with the same arguments and ``seed``, whatever its ``d``,
    ``dtype``, layout or device, without the hidden states, weight and ``old_logprobs`` (whose exact
    log-probabilities cost ``O(n |V| d)``)."""
    return _draw_tokens(torch.Generator().manual_seed(seed), n_groups, group_size, lengths, vocab, success)


def make_batch(
    n_groups: int,
    group_size: int,
    lengths: Sequence[int] | tuple[int, int],
    d: int,
    vocab: int,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    packed: bool = False,
    temperature: float = 1.0,
    success: Optional[Sequence[float]] = None,
    device: str | torch.device = "cpu",
    holes: bool = False,
    logit_scale: float = 4.0,
) -> RolloutBatch:
    """A random rollout batch.

    ``lengths``: an explicit list of ``n_groups * group_size`` response lengths, or a ``(lo, hi)`` range
    sampled uniformly. ``success``: per-group success probabilities (default uniform in [0, 1]).
    ``holes``: the padded mask gets a few interior holes (masked tool-output tokens).
    """
    g = torch.Generator().manual_seed(seed)
    n_resp = n_groups * group_size
    lens, rewards, ids = _draw_tokens(g, n_groups, group_size, lengths, vocab, success)
    n = int(lens.sum())
    adv = group_advantages(rewards, group_size)
    ids = ids.to(device)
    # Large tensors are drawn on the target device (CPU: float64, bit-reproducible from the seed).
    dev = torch.device(device)
    gd = torch.Generator(device=dev).manual_seed(seed)
    big = torch.float64 if dev.type == "cpu" else torch.float32
    w_lp = (torch.randn(vocab, d, generator=gd, dtype=big, device=dev) * (logit_scale / math.sqrt(d))).to(dtype)
    h_lp = torch.randn(n, d, generator=gd, dtype=big, device=dev).to(dtype)
    # exact log-probs of the sampled tokens under the (rounded) tensors the library will see
    lp = torch.empty(n, dtype=big, device=dev)
    wf, hf = w_lp.to(big), h_lp.to(big)
    step = max(1, (1 << 24) // vocab)
    for i in range(0, n, step):
        z = hf[i : i + step] @ wf.T / temperature
        lp[i : i + step] = z.gather(1, ids[i : i + step, None]).squeeze(1) - torch.logsumexp(z, -1)
    del wf, hf
    lp = lp.clamp_max(0.0).to(torch.float32)
    rewards, adv = rewards.to(dev), adv.to(dev)
    cu = torch.zeros(n_resp + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(lens, 0).to(torch.int32)
    if packed:
        return RolloutBatch(h_lp, ids, None, cu.to(dev), rewards, adv, w_lp, lp, group_size, temperature)
    holes_n = lens // 7 if holes else torch.zeros_like(lens)
    width = int((lens + holes_n).max()) if n_resp else 0
    resp = torch.repeat_interleave(torch.arange(n_resp), lens)
    col = torch.arange(n) - torch.repeat_interleave(cu[:-1].long(), lens)
    if holes:  # each response's tokens at a sorted random subset of its L + k columns
        col = torch.cat([
            torch.randperm(int(lens[r] + holes_n[r]), generator=g)[: int(lens[r])].sort().values for r in range(n_resp)
        ]) if n else col
    resp, col = resp.to(dev), col.to(dev)
    hid = torch.zeros(n_resp, width, d, dtype=dtype, device=dev)
    tid = torch.zeros(n_resp, width, dtype=torch.int64, device=dev)
    lpp = torch.zeros(n_resp, width, dtype=torch.float32, device=dev)
    mask = torch.zeros(n_resp, width, dtype=torch.bool, device=dev)
    hid[resp, col], tid[resp, col], lpp[resp, col], mask[resp, col] = h_lp, ids, lp, True
    return RolloutBatch(hid, tid, mask, None, rewards, adv, w_lp, lpp, group_size, temperature)
