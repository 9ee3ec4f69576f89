"""The LM-head contract the trainer integrations share, importable without TRL or verl: NTHR reads the
inputs of an LM head whose logits are exactly ``W h`` (docs/NTHR.md, "Notation")."""
from __future__ import annotations

import torch

__all__ = ["check_lm_head", "check_logits_form", "full_lm_head_weight"]

_SCALE_ATTRS = ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")


def check_logits_form(model, head) -> None:
    """Raise ``ValueError`` unless the logits of ``model`` (whose output embedding is ``head``) are ``W h``:
    no lm_head bias, no logit soft-capping, no logit scale (docs/NTHR.md, "Notation"). The TRL trainer
    and the verl capture (:class:`~nthr_kernels.integrations.verl.LMHeadInputCapture`) apply it."""
    if getattr(head, "bias", None) is not None:
        raise ValueError("model: the lm_head has a bias; NTHR assumes logits = W h / T")
    cfg = getattr(model, "config", None)
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    if getattr(cfg, "final_logit_softcapping", None) is not None:
        raise ValueError("model: logit soft-capping (final_logit_softcapping) is not supported by NTHR")
    for a in _SCALE_ATTRS:
        v = getattr(cfg, a, None)
        if v is not None and float(v) != 1.0:
            raise ValueError(f"model: config.{a}={v} scales the logits; NTHR assumes logits = W h / T")


def check_lm_head(model) -> torch.nn.Module:
    """The output embedding of a causal LM whose logits are exactly ``W h`` (raises ``ValueError`` otherwise)."""
    head = model.get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor):
        raise ValueError("model: has no output embedding (lm_head) with a weight")
    check_logits_form(model, head)
    if head.weight.numel() == 0 or head.weight.dim() != 2:
        raise ValueError("model: the lm_head weight is partitioned (DeepSpeed ZeRO-3, or FSDP1's flat shards); gather "
                         "it, or use ZeRO-2, FSDP2 or an unsharded head")
    return head


def full_lm_head_weight(model) -> torch.Tensor:
    """The whole, detached weight of ``model``'s LM head (checked by :func:`check_lm_head`): an FSDP2 ``DTensor``
    is gathered (``full_tensor()``, an all-gather of ``|V| x d`` on every rank), so a caller takes it once per
    step and drops it when the step is done. The TRL trainer and the verl worker read the weight here."""
    w = check_lm_head(model).weight
    if hasattr(w, "full_tensor"):  # FSDP2 DTensor shards
        w = w.full_tensor()
    return w.detach()
