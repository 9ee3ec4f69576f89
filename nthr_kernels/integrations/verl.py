"""NTHR as a verl advantage estimator (``algorithm.adv_estimator=nthr``), worker side or driver side.

NTHR needs, besides the outcome rewards and the ``uid`` groups, the old policy's LM-head inputs of every
response token, their old log-probs, the LM-head weight and the sampling temperature. All of these exist on
the actor workers during the old-log-prob forward, and in verl 0.9's ``fit()`` the reward is computed
before that forward, so the whole computation can run there:

- **Worker side (recommended).** :class:`nthr_kernels.integrations.verl_worker.NTHRActorRolloutRefWorker`
  (imports verl) captures the LM-head inputs during ``compute_log_prob``, calls
  :func:`compute_nthr_scale` on each worker's share of the batch with ``process_group=`` the
  data-parallel group (verl's dispatch splits prompt groups over workers), and returns only
  ``nthr_scale [bs, R]`` (``eta`` on selected tokens, 1 elsewhere) with the old log-probs. On the driver the
  ``"nthr"`` estimator multiplies GRPO's advantages by ``batch["nthr_scale"]``: no hidden states and no
  weight leave the workers.
- **Driver side (fallback).** The actor stores ``batch["old_hidden_states"] [bs, R, d]`` next to
  ``old_log_probs`` (see ``examples/verl_capture.py``) and the driver passes the LM-head weight;
  :func:`compute_nthr_outcome_advantage` computes everything there.

Two ways in, the same for both sides:

- :func:`compute_nthr_advantage` (``data`` -> ``data`` with ``advantages``/``returns``): call it in place
  of ``compute_advantage`` in a custom trainer.
- Through verl's own ``compute_advantage``: :func:`register` adds ``"nthr"`` to verl's estimator registry
  (done on import when verl is importable). verl hands a registered estimator only
  ``token_level_rewards``, ``response_mask``, ``index`` and ``config``, so the remaining inputs come from
  the batch named by the :func:`nthr_inputs` context::

      with nthr_inputs(batch):                       # batch holds nthr_scale (worker side), or
      with nthr_inputs(batch, lm_head_weight=w):     # batch holds old_hidden_states (driver side)
          batch = compute_advantage(batch, adv_estimator="nthr", ...)

  The estimator checks that the rewards it receives are the tensor of that batch.

The tensor functions (:func:`compute_nthr_scale`, :func:`compute_nthr_outcome_advantage`,
:func:`scaled_grpo_advantage`) need neither verl nor Ray.
"""
from __future__ import annotations

import contextlib
import hashlib
import threading
from typing import Optional

import numpy as np
import torch

from .. import nthr_advantages
from ..core.rules import EtaSpec
from ..core.checks import check_float_tensor, check_real
from .lm_head import check_logits_form

__all__ = [
    "compute_nthr_scale",
    "scaled_grpo_advantage",
    "compute_nthr_outcome_advantage",
    "compute_nthr_advantage",
    "nthr_inputs",
    "register",
    "group_ids_from_uids",
    "global_group_ids",
    "LMHeadInputCapture",
    "HIDDEN_KEY",
    "SCALE_KEY",
]

HIDDEN_KEY = "old_hidden_states"  # driver side: the LM-head inputs [bs, R, d] the actor ships
SCALE_KEY = "nthr_scale"  # worker side: the per-token factor [bs, R] (eta or 1) the actor ships
_CTX = threading.local()


def _uid_array(index) -> np.ndarray:
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    arr = np.asarray(index, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"index: expected one uid per response (1-D), got shape {arr.shape}")
    try:
        return arr.astype(str)
    except TypeError as e:
        raise TypeError(f"index: uids must be strings or integers ({e})") from None


def group_ids_from_uids(index) -> torch.Tensor:
    """int64 group ids (order of first appearance) for verl's per-response ``uid`` array (strings or ints).
    Dense, but only meaningful within the one batch it sees (the driver's)."""
    _, first, inverse = np.unique(_uid_array(index), return_index=True, return_inverse=True)
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return torch.as_tensor(rank[inverse.reshape(-1)], dtype=torch.int64)


def global_group_ids(index) -> torch.Tensor:
    """int64 group ids that every worker computes alike from its own share of the uids: a 63-bit BLAKE2b
    digest of each uid's text (a collision among 10^4 groups has probability under 10^-11)."""
    arr = _uid_array(index)
    digest = {u: int.from_bytes(hashlib.blake2b(u.encode(), digest_size=8).digest(), "little") >> 1
              for u in set(arr.tolist())}
    return torch.tensor([digest[u] for u in arr.tolist()], dtype=torch.int64)


