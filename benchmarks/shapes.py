"""Named benchmark shapes and their FLOP counts, shared by the CPU suites and the GPU suite.

``small`` and ``medium`` run on CPU; ``qwen1.5b-step`` is a GPU shape (a Qwen2.5-1.5B GRPO step: bf16,
|V| = 151936) and must not be built on CPU. FLOP counts (the quantities of ``docs/NTHR.md``), per
active group with ``T`` tokens, ``T+`` of them in positive responses, ``T- = T - T+``:

- the floor: ``2 |V*| d (2 T + T+)``, scoring every token the factored way (errors on ``V*`` for every
  token, ``M`` from the positive tokens, ``g_t^T M`` for every token);
- the algorithm run with ``score_positive=False`` (the default): ``2 |V*| d (T + T+ + T-)`` (errors,
  ``M = sum_i N_i``, ``g_t^T M`` for the negative tokens only) plus ``2 n+ |V*| d`` for the anchors
  ``<M, N_i>`` of the ``n+`` positive responses;
- the native backend's algorithm: the same, except that a group where the pairwise path is cheaper
  (``nthr_kernels.ops.advantages.native_impl.pairwise_group``: few positive tokens) costs
  ``2 |V*| d T`` (errors) plus ``2 T+ T (|V*| + d)`` (the positive tokens' products with every token);
- without ``old_logprobs`` all add ``2 N |V| d`` for the full-vocabulary normaliser;
- with ``logits`` given (the GPU suite's ``mid-fp32-logits``) neither the normaliser nor the errors on ``V*``
  multiply by ``d`` (they are read off the logits): the floor is ``2 |V*| d (T + T+)`` (``M``, then
  ``g_t^T M h_t`` for every token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from nthr_kernels.core.rules import pairwise_cost
from nthr_kernels.ops.advantages.native_impl import pairwise_group
from nthr_kernels.synthetic import RolloutBatch, make_batch


@dataclass(frozen=True)
class Shape:
    name: str
    n_groups: int
    group_size: int
    lengths: tuple[int, int]  # response lengths, uniform in [lo, hi]
    d: int
    vocab: int
    dtype: torch.dtype = torch.float32
    with_logprobs: bool = True  # the configuration the shape is meant for (CPU suites run both)
    seed: int = 0

    def batch(self, device: str | torch.device = "cpu", seed: Optional[int] = None) -> RolloutBatch:
        """The synthetic batch (padded layout, Zipf ids); ``old_logprobs`` are always present."""
        return make_batch(
            self.n_groups,
            self.group_size,
            self.lengths,
            self.d,
            self.vocab,
            seed=self.seed if seed is None else seed,
            dtype=self.dtype,
            device=device,
        )

    def describe(self) -> str:
        lo, hi = self.lengths
        return (
            f"{self.name}: {self.n_groups} groups x {self.group_size} responses x {lo}..{hi} tokens, "
            f"d={self.d}, |V|={self.vocab}, {str(self.dtype).replace('torch.', '')}"
        )


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in (
        Shape("small", 4, 8, (16, 48), 64, 2000),
        Shape("medium", 16, 8, (64, 192), 256, 32000),
        Shape("qwen1.5b-step", 64, 8, (256, 1792), 1536, 151936, dtype=torch.bfloat16),
    )
}
CPU_SHAPES = ("small", "medium")


@dataclass(frozen=True)
class Work:
    """Per-batch work counts of the active groups (mixed, with a positive token)."""

    n_active_tokens: int
    score_flops: int  # sum over active groups of 2 |V*| d (2 T + T+)
    lse_flops: int  # 2 N |V| d over the active tokens (the full normaliser)
    algorithm_score_flops: int = 0  # sum over active groups of 2 |V*| d (T + T+ + T-) + 2 n+ |V*| d
    native_score_flops: Optional[int] = None  # with the native backend's per-group pairwise path (batch_work(native=True))
    error_flops: int = 0  # sum over active groups of 2 |V*| d T: the logits on V* behind the errors

    def floor(self, with_logprobs: bool, logits: bool = False) -> int:
        """The floor with ``hidden`` + ``lm_head_weight`` (plus the normaliser without old log-probs); with
        ``logits`` given, without the errors' and the normaliser's products (the logits hold them)."""
        if logits:
            return self.score_flops - self.error_flops
        return self.score_flops + (0 if with_logprobs else self.lse_flops)

    def algorithm(self, with_logprobs: bool, native: bool = False) -> int:
        """FLOPs of the algorithm with ``score_positive=False`` (positive tokens not scored one by one); with
        ``native``, of the native backend's (per-group pairwise path)."""
        if native and self.native_score_flops is None:
            raise ValueError("native: batch_work(..., native=True) counts the native backend's FLOPs")
        return (self.native_score_flops if native else self.algorithm_score_flops) + (0 if with_logprobs else self.lse_flops)


def batch_work(rb: RolloutBatch, reward_threshold: float = 0.5, native: bool = False) -> Work:
    """FLOP floor of NTHR on a padded or packed :class:`RolloutBatch` (``group_size`` groups); with ``native``
    also the native backend's own count (which asks the built native library for its per-group path: the
    CPU suites only; the GPU suite would build the library for nothing)."""
    d, vocab = rb.lm_head_weight.shape[1], rb.lm_head_weight.shape[0]
    if rb.cu_seqlens is not None:
        lens = (rb.cu_seqlens[1:] - rb.cu_seqlens[:-1]).long().cpu()
        ids = rb.token_ids.cpu()
        starts = rb.cu_seqlens[:-1].long().cpu()
        resp_ids = [ids[int(s) : int(s) + int(n)] for s, n in zip(starts, lens)]
    else:
        mask, ids = rb.mask.cpu(), rb.token_ids.cpu()
        lens = mask.sum(1)
        resp_ids = [ids[r][mask[r]] for r in range(ids.shape[0])]
    positive = (rb.rewards.cpu().double() > reward_threshold).tolist()
    g_size = rb.group_size
    n_act = score = algorithm = native_flops = errors = 0
    for g in range(len(resp_ids) // g_size):
        rs = range(g * g_size, (g + 1) * g_size)
        n_pos = sum(positive[r] for r in rs)
        t_pos = sum(int(lens[r]) for r in rs if positive[r])
        if not (0 < n_pos < g_size) or t_pos == 0:
            continue
        t = sum(int(lens[r]) for r in rs)
        v_star = torch.unique(torch.cat([resp_ids[r] for r in rs])).numel()
        n_act += t
        score += 2 * v_star * d * (2 * t + t_pos)
        errors += 2 * v_star * d * t
        factored = 2 * v_star * d * (t + t_pos + (t - t_pos)) + 2 * n_pos * v_star * d
        algorithm += factored
        if native:
            native_flops += (2 * v_star * d * t + pairwise_cost(t_pos, t, v_star, d)
                             if pairwise_group(t_pos, t, v_star, d) else factored)
    return Work(n_act, score, 2 * n_act * vocab * d, algorithm, native_flops if native else None, errors)
