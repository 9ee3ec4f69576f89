"""The GRPO update: per-method token advantages, the clipped surrogate loss, one step, a training loop."""

from __future__ import annotations

import math
import time

import torch

from . import seeds as _seeds
from .model import DEFAULT_SPEC, pretraining_problems, torch_threads
from .rollout import Rollout, collect_rollout, completion_logprobs
from .task import AdditionTask

__all__ = ["METHODS", "token_advantages", "policy_loss", "grpo_step", "evaluate", "train"]

METHODS = ("grpo", "pos_only", "random", "nthr")


def _check_method(method) -> str:
    if not isinstance(method, str):
        raise TypeError(f"method must be a str, got {type(method).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    return method


def nthr_result(model, rollout: Rollout, *, eta="2|0.5-p|", beta: float = 1.0, anchor: str = "all",
                backend: str = "auto"):
    """``nthr_kernels.nthr_advantages`` on a rollout (old-policy hidden states and log-probs)."""
    from nthr_kernels import nthr_advantages

    if rollout.hidden is None or rollout.old_logprobs is None:
        raise ValueError("rollout has no hidden states / old log-probs: run old_policy_forward first")
    return nthr_advantages(
        rollout.hidden, rollout.completion_ids, rollout.rewards, rollout.advantages,
        lm_head_weight=model.lm_head.weight.detach(), old_logprobs=rollout.old_logprobs,
        temperature=rollout.temperature, mask=rollout.mask, group_size=rollout.group_size,
        beta=beta, eta=eta, anchor=anchor, backend=backend,
    )


def random_like_selection(rollout: Rollout, selected: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Per group, as many uniformly random negative tokens as ``selected`` holds there."""
    G = rollout.group_size
    neg_tok = rollout.mask & (rollout.rewards <= 0.5).unsqueeze(1)
    out = torch.zeros_like(selected)
    for g in range(rollout.n_groups):
        rows = slice(g * G, (g + 1) * G)
        k = int(selected[rows].sum())
        if k == 0:
            continue
        cand = neg_tok[rows].reshape(-1).nonzero().squeeze(1)
        pick = cand[torch.randperm(cand.numel(), generator=generator)[:k]]
        flat = out[rows].reshape(-1).clone()
        flat[pick] = True
        out[rows] = flat.view(G, -1)
    return out


def token_advantages(model, rollout: Rollout, method: str, *, eta="2|0.5-p|", beta: float = 1.0,
                     anchor: str = "all", backend: str = "auto", generator: torch.Generator | None = None):
    """``(token_advantages [R, L] float32, selected [R, L] bool)`` for one of :data:`METHODS`.

    - ``"grpo"``: every token gets its response's advantage.
    - ``"pos_only"``: negative advantages set to 0.
    - ``"nthr"``: ``nthr_advantages`` (selected negative tokens get ``eta * A``).
    - ``"random"``: in each group, as many random negative tokens as NTHR selects get ``eta * A``
      (with NTHR's eta for that group), the rest keep ``A``.
    """
    _check_method(method)
    m = rollout.mask
    A = rollout.advantages.unsqueeze(1).expand_as(m)
    zero = torch.zeros((), dtype=torch.float32)
    if method == "grpo":
        return torch.where(m, A, zero), torch.zeros_like(m)
    if method == "pos_only":
        return torch.where(m, A.clamp(min=0.0), zero), torch.zeros_like(m)
    res = nthr_result(model, rollout, eta=eta, beta=beta, anchor=anchor, backend=backend)
    if method == "nthr":
        return res.token_advantages.float(), res.selected
    sel = random_like_selection(rollout, res.selected, generator)
    eta_row = res.eta.float().repeat_interleave(rollout.group_size).unsqueeze(1)  # groups are 0..n-1 in order
    return torch.where(m, torch.where(sel, eta_row * A, A), zero), sel


def policy_loss(model, rollout: Rollout, token_adv: torch.Tensor, *, clip_eps: float = 0.2, ref_model=None,
                kl_coef: float = 0.0) -> tuple[torch.Tensor, dict]:
    """GRPO's clipped surrogate with token advantages (+ optional k3 KL to ``ref_model``).

    Per token: ``-min(rho A, clip(rho, 1-eps, 1+eps) A) + kl_coef * KL_k3``; averaged over each
    response's tokens, then over responses (the original GRPO normalisation).
    """
    if not (isinstance(clip_eps, (int, float)) and 0 < clip_eps < 1):
        raise ValueError(f"clip_eps must be in (0, 1), got {clip_eps!r}")
    if token_adv.shape != rollout.mask.shape:
        raise ValueError(f"token_adv must have shape {tuple(rollout.mask.shape)}, got {tuple(token_adv.shape)}")
    if kl_coef and ref_model is None:
        raise ValueError("kl_coef > 0 needs a ref_model")
    if rollout.old_logprobs is None:
        raise ValueError("rollout.old_logprobs is missing: run old_policy_forward first")
    m = rollout.mask
    logp = completion_logprobs(model, rollout.prompt_ids, rollout.completion_ids, temperature=rollout.temperature)
    ratio = torch.exp(logp - rollout.old_logprobs)
    surr = torch.minimum(ratio * token_adv, ratio.clamp(1 - clip_eps, 1 + clip_eps) * token_adv)
    per_tok = -surr
    kl = torch.zeros((), dtype=logp.dtype)
    if kl_coef:
        with torch.no_grad():
            ref_logp = completion_logprobs(ref_model, rollout.prompt_ids, rollout.completion_ids,
                                           temperature=rollout.temperature)
        d = ref_logp - logp
        k3 = torch.exp(d) - d - 1
        per_tok = per_tok + kl_coef * k3
        kl = (k3 * m).sum() / m.sum().clamp(min=1)
    per_tok = torch.where(m, per_tok, torch.zeros_like(per_tok))
    loss = (per_tok.sum(1) / m.sum(1).clamp(min=1)).mean()
    clipped = ((ratio - 1).abs() > clip_eps) & m
    return loss, {"kl": float(kl.detach()), "clip_frac": float(clipped.sum()) / max(1, int(m.sum()))}


def grpo_step(model, optimizer, rollout: Rollout, token_adv: torch.Tensor, *, clip_eps: float = 0.2,
              ref_model=None, kl_coef: float = 0.0, max_grad_norm: float | None = 1.0) -> dict:
    """One optimizer step on the surrogate loss; returns metrics."""
    optimizer.zero_grad(set_to_none=True)
    loss, info = policy_loss(model, rollout, token_adv, clip_eps=clip_eps, ref_model=ref_model, kl_coef=kl_coef)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
    optimizer.step()
    return {"loss": float(loss.detach()), **info}


@torch.no_grad()
def evaluate(model, task: AdditionTask, problems, *, samples: int = 4, seed: int = 0,
             temperature: float = 1.0) -> float:
    """Mean reward of ``samples`` sampled responses per problem (the quantity GRPO maximises)."""
    from .rollout import sample_completions

    g = torch.Generator().manual_seed(seed)
    tok = task.tokenizer
    prompts = task.prompt_ids(list(problems)).repeat_interleave(samples, dim=0)
    comp = sample_completions(model, prompts, max_new_tokens=task.max_completion_len, eos_id=tok.eos_id,
                              pad_id=tok.pad_id, temperature=temperature, generator=g)
    r = [task.reward(comp[i], problems[i // samples]) for i in range(comp.shape[0])]
    return sum(r) / len(r)


def train(model, task: AdditionTask, *, method: str = "grpo", steps: int = 20, prompts_per_step: int = 16,
          group_size: int = 8, lr: float = 1e-4, ppo_epochs: int = 1, eta="2|0.5-p|", beta: float = 1.0,
          kl_coef: float = 0.0, temperature: float = 1.0, eval_every: int = 5, eval_problems=None,
          pretrained_on=None, seed: int = 0, backend: str = "auto", progress: bool = True) -> dict:
    """A short GRPO run (in place on ``model``); returns the history.

    Every step samples fresh problems, ``group_size`` responses each, computes the token advantages
    once from the old policy (they stay fixed through the ``ppo_epochs``) and takes ``ppo_epochs``
    AdamW steps. Everything random is drawn from ``seed``, so two methods started from the same
    weights and seed see the same problems (the responses differ once the policies differ). Each draw
    has a stream of its own (:mod:`nthr_kernels.grpo.seeds`): the problems of each step, the rollouts
    (responses and the random selection), the held-out problems and the evaluation samples; no stream
    of one seed is a stream of another seed, of another purpose, or of the model's pretraining.

    The held-out problems (``eval_problems``, default 128 from their stream) are problems the model never
    trained on: the default set leaves out this run's own training problems and ``pretrained_on`` (the
    problems the model was pretrained on; None: those of the shipped weights,
    :func:`~nthr_kernels.grpo.model.pretraining_problems` of ``DEFAULT_SPEC``, where ``task`` is theirs).
    """
    _check_method(method)
    for name, v in (("steps", steps), ("prompts_per_step", prompts_per_step), ("ppo_epochs", ppo_epochs),
                    ("eval_every", eval_every)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    if eval_problems is None:
        eval_problems = held_out_problems(task, 128, seed, steps, prompts_per_step, pretrained_on)
    with torch_threads():
        return _train(model, task, method, steps, prompts_per_step, group_size, lr, ppo_epochs, eta, beta, kl_coef,
                      temperature, eval_every, list(eval_problems), seed, backend, progress)


def training_problems(task: AdditionTask, seed: int, step: int, prompts_per_step: int) -> list:
    """The problems :func:`train` samples at ``step`` (from 1) of a run with ``seed``."""
    return task.sample_problems(prompts_per_step, seed=_seeds.seed_of("train", "problems", seed, step))


def held_out_problems(task: AdditionTask, n: int, seed: int, steps: int, prompts_per_step: int,
                      pretrained_on=None) -> list:
    """:func:`train`'s default held-out problems: the first ``n`` of their stream that are neither among the
    run's training problems nor in ``pretrained_on`` (None: the shipped weights' pretraining problems when
    ``task`` is theirs)."""
    if pretrained_on is None:
        pretrained_on = pretraining_problems(DEFAULT_SPEC) if task.n_digits == DEFAULT_SPEC.n_digits else frozenset()
    seen = set(pretrained_on).union(*(training_problems(task, seed, s, prompts_per_step) for s in range(1, steps + 1)))
    return task.sample_problems(n, seed=_seeds.seed_of("train", "evaluation problems", seed), exclude=seen)


def _train(model, task, method, steps, prompts_per_step, group_size, lr, ppo_epochs, eta, beta, kl_coef,
           temperature, eval_every, eval_problems, seed, backend, progress):
    import copy

    from tqdm.auto import tqdm

    ref_model = copy.deepcopy(model).eval() if kl_coef else None
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    gen = _seeds.stream("train", "rollouts", seed)  # responses and the random selection, step after step
    eval_seed = _seeds.seed_of("train", "evaluation", seed)  # the same samples at every evaluation
    hist = {"method": method, "step": [], "eval_acc": [], "train_reward": [], "selected_frac": [], "seconds": []}
    t0 = time.perf_counter()

    def log_eval(step):
        hist["step"].append(step)
        hist["eval_acc"].append(evaluate(model, task, eval_problems, seed=eval_seed))
        hist["seconds"].append(time.perf_counter() - t0)

    log_eval(0)
    bar = tqdm(range(1, steps + 1), desc=f"train {method}", disable=not progress, leave=False)
    for step in bar:
        problems = training_problems(task, seed, step, prompts_per_step)
        ro = collect_rollout(model, task, problems, group_size=group_size, temperature=temperature, generator=gen)
        adv, sel = token_advantages(model, ro, method, eta=eta, beta=beta, backend=backend, generator=gen)
        neg = ro.mask & (ro.rewards <= 0.5).unsqueeze(1)
        for _ in range(ppo_epochs):
            grpo_step(model, opt, ro, adv, ref_model=ref_model, kl_coef=kl_coef)
        hist["train_reward"].append(float(ro.rewards.mean()))
        hist["selected_frac"].append(float(sel.sum()) / max(1, int(neg.sum())))
        bar.set_postfix(reward=f"{hist['train_reward'][-1]:.2f}")
        if step % eval_every == 0 or step == steps:
            log_eval(step)
    model.eval()
    hist["final_acc"] = hist["eval_acc"][-1]
    hist["mean_train_reward"] = sum(hist["train_reward"]) / len(hist["train_reward"]) if steps else math.nan
    return hist
