"""Sampling, rewards, group advantages and the old-policy forward (hidden states + old log-probs)."""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace

import torch

from ..core.rules import group_advantages
from .task import AdditionTask, Problem

__all__ = ["Rollout", "sample_completions", "group_advantages", "old_policy_forward", "collect_rollout",
           "completion_logprobs", "capture_lm_head_inputs"]


@dataclass
class Rollout:
    """One rollout batch in the padded layout of ``nthr_advantages``.

    ``R = n_prompts * group_size`` responses; group ``g`` is rows ``g*G .. g*G+G-1``.
    """

    problems: list[Problem]          # one per group
    prompt_ids: torch.Tensor         # [R, P] int64 (all prompts have the same length P)
    completion_ids: torch.Tensor     # [R, L] int64, pad after <eos>
    mask: torch.Tensor               # [R, L] bool, True at completion tokens (<eos> included)
    rewards: torch.Tensor            # [R] float32 in {0, 1}
    advantages: torch.Tensor         # [R] float32, group-normalised
    group_size: int
    temperature: float = 1.0
    hidden: torch.Tensor | None = None        # [R, L, d] float32, lm_head input predicting each token
    old_logprobs: torch.Tensor | None = None  # [R, L] float32, temperature-scaled log pi_old(y_t)

    @property
    def n_groups(self) -> int:
        return self.rewards.shape[0] // self.group_size

    def mixed_groups(self) -> torch.Tensor:
        """[n_groups] bool: groups with at least one correct and one incorrect response."""
        pos = self.rewards.view(self.n_groups, self.group_size).sum(1)
        return (pos > 0) & (pos < self.group_size)

    def select_groups(self, groups) -> "Rollout":
        """A new rollout holding only the listed groups (in that order)."""
        groups = [int(g) for g in groups]
        G = self.group_size
        rows = torch.tensor([g * G + k for g in groups for k in range(G)], dtype=torch.long)
        pick = lambda t: None if t is None else t[rows]  # noqa: E731
        return replace(self, problems=[self.problems[g] for g in groups], prompt_ids=self.prompt_ids[rows],
                       completion_ids=self.completion_ids[rows], mask=self.mask[rows], rewards=self.rewards[rows],
                       advantages=self.advantages[rows], hidden=pick(self.hidden),
                       old_logprobs=pick(self.old_logprobs))


def _check_temperature(temperature) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a float, got {type(temperature).__name__}")
    if not (temperature > 0 and temperature < float("inf")):
        raise ValueError(f"temperature must be positive and finite, got {temperature}")
    return float(temperature)


