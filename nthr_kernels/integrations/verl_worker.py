"""NTHR on verl's actor workers (verl 0.9, engine workers): only ``nthr_scale [bs, R]`` reaches the driver.

Use :func:`nthr_actor_worker` (or :class:`NTHRActorRolloutRefWorker` with the default options) as the
actor class of the ``ActorRollout`` role in place of ``verl.workers.engine_workers.ActorRolloutRefWorker``.
Its ``compute_log_prob`` is registered with verl's own decorator and dispatch mode (the parent's:
``make_nd_compute_dataproto_dispatch_fn(mesh_name="actor")``), so the driver calls it as before. When the
batch carries outcome scores (``token_level_scores``, or ``token_level_rewards``; verl 0.9's ``fit()``
computes the reward before the old log-probs) it

1. runs the actor's usual ``infer_batch`` inside :class:`~nthr_kernels.integrations.verl.LMHeadInputCapture`,
   which keeps, of the LM-head inputs of each micro-batch's forward (packed ``[nnz, d]`` in verl's
   no-padding layout), only the rows that predict response tokens (:func:`response_rows`): no prompt row
   and no sequence's last row is kept or copied;
2. lays them out as ``[bs, R, d]`` where verl's own ``no_padding_2_padding`` (the same call that turns the
   log-probs into ``old_log_probs``) puts them;
3. calls :func:`~nthr_kernels.integrations.verl.compute_nthr_scale` with the LM-head weight (gathered from
   FSDP2's DTensor shards), the batch's ``temperature`` and ``process_group=`` the engine's data-parallel
   group: verl's dispatch cuts the batch into contiguous shares (after reordering it by length with its
   default ``trainer.balance_batch=True``), so prompt groups straddle workers, and the distributed path
   scores each over all of its responses;
4. returns the usual output plus ``nthr_scale [bs, R]`` (``eta`` or 1, padded layout).

Without outcome scores in the batch it is the parent's ``compute_log_prob``. The driver then needs
``batch.batch["nthr_scale"]`` next to ``old_log_probs`` (with the legacy ``RayPPOTrainer``, add it where
``_compute_old_log_prob`` picks ``log_probs`` from the output; with the v1 trainer, add ``"nthr_scale"``
to the fields it reads back) and computes advantages with
``with nthr_inputs(batch): compute_advantage(batch, adv_estimator="nthr", ...)``.

Limits (each raises a ``ValueError`` naming it): micro-batches must keep the batch order
(``use_dynamic_bsz=False``), the head must not be sharded by FSDP1 (use FSDP2 or an unsharded head), one
temperature per batch. Ulysses sequence parallelism is not supported (the captured rows would be split).
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
from verl.utils import tensordict_utils as tu
from verl.workers.engine_workers import ActorRolloutRefWorker
from verl.workers.utils.padding import no_padding_2_padding

from ..core.checks import check_backend, check_real
from ..core.rules import ANCHORS, check_eta
from .lm_head import full_lm_head_weight
from .verl import SCALE_KEY, LMHeadInputCapture, compute_nthr_scale

__all__ = ["NTHRActorRolloutRefWorker", "nthr_actor_worker", "nthr_scale_on_worker", "response_rows", "SCORE_KEYS"]

SCORE_KEYS = ("token_level_scores", "token_level_rewards")  # outcome scores, in order of preference


def _check_options(options: dict) -> dict:
    known = {"beta", "eta", "anchor", "reward_threshold", "backend"}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{unknown[0]}: not an NTHR option (expected some of {sorted(known)})")
    if "beta" in options:
        check_real("beta", options["beta"], allow_neg_inf=True)
    if "eta" in options:
        check_eta(options["eta"])
    if options.get("anchor", "all") not in ANCHORS:
        raise ValueError(f"anchor: expected one of {ANCHORS}, got {options['anchor']!r}")
    if "reward_threshold" in options:
        check_real("reward_threshold", options["reward_threshold"])
    if "backend" in options:
        check_backend(options["backend"])
    return dict(options)


def _full_weight(module: torch.nn.Module) -> torch.Tensor:
    """The whole lm_head weight of the worker's model (a PEFT wrapper's base model; FSDP2 shards gathered)."""
    return full_lm_head_weight(module.get_base_model() if hasattr(module, "get_base_model") else module)


def _packed_rows(data) -> int:
    """Rows of the remove-padding forward of ``data`` (every token of every sequence, prompts included)."""
    return data["input_ids"].values().shape[0] if data["input_ids"].is_nested else int(data["attention_mask"].sum())


def _check_rows(n_rows: int, data) -> int:
    n_tok = _packed_rows(data)
    if n_rows != n_tok:
        raise ValueError(
            f"captured: {n_rows} LM-head input rows for {n_tok} tokens (padded forward or sequence "
            "parallelism?); the worker extension needs verl's remove-padding forward"
        )
    return n_tok


def response_rows(data) -> tuple[torch.Tensor, torch.Tensor]:
    """``(rows [n], where [bs, R] bool)``: the rows of the packed forward of ``data`` (all micro-batches in
    batch order) whose LM-head input predicts a response token (row ``t`` predicts token ``t + 1``), in
    increasing order, and where each goes in verl's padded ``[bs, R]`` response layout (row-major order).
    Found with verl's own ``no_padding_2_padding`` on the row numbers, so the layout is exactly the one it
    gives the log-probs. Prompt rows, the last row of each sequence and padding are in neither."""
    n_tok = _packed_rows(data)
    where = no_padding_2_padding(torch.arange(1, n_tok + 1), data)  # 1-based row number, 0 at padding
    keep = where > 0
    return where[keep] - 1, keep


def nthr_scale_on_worker(data, output, captured: list, lm_head_weight: torch.Tensor, process_group,
                         options: Optional[dict] = None, *, rows_seen: Optional[int] = None) -> torch.Tensor:
    """``nthr_scale [bs, R]`` of one worker's share: ``data`` the TensorDict ``compute_log_prob`` received
    (verl's no-padding layout), ``output`` what ``infer_batch`` returned (nested ``log_probs``),
    ``captured`` the LM-head inputs of that forward in call order. ``rows_seen=None``: ``captured`` holds
    every row of the forward (``LMHeadInputCapture(model)``); else it holds only the rows that predict
    response tokens and ``rows_seen`` is the count of all rows (``LMHeadInputCapture(model,
    rows=response_rows(data)[0])`` and its ``rows_seen``: what ``compute_log_prob`` does, so that no prompt
    row is kept or copied)."""
    key = next((k for k in SCORE_KEYS if k in data.keys()), None)
    if key is None:
        raise ValueError(f"data: no outcome scores ({' or '.join(SCORE_KEYS)}) on the worker")
    uid = tu.get(data, "uid")
    if uid is None:
        raise ValueError("data: no 'uid' on the worker (the prompt group of each response)")
    temperature = tu.get(data, "temperature")
    if temperature is None:
        raise ValueError("temperature: not in the batch sent to compute_log_prob")
    if tu.get(data, "use_dynamic_bsz", default=False):
        raise ValueError("use_dynamic_bsz: reorders micro-batches, so the captured rows would not follow the batch")
    chunks = [c.reshape(-1, c.shape[-1]) for c in captured]
    if not chunks:
        raise ValueError("captured: no LM-head input was recorded (did the forward run inside the capture?)")
    n_rows = sum(c.shape[0] for c in chunks)
    _check_rows(n_rows if rows_seen is None else rows_seen, data)
    rows, where = response_rows(data)
    # verl keeps the worker's batch (and returns infer_batch's output) on the CPU while the captured LM-head
    # inputs live on the accelerator: everything goes to the hidden states' device (the scale comes back
    # on it; the caller moves it next to the output)
    dev = chunks[0].device
    if rows_seen is None:  # every row of the forward: take those that predict response tokens
        chunks = [torch.cat(chunks).index_select(0, rows.to(dev))]
    elif n_rows != rows.numel():
        raise ValueError(f"captured: {n_rows} rows kept, expected the {rows.numel()} that predict response tokens")
    # verl's padded [bs, R, d] response layout (no_padding_2_padding's, zeros at padding), filled chunk by chunk
    hidden = chunks[0].new_zeros((*where.shape, chunks[0].shape[-1]))
    flat, pos, at = hidden.view(-1, hidden.shape[-1]), where.reshape(-1).nonzero().squeeze(1).to(dev), 0
    for c in chunks:
        flat[pos[at: at + c.shape[0]]] = c
        at += c.shape[0]
    mask = data["response_mask"].to(dev).bool()
    old_log_probs = no_padding_2_padding(tu.get(output, "log_probs"), data).to(dev).float() * mask
    return compute_nthr_scale(
        data[key].to(dev).float(),
        mask,
        list(uid),
        responses=data["responses"].to(dev),
        old_hidden_states=hidden,
        old_log_probs=old_log_probs,
        lm_head_weight=lm_head_weight.to(dev),
        temperature=float(temperature),
        process_group=process_group,
        **(options or {}),
    )


class NTHRActorRolloutRefWorker(ActorRolloutRefWorker):
    """verl's ``ActorRolloutRefWorker`` whose ``compute_log_prob`` also returns ``nthr_scale`` (see the
    module docstring). ``nthr_options``: ``beta``, ``eta``, ``anchor``, ``reward_threshold``, ``backend``."""

    nthr_options: dict = {}

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def compute_log_prob(self, data):
        if self.enable_routing_replay:  # as the parent's _with_routing_replay_flag(enabled=True)
            tu.assign_non_tensor_data(data, "enable_routing_replay", True)
        if not any(k in data.keys() for k in SCORE_KEYS):
            output = self.actor.infer_batch(data)
            return output.cpu() if output is not None else None
        engine = self.actor.engine
        rows, _ = response_rows(data)  # keep only the rows that predict response tokens, as they come
        with torch.no_grad(), LMHeadInputCapture(engine.module, rows=rows) as cap:
            output = self.actor.infer_batch(data)
        scale = nthr_scale_on_worker(data, output, cap.captured, _full_weight(engine.module),
                                     engine.get_data_parallel_group(), self.nthr_options, rows_seen=cap.rows_seen)
        if output is None:  # a model-parallel rank without outputs: it took part in the collectives
            return None
        output[SCALE_KEY] = scale.to(output["log_probs"].device if "log_probs" in output.keys() else scale.device)
        return output.cpu()


def nthr_actor_worker(**options: Any) -> type:
    """A :class:`NTHRActorRolloutRefWorker` subclass with these NTHR options (checked here, once)."""
    return type("NTHRActorRolloutRefWorker", (NTHRActorRolloutRefWorker,), {"nthr_options": _check_options(options)})
