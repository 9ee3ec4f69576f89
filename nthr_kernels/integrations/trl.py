"""NTHR for TRL: :class:`NTHRGRPOTrainer`, a drop-in subclass of ``trl.GRPOTrainer``.

NTHR needs, for every completion token, the LM-head input ``h`` of the *old* policy (the weights that
sampled the batch) and its temperature-scaled log-probability. The trainer takes them from a forward TRL
already runs whenever there is one (``nthr_capture="auto"`` picks the first that applies):

- ``"old_logps"``: TRL computes ``old_per_token_logps`` itself (always with vLLM while
  ``vllm_importance_sampling_correction`` is on; whenever ``gradient_accumulation_steps`` is not a multiple
  of ``steps_per_generation * num_iterations``). A hook on the model's backbone records
  ``last_hidden_state`` during that forward (TRL's fused LM head reads exactly that tensor), and TRL's own
  old log-probs are used. No extra work besides the copy of the completion rows.
- ``"generate"``: generation runs ``generate()`` on the Hugging Face model (no vLLM, no continuous
  batching, no ``rollout_func``, no tools). A forward pre-hook on ``lm_head`` records, at every decoding
  step, the input row that produced the sampled token's distribution, and a forward hook records that
  row's ``logsumexp(logits / T)``; the old log-prob is then ``(w_y . h) / T - logsumexp`` (only the
  sampled tokens' rows of ``W`` are read).
- ``"forward"``: nothing above runs (vLLM with the importance-sampling correction off and aligned steps):
  one extra no-grad forward of the policy over ``prompt + completion``
  (:func:`capture_old_policy`, eval mode, TRL's fused head).

In every mode position ``P + t - 1`` of the padded sequence (prompt width ``P``) predicts completion
token ``t``, so the rows ``[P - 1, P + C - 1)`` line up with the ``C`` completion tokens. Then the trainer
calls :func:`nthr_kernels.nthr_advantages` with the LM head weight, those log-probs, the trainer's
sampling temperature, the binary rewards (the weighted sum of the reward functions, as TRL logs it),
TRL's own response-level advantages and the global group ids (global row ``i`` belongs to group
``i // num_generations``, TRL's layout; a completion that every reward function scored None gets a group of
its own, so that, as in TRL's baseline, it does not count as a wrong response), and returns the ``[B, C]`` token advantages in place of TRL's
``[B]`` ones (TRL's loss broadcasts 1-D advantages with ``unsqueeze(1)`` and uses 2-D ones as they are).

When the per-process batch is not a multiple of ``num_generations`` a group straddles processes; then the
distributed path runs over ``torch.distributed``'s default group. Evaluation batches keep TRL's advantages.

Refused with a ``ValueError``: ``use_liger_kernel`` (Liger replaces the LM head path), the sequence-level
loss variants that read the sign of a per-sequence advantage (``loss_type="vespo"``,
``off_policy_mask_threshold``), an LM head with a bias, logit soft-capping or a logit scale, ZeRO-3
partitioned heads, multimodal inputs, and a ``nthr_capture`` mode the configuration cannot serve.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch

from .. import available_backends, nthr_advantages
from ..core.rules import ANCHORS, EtaSpec, check_eta
from ..core.checks import binary_positive, check_backend, check_real
from .lm_head import check_lm_head, check_logits_form, full_lm_head_weight

try:
    from trl import GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "nthr_kernels.integrations.trl needs TRL: pip install 'trl>=1.16,<2' (or, in a checkout of nthr-kernels, "
        "pip install -e '.[trl]')"
    ) from e

__all__ = ["NTHRGRPOTrainer", "CAPTURE_MODES", "capture_old_policy", "check_lm_head", "check_logits_form"]

CAPTURE_MODES = ("auto", "old_logps", "generate", "forward")  # where the old policy's hidden states come from
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


def _backbone(model) -> torch.nn.Module:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    backbone = base.base_model
    if backbone is base:
        raise ValueError("model: cannot find the backbone (base_model) whose output feeds the lm_head")
    return backbone


@contextlib.contextmanager
def _completion_rows(model, n_completion: int):
    """Inside the block, every backbone forward of ``model`` appends its completion rows
    ``last_hidden_state[:, -C - 1 : -1]`` (the LM-head inputs of the ``C`` completion tokens) to the
    yielded list."""
    c = int(n_completion)
    rows: list = []

    def hook(_module, _args, output):
        h = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]
        rows.append(h[:, -c - 1 : -1].detach())

    handle = _backbone(model).register_forward_hook(hook)
    try:
        yield rows
    finally:
        handle.remove()


@contextlib.contextmanager
def _decoding_steps(head: torch.nn.Module, temperature: float):
    """Inside the block, every call of ``head`` (one per decoding step of ``generate()``) appends the
    last position's input row ``[B, d]`` and its ``logsumexp(logits / T)`` ``[B]`` (float32) to the
    yielded lists ``(rows, lse)``."""
    rows: list = []
    lse: list = []

    def pre(_module, args):
        rows.append(args[0][:, -1].detach())

    def post(_module, _args, logits):
        lse.append(torch.logsumexp(logits[:, -1].float() / temperature, -1))

    handles = [head.register_forward_pre_hook(pre), head.register_forward_hook(post)]
    try:
        yield rows, lse
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def capture_old_policy(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    n_completion: int,
    batch_size: Optional[int] = None,
):
    """Old-policy hidden states and log-probs of the last ``n_completion`` tokens of ``input_ids``, with one
    extra forward (the ``"forward"`` capture mode).

    ``model`` must carry TRL's fused LM head (``trl.trainer.utils.add_fused_lm_head``, which GRPOTrainer
    installs with its temperature). Returns ``(hidden [B, C, d], logprobs [B, C] float32)`` where
    ``hidden[:, t]`` is the LM-head input that produced the distribution of completion token ``t`` and
    ``logprobs`` its temperature-scaled log-probability (0 where ``attention_mask`` is 0). The model
    runs in eval mode (no dropout) and is restored afterwards.
    """
    c = int(n_completion)
    batch_size = batch_size or input_ids.shape[0]
    was_training = model.training
    logps = []
    try:
        model.eval()
        with _completion_rows(model, c) as rows:
            for s in range(0, input_ids.shape[0], batch_size):
                ids, am = input_ids[s : s + batch_size], attention_mask[s : s + batch_size]
                labels = ids.masked_fill(am == 0, -100)
                labels[:, :-c] = -100
                out = model(input_ids=ids, attention_mask=am, labels=labels, fused_lm_head=True)
                logps.append(out.log_probs[:, -c:].float())
    finally:
        model.train(was_training)
    if len(rows) != len(logps):
        raise RuntimeError(f"model: expected one backbone call per forward, saw {len(rows)} for {len(logps)}")
    return torch.cat(rows), torch.cat(logps)


def _fit_columns(x: torch.Tensor, c: int) -> torch.Tensor:
    """``x [B, S, ...]`` cut or zero-padded to ``S = c`` (generation may stop before TRL's padded width)."""
    if x.shape[1] >= c:
        return x[:, :c]
    return torch.cat([x, x.new_zeros(x.shape[0], c - x.shape[1], *x.shape[2:])], 1)


class NTHRGRPOTrainer(GRPOTrainer):
    """``trl.GRPOTrainer`` whose advantages are NTHR token advantages (``[B, C]``).

    Extra keyword arguments (everything else goes to ``GRPOTrainer``): ``nthr_beta`` (threshold scale,
    default 1; ``-inf`` selects every negative token of a mixed group), ``nthr_eta`` (``"2|0.5-p|"``,
    ``"1-p"``, ``"p"``, a constant in [0, 1] or a callable), ``nthr_anchor`` (``"all"`` or ``"others"``),
    ``nthr_reward_threshold`` (default None: the summed rewards must be 0/1; a number: a response is correct
    iff its reward is above it, one value on each side),
    ``nthr_backend``, ``nthr_capture`` (one of :data:`CAPTURE_MODES`: ``"auto"`` takes the hidden states
    from a forward TRL runs anyway and adds a forward only where there is none; see the module docstring;
    the mode in use is ``self.nthr_capture``). The last result is kept in ``self.nthr_last`` (an
    :class:`~nthr_kernels.NTHRResult` for the local rows).
    """

    def __init__(
        self,
        *args: Any,
        nthr_beta: float = 1.0,
        nthr_eta: EtaSpec = "2|0.5-p|",
        nthr_anchor: str = "all",
        nthr_reward_threshold: Optional[float] = None,
        nthr_backend: str = "auto",
        nthr_capture: str = "auto",
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
        if nthr_capture not in CAPTURE_MODES:
            raise ValueError(f"nthr_capture: expected one of {CAPTURE_MODES}, got {nthr_capture!r}")
        self.nthr_eta = nthr_eta
        self.nthr_anchor = nthr_anchor
        self.nthr_reward_threshold = (
            None if nthr_reward_threshold is None else check_real("nthr_reward_threshold", nthr_reward_threshold, exact=True)
        )
        try:
            self.nthr_backend = check_backend(nthr_backend)
        except ValueError as e:
            raise ValueError(f"nthr_{e}") from None
        if nthr_backend != "auto" and nthr_backend not in available_backends():  # now, not at the first step
            raise ValueError(f"nthr_backend: {nthr_backend!r} is not available here; available: {available_backends()}")
        self.nthr_last = None
        self._nthr_rewards_per_func = None
        self._nthr_armed = None  # the capture mode waiting for its forward during one rollout batch
        self._nthr_captured = None
        super().__init__(*args, **kwargs)
        _refuse_args(self.args)
        check_lm_head(self._nthr_base_model())
        self.nthr_capture = self._nthr_resolve_capture(nthr_capture)

    def _nthr_base_model(self):
        m = self.accelerator.unwrap_model(self.model)
        return m.get_base_model() if hasattr(m, "get_base_model") else m

    def _nthr_resolve_capture(self, requested: str) -> str:
        """The capture mode: the forward TRL already runs, else one extra (see the module docstring)."""
        generate_every = self.args.steps_per_generation * self.num_iterations
        # the condition under which GRPOTrainer._generate_and_score_completions computes old_per_token_logps
        old_logps = self.args.gradient_accumulation_steps % generate_every != 0 or (
            self.use_vllm and self.vllm_importance_sampling_correction
        )
        hf_generate = not (self.use_vllm or self.use_transformers_continuous_batching
                           or self.rollout_func is not None or self.tools)
        available = {"old_logps": old_logps, "generate": hf_generate, "forward": True}
        if requested == "auto":
            return next(m for m in ("old_logps", "generate", "forward") if available[m])
        if not available[requested]:
            why = {
                "old_logps": "TRL computes old_per_token_logps only with vLLM's importance-sampling correction or "
                             "when gradient_accumulation_steps is not a multiple of steps_per_generation * "
                             "num_iterations",
                "generate": "generation does not run generate() on the Hugging Face model here (vLLM, continuous "
                            "batching, rollout_func or tools)",
            }[requested]
            raise ValueError(f"nthr_capture: {requested!r} is not available with this configuration: {why}")
        return requested

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._nthr_rewards_per_func = rewards_per_func  # [global B, n_funcs], every process's rows
        return rewards_per_func

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if self._nthr_armed != "generate":
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self._nthr_armed = None
        with _decoding_steps(self._nthr_base_model().get_output_embeddings(), self.temperature) as (rows, lse):
            result = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        if not rows or rows[0].shape[0] != len(prompt_ids) or len(lse) != len(rows):
            raise RuntimeError(
                f"nthr_capture='generate': expected one lm_head call of {len(prompt_ids)} rows per decoding step, "
                f"saw {len(rows)} calls" + (f" of {rows[0].shape[0]} rows" if rows else "")
            )
        self._nthr_captured = ("generate", torch.stack(rows, 1), torch.stack(lse, 1))
        return result

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, *args, **kwargs):
        # armed only when TRL computes old_per_token_logps: its first call on the policy is that forward
        # (the PEFT reference forward, also on self.model, comes after it)
        if self._nthr_armed != "old_logps" or model is not self.model:
            return super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                              *args, **kwargs)
        self._nthr_armed = None
        with _completion_rows(self.accelerator.unwrap_model(model), logits_to_keep) as rows:
            result = super()._get_per_token_logps_and_entropies(model, input_ids, attention_mask, logits_to_keep,
                                                                *args, **kwargs)
        self._nthr_captured = ("old_logps", torch.cat(rows), None)
        return result

    def _nthr_old_policy(self, out, c: int):
        """``(hidden [B, C, d], old log-probs [B, C] float32, lm_head weight)`` of this rollout batch, from the
        capture mode. The weight is gathered here only where the mode reads it (``"generate"``), else after the
        capture's forward (``"forward"``), so that a full FSDP2 weight is gathered once per step and never held
        during that forward."""
        mode, hidden, extra = self._nthr_captured or (self.nthr_capture, None, None)
        if mode != self.nthr_capture or (hidden is None and mode != "forward"):
            raise RuntimeError(f"NTHRGRPOTrainer: the {self.nthr_capture!r} capture did not run for this batch")
        if mode == "old_logps":
            return hidden, out["old_per_token_logps"].float(), self._nthr_lm_head_weight()
        if mode == "generate":
            hidden, lse = _fit_columns(hidden, c), _fit_columns(extra, c)
            w = self._nthr_lm_head_weight()
            # the sampled tokens' logits, one row at a time (scratch [C, d], not [B, C, d])
            logit = torch.stack([(h.float() * w[y].to(h.device, torch.float32)).sum(-1)
                                 for h, y in zip(hidden, out["completion_ids"])])
            return hidden, (logit / self.temperature - lse) * out["completion_mask"], w
        hidden, old_logps = capture_old_policy(
            self.accelerator.unwrap_model(self.model),
            torch.cat([out["prompt_ids"], out["completion_ids"]], 1),
            torch.cat([out["prompt_mask"], out["completion_mask"]], 1),
            c,
            batch_size=self.args.per_device_train_batch_size,
        )
        return hidden, old_logps, self._nthr_lm_head_weight()

    def _nthr_lm_head_weight(self) -> torch.Tensor:
        """The full LM-head weight (an FSDP2 weight is gathered: call once per step)."""
        return full_lm_head_weight(self._nthr_base_model())

    def _generate_and_score_completions(self, inputs):
        self._nthr_rewards_per_func = None
        self._nthr_captured = None
        self._nthr_armed = self.nthr_capture if self.model.training else None
        try:
            out = super()._generate_and_score_completions(inputs)
        finally:
            self._nthr_armed = None
        if not self.model.training:
            return out
        if any(k in out for k in _MULTIMODAL_KEYS):
            raise ValueError("inputs: multimodal batches are not supported by NTHRGRPOTrainer")
        if self._nthr_rewards_per_func is None:
            raise RuntimeError("NTHRGRPOTrainer: GRPOTrainer did not call _calculate_rewards for this batch")
        completion_ids, completion_mask = out["completion_ids"], out["completion_mask"]
        mask = completion_mask if "tool_mask" not in out else completion_mask * out["tool_mask"]
        n_local, c = completion_ids.shape
        device = completion_ids.device

        hidden, old_logps, weight = self._nthr_old_policy(out, c)  # the step's one gather of an FSDP2 weight
        self._nthr_captured = None

        rpf = self._nthr_rewards_per_func
        rewards = (rpf * self.reward_weights.to(rpf.device).unsqueeze(0)).nansum(dim=1)
        rank, world = self.accelerator.process_index, self.accelerator.num_processes
        g = self.num_generations
        first = rank * n_local
        rows = torch.arange(first, first + n_local, device=device)
        rewards = rewards[first : first + n_local].to(device)
        # A completion for which every reward function returned None is unscorable: GRPOTrainer leaves it out
        # of its group's baseline and gives it advantage 0. It must not count as a wrong response here either
        # (that would change the group's success rate, hence eta, and could make an all-correct group mixed):
        # it gets a group of its own (id -1 - row, unique across processes), which is inactive and keeps its 0.
        unscorable = torch.isnan(rpf[first : first + n_local]).all(dim=1).to(device)
        group_ids = torch.where(unscorable, -1 - rows, rows // g)
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
        negative = ~binary_positive(rewards, self.nthr_reward_threshold) & ~unscorable
        n_neg_tok = (mask.bool() & negative[:, None]).sum().float()
        self._metrics["train"]["nthr/selected_frac_of_negative_tokens"].append(
            (n_sel / n_neg_tok.clamp_min(1)).item()
        )
        out["advantages"] = res.token_advantages.to(out["advantages"].dtype)
        return out