def _grpo_advantages(scores: torch.Tensor, gid: torch.Tensor, eps: float, norm_by_std: bool) -> torch.Tensor:
    """Per-response GRPO advantages: ``(s - mean_g) / (std_g + eps)`` with the unbiased std; a group of
    one response has mean 0 and std 1 (verl's convention)."""
    s = scores.to(torch.float64)
    n_g = int(gid.max()) + 1 if gid.numel() else 0
    cnt = torch.bincount(gid, minlength=n_g).to(torch.float64)
    mean = torch.zeros(n_g, dtype=torch.float64).index_add_(0, gid, s) / cnt.clamp_min(1)
    var = torch.zeros(n_g, dtype=torch.float64).index_add_(0, gid, (s - mean[gid]) ** 2) / (cnt - 1).clamp_min(1)
    std = var.sqrt()
    single = cnt == 1
    mean = torch.where(single, torch.zeros_like(mean), mean)
    std = torch.where(single, torch.ones_like(std), std)
    a = s - mean[gid]
    if norm_by_std:
        a = a / (std[gid] + eps)
    return a.to(torch.float32)


def _check_outcome(token_level_rewards, response_mask, index, **same_shape) -> np.ndarray:
    """Checks shared by both sides: ``[bs, R]`` rewards, the tensors in ``same_shape`` of that shape, one uid
    per response. Returns the uids."""
    check_float_tensor("token_level_rewards", token_level_rewards)
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards: expected [bs, R], got shape {tuple(token_level_rewards.shape)}")
    shape = tuple(token_level_rewards.shape)
    for name, x in (("response_mask", response_mask), *same_shape.items()):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (that of token_level_rewards), got {tuple(x.shape)}")
    uids = _uid_array(index)
    if uids.shape[0] != shape[0]:
        raise ValueError(f"index: expected {shape[0]} uids (one per response), got {uids.shape[0]}")
    return uids


def _response_grpo(token_level_rewards, index, epsilon, norm_adv_by_std_in_grpo) -> torch.Tensor:
    """GRPO's response-level advantages ``[bs]`` (float32, on the rewards' device); the outcome score of a
    response is its row sum, as in verl."""
    epsilon = check_real("epsilon", epsilon)
    if not isinstance(norm_adv_by_std_in_grpo, bool):
        raise TypeError("norm_adv_by_std_in_grpo: expected a bool")
    scores = token_level_rewards.float().sum(-1).cpu()
    return _grpo_advantages(scores, group_ids_from_uids(index), epsilon, norm_adv_by_std_in_grpo).to(
        token_level_rewards.device)


