"""NTHR for TRL: :class:`NTHRGRPOTrainer`, a drop-in subclass of ``trl.GRPOTrainer``.

After TRL has generated and scored a rollout batch (``_generate_and_score_completions``), the trainer

1. runs one no-grad forward of the policy (the *old* policy of this batch) over ``prompt + completion``
   with TRL's fused LM head, which returns the temperature-scaled log-probabilities of the completion
   tokens, while a forward hook on the model's backbone captures ``last_hidden_state``: exactly the input
   of the LM head. Position ``P + t - 1`` of the padded sequence (prompt width ``P``) predicts completion
   token ``t``, so the captured rows ``[P - 1, P + C - 1)`` (the last ``C + 1`` positions without the
   last one) line up with the ``C`` completion tokens;
2. calls :func:`nthr_kernels.nthr_advantages` with the LM head weight, those log-probs, the trainer's
   sampling temperature, the binary rewards (the weighted sum of the reward functions, as TRL logs it),
   TRL's own response-level advantages and the global group ids (global row ``i`` belongs to group
   ``i // num_generations``, TRL's layout);
3. returns the ``[B, C]`` token advantages in place of TRL's ``[B]`` ones (TRL's loss broadcasts 1-D
   advantages with ``unsqueeze(1)`` and uses 2-D ones as they are).

When the per-process batch is not a multiple of ``num_generations`` a group straddles processes; then the
distributed path (:mod:`nthr_kernels.ops.advantages.distributed`) runs over ``torch.distributed``'s default group.
Evaluation batches keep TRL's advantages.

Refused with a ``ValueError``: ``use_liger_kernel`` (Liger replaces the LM head path), the sequence-level
loss variants that read the sign of a per-sequence advantage (``loss_type="vespo"``,
``off_policy_mask_threshold``), an LM head with a bias, logit soft-capping or a logit scale, ZeRO-3
partitioned heads, and multimodal inputs.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from .. import nthr_advantages
from ..core.rules import ANCHORS, EtaSpec, check_eta
from ..core.checks import binary_positive, check_backend, check_real

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError("nthr_kernels.integrations.trl needs TRL: pip install 'nthr-kernels[trl]'") from e

__all__ = ["NTHRGRPOTrainer", "capture_old_policy", "check_lm_head"]

_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")
_MULTIMODAL_KEYS = ("pixel_values", "image_grid_thw", "num_images", "token_type_ids", "mm_token_type_ids")


def _refuse_args(args) -> None:
    if args is None:
        return
    if getattr(args, "use_liger_kernel", False):
        raise ValueError(
            "use_liger_kernel: not supported by NTHRGRPOTrainer (Liger replaces the LM head path whose inputs "
            "NTHR reads); set use_liger_kernel=False"
        )
    if getattr(args, "loss_type", None) == "vespo":
        raise ValueError("loss_type: 'vespo' weighs whole sequences by the sign of [B] advantages; NTHR's are per token")
    if getattr(args, "off_policy_mask_threshold", None) is not None:
        raise ValueError(
            "off_policy_mask_threshold: the off-policy sequence mask reads the sign of [B] advantages; "
            "NTHR's are per token: set it to None"
        )


def check_lm_head(model) -> torch.nn.Module:
    """The output embedding of a causal LM whose logits are exactly ``W h`` (raises ``ValueError`` otherwise)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError("model: has no output embedding (lm_head) with a weight")
    if getattr(head, "bias", None) is not None:
        raise ValueError("model: the lm_head has a bias; NTHR assumes logits = W h / T")
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        raise ValueError("model: logit soft-capping (final_logit_softcapping) is not supported by NTHR")
    for a in _SCALE_ATTRS:
        v = getattr(cfg, a, None)
        if v is not None and float(v) != 1.0:
            raise ValueError(f"model: config.{a}={v} scales the logits; NTHR assumes logits = W h / T")
    if head.weight.numel() == 0 or head.weight.dim() != 2:
        raise ValueError("model: the lm_head weight is partitioned (e.g. DeepSpeed ZeRO-3); gather it or use ZeRO-2/FSDP")
    return head


def _lm_head_weight(head) -> torch.Tensor:
    w = head.weight
    if hasattr(w, "full_tensor"):  # FSDP2 DTensor
        w = w.full_tensor()
    return w.detach()


@torch.no_grad()
def capture_old_policy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    batch_size: Optional[int] = None,
):
    """Old-policy hidden states and log-probs of the last ``n_completion`` tokens of ``input_ids``.

    ``model`` must carry TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which GRPOTrainer
    installs with its temperature). Returns ``(hidden [B, C, d], logprobs [B, C] float32)`` where
    ``hidden[:, t]`` is the LM-head input that produced the distribution of completion token ``t`` and
    ``logprobs`` its temperature-scaled log-probability (0 where ``attention_mask`` is 0). The model
    runs in eval mode (no dropout) and is restored afterwards.
    """
    c = int(n_completion)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.base_model
    if backbone is base:
        raise ValueError("model: cannot find the backbone (base_model) whose output feeds the lm_head")
    captured: list = []

    def hook(_module, _args, output):
        h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        captured.append(h[:, -c - 1 : -1].detach())

    batch_size = batch_size or input_ids.shape[0]
    was_training = model.training
    handle = backbone.register_forward_hook(hook)
    hidden, logps = [], []
    try:
        model.eval()
        for s in range(0, input_ids.shape[0], batch_size):
            ids, am = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
            labels = ids.masked_fill(am == 0, -100)
            labels[:, :-c] = -100
            captured.clear()
            out = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
            if len(captured) != 1:
                raise RuntimeError(f"model: expected one backbone call per forward, saw {len(captured)}")
            hidden.append(captured[0])
            logps.append(out.log_probs[:, -c:].float())
    finally:
        handle.remove()
        model.train(was_training)
    return torch.cat(hidden), torch.cat(logps)


class NTHRGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose advantages are NTHR token advantages (``[B, C]``).

    Extra keyword arguments (everything else goes to ``GRPOTrainer``): ``nthr_beta`` (threshold scale,
    default 1; ``-inf`` selects every negative token of a mixed group), ``nthr_eta`` (``"2|0.5-p|"``,
    ``"1-p"``, ``"p"``, a constant in [0, 1] or a callable), ``nthr_anchor`` (``"all"`` or ``"others"``),
    ``nthr_reward_threshold`` (default None: the summed rewards must be 0/1; a number: a response is correct
    iff its reward is above it, one value on each side),
    ``nthr_backend``. The last result is kept in ``self.nthr_last`` (an :class:`~nthr_kernels.NTHRResult`
    for the local rows).
    """

    def __init__(
        self,
        *args: Any,
        nthr_beta: float = 1.0,
        nthr_eta: EtaSpec = "2|0.5-p|",
        nthr_anchor: str = "all",
        nthr_reward_threshold: Optional[float] = None,
        nthr_backend: str = "auto",
        **kwargs: Any,
    ):
        _refuse_args(kwargs.get("args", args[2] if len(args) > 2 else None))
        self.nthr_beta = check_real("nthr_beta", nthr_beta, allow_neg_inf=True)
        try:
            check_eta(nthr_eta)
        except (TypeError, ValueError) as e:
            raise type(e)(f"nthr_{e}") from None
        if nthr_anchor not in ANCHORS:
            raise ValueError(f"nthr_anchor: expected one of {ANCHORS}, got {nthr_anchor!r}")
        self.nthr_eta = nthr_eta
        self.nthr_anchor = nthr_anchor
        self.nthr_reward_threshold = (
            None if nthr_reward_threshold is None else check_real("nthr_reward_threshold", nthr_reward_threshold)
        )
        try:
            self.nthr_backend = check_backend(nthr_backend)
        except ValueError as e:
            raise ValueError(f"nthr_{e}") from None
        self.nthr_last = None
        self._nthr_rewards_per_func = None
        super().__init__(*args, **kwargs)
        _refuse_args(self.args)
        check_lm_head(self._nthr_base_model())

    def _nthr_base_model(self):
        m = self.accelerator.unwrap_model(self.model)
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._nthr_rewards_per_func = rewards_per_func  # [global B, n_funcs], every process's rows
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._nthr_rewards_per_func = None
        out = super()._generate_and_score_completions(inputs)
        if not self.model.training:
            return out
        if any(k in out for k in _MULTIMODAL_KEYS):
            raise ValueError("inputs: multimodal batches are not supported by NTHRGRPOTrainer")
        if self._nthr_rewards_per_func is None:
            raise RuntimeError("NTHRGRPOTrainer: GRPOTrainer did not call _calculate_rewards for this batch")
        prompt_ids, completion_ids = out["prompt_ids"], out["completion_ids"]
        completion_mask = out["completion_mask"]
        mask = completion_mask if "tool_mask" not in out else completion_mask * out["tool_mask"]
        n_local, c = completion_ids.shape
        device = completion_ids.device

        model = self.accelerator.unwrap_model(self.model)
        hidden, old_logps = capture_old_policy(
            model,
            torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([out["prompt_mask"], completion_mask], 1),
            c,
            batch_size=self.args.per_device_train_batch_size,
        )
        weight = _lm_head_weight(check_lm_head(self._nthr_base_model()))

        rpf = self._nthr_rewards_per_func
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        g = self.num_generations
        first = rank * n_local
        rewards = rewards[first : first + n_local].to(device)
        group_ids = torch.arange(first, first + n_local, device=device) // g
        straddles = world > 1 and n_local % g != 0
        pg = None
        if straddles:
            import torch.distributed as dist

            pg = dist.group.WORLD
        res = nthr_advantages(
            hidden,
            completion_ids,
            rewards,
            out["advantages"].float(),
            lm_head_weight=weight.to(hidden.device),
            old_logprobs=old_logps.clamp_max(0.0),
            temperature=self.temperature,
            mask=mask.bool(),
            group_ids=group_ids,
            beta=self.nthr_beta,
            eta=self.nthr_eta,
            anchor=self.nthr_anchor,
            reward_threshold=self.nthr_reward_threshold,
            backend=self.nthr_backend,
            process_group=pg,
        )
        self.nthr_last = res
        n_sel = res.selected.sum().float()
        n_neg_tok = (mask.bool() & ~binary_positive(rewards, self.nthr_reward_threshold)[:, None]).sum().float()
        self._metrics["train"]["nthr/selected_frac_of_negative_tokens"].append(
            (n_sel / n_neg_tok.clamp_min(1)).item()
        )
        out["advantages"] = res.token_advantages.to(out["advantages"].dtype)
        return out
