"""A minimal, readable GRPO loop on a tiny transformers model, NTHR plugged in, and the paper's LLD study.

Importing this package trains and loads nothing; the default model is built (and, the first time,
pretrained and cached) only by :func:`load_default_model`.

    from nthr_kernels.grpo import load_default_model, collect_rollout, token_advantages, grpo_step
"""

from .loop import METHODS, evaluate, grpo_step, policy_loss, token_advantages, train
from .model import DEFAULT_SPEC, QUICK_SPEC, ModelSpec, build_model, cache_dir, load_default_model, pretrain
from .rollout import (Rollout, capture_lm_head_inputs, collect_rollout, completion_logprobs, group_advantages,
                      old_policy_forward, sample_completions)
from .task import AdditionTask, CharTokenizer, Problem

__all__ = [
    "METHODS", "evaluate", "grpo_step", "policy_loss", "token_advantages", "train",
    "DEFAULT_SPEC", "QUICK_SPEC", "ModelSpec", "build_model", "cache_dir", "load_default_model", "pretrain",
    "Rollout", "capture_lm_head_inputs", "collect_rollout", "completion_logprobs", "group_advantages",
    "old_policy_forward", "sample_completions",
    "AdditionTask", "CharTokenizer", "Problem",
]