def _nthr_tokens(
    outcome: torch.Tensor,
    response_mask: torch.Tensor,
    group_ids: torch.Tensor,
    advantages: torch.Tensor,
    *,
    responses: torch.Tensor,
    old_hidden_states: torch.Tensor,
    old_log_probs: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float,
    process_group=None,
    beta: float = 1.0,
    eta: EtaSpec = "2|0.5-p|",
    anchor: str = "all",
    reward_threshold: Optional[float] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """NTHR token advantages ``[bs, R]`` for verl's layout, the one call both sides make.

    ``outcome [bs, R]``: token-level rewards or scores, summed over the response to the outcome score
    (binary: 0/1 by default, or correct iff ``> reward_threshold`` when one is given); ``responses [bs, R]`` the sampled ids;
    ``response_mask [bs, R]`` the tokens the policy generated (holes allowed, e.g. tool output);
    ``old_hidden_states [bs, R, d]`` the LM-head inputs that produced each response token's distribution;
    ``old_log_probs [bs, R]`` their temperature-scaled log-probs; ``lm_head_weight [V, d]``;
    ``temperature`` the rollout's; ``beta``, ``eta``, ``anchor``, ``reward_threshold``, ``backend`` as in
    :func:`nthr_kernels.nthr_advantages`.
    """
    return nthr_advantages(
        old_hidden_states,
        responses,
        outcome.float().sum(-1),
        advantages,
        lm_head_weight=lm_head_weight,
        old_logprobs=old_log_probs,
        temperature=temperature,
        mask=response_mask.bool(),
        group_ids=group_ids.to(outcome.device),
        beta=beta,
        eta=eta,
        anchor=anchor,
        reward_threshold=reward_threshold,
        backend=backend,
        process_group=process_group,
    ).token_advantages


def compute_nthr_scale(token_level_scores: torch.Tensor, response_mask: torch.Tensor, index, *,
                       process_group=None, **old_policy) -> torch.Tensor:
    """Worker side: the per-token NTHR factor ``nthr_scale [bs, R]`` (float32) of this worker's responses:
    ``eta`` of the group on selected negative tokens, 1 on every other token (padding included).

    ``old_policy``: the keyword arguments of :func:`_nthr_tokens` (``responses``, ``old_hidden_states``,
    ``old_log_probs``, ``lm_head_weight``, ``temperature``, options), for this worker's rows only.
    ``index`` (the ``uid`` of each row) becomes :func:`global_group_ids`, so with ``process_group``
    (verl's data-parallel group) a prompt group split over workers is scored over all of its responses;
    every rank of the group must call it. GRPO's advantage times this factor is NTHR's token advantage
    (:func:`scaled_grpo_advantage`) bit for bit: the library rescales by the same float32 product.
    """
    uids = _check_outcome(token_level_scores, response_mask, index, responses=old_policy.get("responses"),
                          old_log_probs=old_policy.get("old_log_probs"))
    ones = torch.ones(response_mask.shape[0], dtype=torch.float32, device=token_level_scores.device)
    tok = _nthr_tokens(token_level_scores, response_mask, global_group_ids(uids), ones,
                       process_group=process_group, **old_policy)
    return torch.where(response_mask.bool(), tok, torch.ones_like(tok))


def scaled_grpo_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    *,
    nthr_scale: torch.Tensor,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
):
    """Driver side of the worker path: ``(advantages [bs, R], returns [bs, R])`` = GRPO's response
    advantage times ``nthr_scale`` on the response tokens, 0 on padding. Reads no hidden state."""
    _check_outcome(token_level_rewards, response_mask, index, nthr_scale=nthr_scale)
    check_float_tensor("nthr_scale", nthr_scale)
    adv = _response_grpo(token_level_rewards, index, epsilon, norm_adv_by_std_in_grpo)
    m = response_mask.bool()
    a = torch.where(m, adv[:, None] * nthr_scale.to(adv.device, torch.float32), torch.zeros((), device=adv.device))
    return a, a.clone()


def compute_nthr_outcome_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor, index, *,
                                    epsilon: float = 1e-6, norm_adv_by_std_in_grpo: bool = True, **old_policy):
    """Driver side: GRPO outcome advantages refined by NTHR, as ``(advantages [bs, R], returns [bs, R])``
    (float32).

    ``index [bs]``: verl's ``uid`` per response (a prompt's responses share it, in any order);
    ``old_policy``: the keyword arguments of :func:`_nthr_tokens`. The response-level advantage is GRPO's
    (``norm_adv_by_std_in_grpo``, ``epsilon``); each selected negative token gets ``eta * A``. ``returns``
    equal ``advantages`` (as for GRPO). Padding gets 0. The driver holds the whole batch, so no group is
    split here.
    """
    uids = _check_outcome(token_level_rewards, response_mask, index, responses=old_policy.get("responses"),
                          old_log_probs=old_policy.get("old_log_probs"))
    adv = _response_grpo(token_level_rewards, index, epsilon, norm_adv_by_std_in_grpo)
    a = _nthr_tokens(token_level_rewards, response_mask, group_ids_from_uids(uids), adv, **old_policy)
    return a, a.clone()