@torch.no_grad()
def sample_completions(model, prompt_ids: torch.Tensor, *, max_new_tokens: int, eos_id: int, pad_id: int,
                       temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling from ``softmax(logits / T)`` with a KV cache; ``[R, max_new_tokens]``.

    Plain sampling (no top-k / top-p), so the sampled tokens follow exactly the policy whose
    log-probs :func:`old_policy_forward` reports. Positions after ``<eos>`` hold ``pad_id``.
    """
    from transformers import DynamicCache

    temperature = _check_temperature(temperature)
    if not isinstance(prompt_ids, torch.Tensor) or prompt_ids.dim() != 2 or prompt_ids.dtype != torch.long:
        raise TypeError("prompt_ids must be a 2-D int64 tensor [R, P]")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
    was_training = model.training
    model.eval()
    R = prompt_ids.shape[0]
    out = torch.full((R, max_new_tokens), pad_id, dtype=torch.long)
    done = torch.zeros(R, dtype=torch.bool)
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = DynamicCache()
    inp = prompt_ids
    for t in range(max_new_tokens):
        logits = model(input_ids=inp, use_cache=True, **{cache_kw: cache}).logits[:, -1, :].float()
        probs = torch.softmax(logits / temperature, dim=-1)
        nxt = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        out[:, t] = nxt
        done |= nxt == eos_id
        if bool(done.all()):
            break
        inp = nxt.unsqueeze(1)
    model.train(was_training)
    return out


def completion_mask(completion_ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """True up to and including the first ``<eos>`` (all True if there is none)."""
    is_eos = (completion_ids == eos_id).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # number of <eos> strictly before t
    return before == 0


class capture_lm_head_inputs:
    """Context manager: a forward pre-hook on ``model.lm_head`` that records its input.

    For Hugging Face causal LMs the lm_head input is ``last_hidden_state`` after the final norm; this
    records exactly what produced the logits, whatever the architecture does before the head.
    """

    def __init__(self, model) -> None:
        head = getattr(model, "lm_head", None)
        if not isinstance(head, torch.nn.Linear):
            raise TypeError("model must have an nn.Linear `lm_head` (a Hugging Face causal LM)")
        if head.bias is not None:
            raise ValueError("models with an lm_head bias are out of scope for NTHR (see NTHR.md)")
        self.head = head
        self.inputs: list[torch.Tensor] = []

    def __enter__(self):
        self._h = self.head.register_forward_pre_hook(lambda mod, args: self.inputs.append(args[0].detach()))
        return self

    def __exit__(self, *exc):
        self._h.remove()
        return False


def completion_logprobs(model, prompt_ids: torch.Tensor, completion_ids: torch.Tensor, *,
                        temperature: float = 1.0, return_hidden: bool = False):
    """Per-token ``log softmax(logits / T)`` of the completion tokens, ``[R, L]`` (differentiable).

    Hidden position ``t`` predicts token ``t + 1``: the distribution of completion token ``k`` comes
    from absolute position ``P + k - 1``. With ``return_hidden=True`` also returns the lm_head inputs
    at those positions, ``[R, L, d]``.
    """
    temperature = _check_temperature(temperature)
    P, L = prompt_ids.shape[1], completion_ids.shape[1]
    ids = torch.cat([prompt_ids, completion_ids], dim=1)
    with capture_lm_head_inputs(model) as cap:
        logits = model(input_ids=ids).logits
    logits = logits[:, P - 1: P + L - 1, :].float() / temperature
    logp = torch.log_softmax(logits, dim=-1).gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1)
    if not return_hidden:
        return logp
    if len(cap.inputs) != 1:
        raise RuntimeError(f"expected one lm_head call per forward, saw {len(cap.inputs)}")
    hidden = cap.inputs[0][:, P - 1: P + L - 1, :]
    return logp, hidden


@torch.no_grad()
def old_policy_forward(model, rollout: Rollout) -> Rollout:
    """Fill ``rollout.hidden`` and ``rollout.old_logprobs`` from one no-grad forward of the old policy."""
    was_training = model.training
    model.eval()
    logp, hidden = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids,
                                       temperature=rollout.temperature, return_hidden=True)
    model.train(was_training)
    m = rollout.mask
    return replace(rollout, hidden=(hidden.float() * m.unsqueeze(-1)).contiguous(),
                   old_logprobs=torch.where(m, logp, torch.zeros_like(logp)).contiguous())


def collect_rollout(model, task: AdditionTask, problems: list[Problem], *, group_size: int = 8,
                    temperature: float = 1.0, generator: torch.Generator | None = None,
                    max_new_tokens: int | None = None) -> Rollout:
    """Sample ``group_size`` responses per problem, score them, and run the old-policy forward."""
    if not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size must be an int >= 2, got {group_size!r}")
    if not problems:
        raise ValueError("problems must be a non-empty list")
    tok = task.tokenizer
    prompts = task.prompt_ids(problems).repeat_interleave(group_size, dim=0)
    comp = sample_completions(model, prompts, max_new_tokens=max_new_tokens or task.max_completion_len,
                              eos_id=tok.eos_id, pad_id=tok.pad_id, temperature=temperature, generator=generator)
    mask = completion_mask(comp, tok.eos_id)
    # trim trailing all-padding columns
    width = int(mask.sum(1).max())
    comp, mask = comp[:, :width].contiguous(), mask[:, :width].contiguous()
    rewards = torch.tensor([task.reward(comp[i], problems[i // group_size]) for i in range(comp.shape[0])],
                           dtype=torch.float32)
    ro = Rollout(problems=list(problems), prompt_ids=prompts, completion_ids=comp, mask=mask, rewards=rewards,
                 advantages=group_advantages(rewards, group_size), group_size=group_size,
                 temperature=float(temperature))
    return old_policy_forward(model, ro)
