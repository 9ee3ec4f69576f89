"""A minimal, readable GRPO loop on a tiny transformers model, NTHR plugged in, and the paper's LLD study.

Importing this package trains and loads nothing; the default model's weights ship in ``grpo/weights/``
and are read only by :func:`load_default_model` (``python -m nthr_kernels.grpo.pretrain`` remakes them).

    from nthr_kernels.grpo import load_default_model, collect_rollout, token_advantages, grpo_step
"""

from .loop import METHODS, evaluate, grpo_step, policy_loss, token_advantages, train
from .model import DEFAULT_SPEC, ModelSpec, build_model, load_default_model, load_weights, pretrain
from .rollout import (Rollout, capture_lm_head_inputs, collect_rollout, completion_logprobs, group_advantages,
                      old_policy_forward, sample_completions)
from .task import AdditionTask, CharTokenizer, Problem

__all__ = [
    "METHODS", "evaluate", "grpo_step", "policy_loss", "token_advantages", "train",
    "DEFAULT_SPEC", "ModelSpec", "build_model", "load_default_model", "load_weights", "pretrain",
    "Rollout", "capture_lm_head_inputs", "collect_rollout", "completion_logprobs", "group_advantages",
    "old_policy_forward", "sample_completions",
    "AdditionTask", "CharTokenizer", "Problem",
]