# --------------------------------------------------------------------------------------------------
# capture on the worker
# --------------------------------------------------------------------------------------------------
class LMHeadInputCapture:
    """Context manager recording the lm_head input of every forward of ``model`` (in call order).

    ``captured``: a list of tensors (detached). Uses a forward pre-hook on ``model.get_output_embeddings()``;
    if a forward ends without the head being called (fused log-prob kernels), the backbone's
    ``last_hidden_state`` of that forward is recorded instead.

    ``rows=None``: each recorded tensor is kept whole (``[..., d]``, prompt rows included). ``rows``: a
    sorted 1-D integer tensor of indices into the rows of all forwards together (each recorded tensor
    flattened to ``[n, d]``, in call order); only those rows are kept (``captured`` then holds ``[k, d]``
    copies, one per forward, and the forward's own tensor is released with it). The verl worker passes the
    rows that predict response tokens (:func:`verl_worker.response_rows`), so the prompt rows and the last
    row of each sequence are never kept. ``rows_seen`` counts the rows recorded (all of them, kept or not).
    """

    def __init__(self, model, rows: Optional[torch.Tensor] = None):
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self.head = base.get_output_embeddings()
        self.backbone = base.base_model
        if self.head is None or self.backbone is base:
            raise ValueError("model: expected a Hugging Face causal LM with an lm_head and a backbone")
        check_logits_form(base, self.head)  # no bias, soft-capping or logit scale: logits = W h / T
        if rows is not None:
            if not isinstance(rows, torch.Tensor) or rows.dim() != 1 or rows.dtype.is_floating_point \
                    or rows.dtype.is_complex or rows.dtype == torch.bool:
                raise TypeError("rows: expected a 1-D integer tensor of row indices")
            rows = rows.to("cpu", torch.int64)
            if rows.numel() and (int(rows[0]) < 0 or bool((rows.diff() <= 0).any())):
                raise ValueError("rows: expected strictly increasing non-negative row indices")
        self.rows = rows
        self.rows_seen = 0
        self.captured: list = []
        self._rows_on: dict = {}
        self._pending: Optional[torch.Tensor] = None
        self._handles: list = []

    def _record(self, h: torch.Tensor) -> None:
        flat = h.reshape(-1, h.shape[-1])
        start, n = self.rows_seen, flat.shape[0]
        self.rows_seen += n
        if self.rows is None:
            self.captured.append(h)
            return
        lo, hi = (int(i) for i in torch.searchsorted(self.rows, torch.tensor([start, start + n])))
        on = self._rows_on.get(flat.device)
        if on is None:
            on = self._rows_on[flat.device] = self.rows.to(flat.device)
        self.captured.append(flat.index_select(0, on[lo:hi] - start))  # [0, d] when none is kept

    def __enter__(self):
        def on_backbone(_m, _a, out):
            if self._pending is not None:  # the head was never called on the previous backbone output
                self._record(self._pending)
            h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            self._pending = h.detach()

        def on_head(_m, args):
            self._record(args[0].detach())
            self._pending = None

        self._handles = [self.backbone.register_forward_hook(on_backbone), self.head.register_forward_pre_hook(on_head)]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        if self._pending is not None:
            self._record(self._pending)
            self._pending = None
        return False


# --------------------------------------------------------------------------------------------------
# DataProto level
# --------------------------------------------------------------------------------------------------
def _scalar_temperature(t) -> float:
    if isinstance(t, torch.Tensor):
        if t.numel() != 1 and not bool((t == t.reshape(-1)[0]).all()):
            raise ValueError("temperature: per-sample temperatures are not supported (NTHR needs one per batch)")
        t = t.reshape(-1)[0].item()
    return check_real("temperature", t)


def _temperature(data, temperature: Optional[float]) -> float:
    meta = getattr(data, "meta_info", None) or {}
    if temperature is None:
        if "temperature" not in meta:
            raise ValueError(
                "temperature: not given and data.meta_info has no 'temperature' (verl's actor sets it when it "
                "computes old_log_probs); pass the rollout temperature"
            )
        return _scalar_temperature(meta["temperature"])
    temperature = _scalar_temperature(temperature)
    if "temperature" in meta and _scalar_temperature(meta["temperature"]) != temperature:
        raise ValueError(f"temperature: {temperature} differs from data.meta_info['temperature']={meta['temperature']}")
    return temperature


def _batch_inputs(data, lm_head_weight, temperature, nthr_kwargs) -> dict:
    """The estimator's inputs beyond verl's four: ``nthr_scale`` when the workers computed it, else the
    driver-side tensors (which need ``lm_head_weight``)."""
    batch = data.batch
    if "uid" not in data.non_tensor_batch:
        raise ValueError("data: non_tensor_batch lacks 'uid' (the prompt group of each response)")
    if SCALE_KEY in batch.keys():
        extra = [k for k, v in (("lm_head_weight", lm_head_weight), ("temperature", temperature)) if v is not None]
        extra += sorted(nthr_kwargs)
        if extra:
            raise ValueError(
                f"{extra[0]}: data holds '{SCALE_KEY}' (computed on the workers with their own options); "
                f"pass no {', '.join(extra)} here"
            )
        return {"nthr_scale": batch[SCALE_KEY]}
    missing = [k for k in ("responses", "response_mask", "old_log_probs", HIDDEN_KEY, "token_level_rewards") if k not in batch.keys()]
    if missing:
        raise ValueError(
            f"data: batch lacks {missing} and '{SCALE_KEY}'; run NTHRActorRolloutRefWorker on the actor "
            f"(worker side) or have the actor store '{HIDDEN_KEY}' with old_log_probs (driver side)"
        )
    if lm_head_weight is None:
        raise ValueError(f"lm_head_weight: required on the driver side (data holds '{HIDDEN_KEY}', no '{SCALE_KEY}')")
    return dict(
        responses=batch["responses"],
        old_hidden_states=batch[HIDDEN_KEY],
        old_log_probs=batch["old_log_probs"],
        lm_head_weight=lm_head_weight,
        temperature=_temperature(data, temperature),
        **nthr_kwargs,
    )


def _outcome_advantage(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, kw):
    fn = scaled_grpo_advantage if "nthr_scale" in kw else compute_nthr_outcome_advantage
    return fn(token_level_rewards, response_mask, index, epsilon=epsilon,
              norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, **kw)


def compute_nthr_advantage(
    data,
    lm_head_weight: Optional[torch.Tensor] = None,
    *,
    temperature: Optional[float] = None,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    **nthr_kwargs,
):
    """Set ``data.batch["advantages"]`` and ``["returns"]`` (``[bs, R]``) from a verl ``DataProto`` holding
    ``response_mask``, ``token_level_rewards``, ``non_tensor_batch["uid"]`` and either ``nthr_scale``
    (worker side: nothing else) or ``responses``, ``old_log_probs``, ``old_hidden_states`` (driver side:
    also pass ``lm_head_weight``; ``nthr_kwargs``: ``beta``, ``eta``, ``anchor``, ``reward_threshold``,
    ``backend``). Returns ``data``."""
    kw = _batch_inputs(data, lm_head_weight, temperature, nthr_kwargs)
    adv, ret = _outcome_advantage(data.batch["token_level_rewards"], data.batch["response_mask"],
                                  data.non_tensor_batch["uid"], epsilon, norm_adv_by_std_in_grpo, kw)
    data.batch["advantages"] = adv
    data.batch["returns"] = ret
    return data


@contextlib.contextmanager
def nthr_inputs(data, lm_head_weight: Optional[torch.Tensor] = None, *, temperature: Optional[float] = None,
                **nthr_kwargs):
    """Make ``data``'s NTHR inputs (``nthr_scale``, or the driver-side tensors and ``lm_head_weight``)
    available to the registered ``"nthr"`` estimator inside the block."""
    kw = _batch_inputs(data, lm_head_weight, temperature, nthr_kwargs)
    prev = getattr(_CTX, "value", None)
    _CTX.value = (data.batch["token_level_rewards"], kw)
    try:
        yield data
    finally:
        _CTX.value = prev


def nthr_estimator(token_level_rewards, response_mask, config=None, index=None, epsilon: float = 1e-6,
                   norm_adv_by_std_in_grpo: Optional[bool] = None, **unused):
    """The function registered as ``"nthr"``: verl's estimator signature; the NTHR inputs come from the
    enclosing :func:`nthr_inputs` block."""
    ctx = getattr(_CTX, "value", None)
    if ctx is None:
        raise ValueError(
            "adv_estimator 'nthr': no NTHR inputs; call compute_advantage inside "
            "`with nthr_kernels.integrations.verl.nthr_inputs(batch):`"
        )
    rewards_ref, kw = ctx
    if (token_level_rewards.data_ptr(), tuple(token_level_rewards.shape)) != (rewards_ref.data_ptr(), tuple(rewards_ref.shape)):
        raise ValueError("adv_estimator 'nthr': the rewards passed in are not those of the batch given to nthr_inputs")
    if index is None:
        raise ValueError("index: verl passed no uid; NTHR needs the prompt group of every response")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    return _outcome_advantage(token_level_rewards, response_mask, index, epsilon, norm_adv_by_std_in_grpo, kw)


def _cfg_get(config, key, default):
    if config is None:
        return default
    if hasattr(config, "get"):
        return config.get(key, default)
    return getattr(config, key, default)


def register(name: str = "nthr") -> bool:
    """Add :func:`nthr_estimator` to verl's advantage-estimator registry; ``False`` if verl is not importable."""
    try:
        from verl.trainer.ppo import core_algos
    except ImportError:
        return False
    if core_algos.ADV_ESTIMATOR_REGISTRY.get(name) is not nthr_estimator:
        core_algos.register_adv_est(name)(nthr_estimator)
    return True


register()
