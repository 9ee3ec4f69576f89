"""NTHR as a verl advantage estimator (``algorithm.adv_estimator=nthr``).

verl computes advantages on the driver from the rollout ``DataProto``. NTHR needs, besides the outcome
rewards and the ``uid`` groups, three things from the old policy, which the actor worker must put into the
batch when it computes ``old_log_probs`` (see ``examples/verl_capture.py``):

- ``batch["old_hidden_states"] [bs, R, d]``: the LM-head input that produced each response token's
  distribution (row ``t`` predicts response token ``t``);
- ``batch["old_log_probs"] [bs, R]``: the temperature-scaled log-probabilities verl already computes;
- the LM-head weight ``[V, d]`` of that same policy (passed to :func:`nthr_inputs` /
  :func:`compute_nthr_advantage`), and the sampling temperature (``meta_info["temperature"]``, which
  verl's actor sets, or passed explicitly).

Two ways in:

- :func:`compute_nthr_advantage` (``data`` -> ``data`` with ``advantages``/``returns``): call it in place
  of ``compute_advantage`` in a custom trainer.
- Through verl's own ``compute_advantage``: :func:`register` adds ``"nthr"`` to verl's estimator registry
  (done on import when verl is importable). verl hands a registered estimator only
  ``token_level_rewards``, ``response_mask``, ``index`` and ``config``, so the remaining inputs come from
  the batch named by the :func:`nthr_inputs` context::

      with nthr_inputs(batch, lm_head_weight=w):
          batch = compute_advantage(batch, adv_estimator="nthr", ...)

  The estimator checks that the rewards it receives are the tensor of that batch.

The pure tensor function :func:`compute_nthr_outcome_advantage` needs neither verl nor Ray.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Optional

import numpy as np
import torch

from .. import nthr_advantages
from ..core.rules import EtaSpec
from ..core.checks import check_float_tensor, check_real

__all__ = [
    "compute_nthr_outcome_advantage",
    "compute_nthr_advantage",
    "nthr_inputs",
    "register",
    "group_ids_from_uids",
    "HIDDEN_KEY",
]

HIDDEN_KEY = "old_hidden_states"
_CTX = threading.local()


def group_ids_from_uids(index) -> torch.Tensor:
    """int64 group ids (order of first appearance) for verl's per-response ``uid`` array (strings or ints)."""
    if isinstance(index, torch.Tensor):
        index = index.cpu().numpy()
    arr = np.asarray(index, dtype=object)
    if arr.ndim != 1:
        raise ValueError(f"index: expected one uid per response (1-D), got shape {arr.shape}")
    try:
        _, first, inverse = np.unique(arr.astype(str), return_index=True, return_inverse=True)
    except TypeError as e:
        raise TypeError(f"index: uids must be strings or integers ({e})") from None
    rank = np.empty_like(first)
    rank[np.argsort(first, kind="stable")] = np.arange(first.size)
    return torch.as_tensor(rank[inverse.reshape(-1)], dtype=torch.int64)


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


def compute_nthr_outcome_advantage(
    token_level_rewards: torch.Tensor,
    response_mask: torch.Tensor,
    index,
    *,
    responses: torch.Tensor,
    old_hidden_states: torch.Tensor,
    old_log_probs: torch.Tensor,
    lm_head_weight: torch.Tensor,
    temperature: float,
    epsilon: float = 1e-6,
    norm_adv_by_std_in_grpo: bool = True,
    beta: float = 1.0,
    eta: EtaSpec = "2|0.5-p|",
    anchor: str = "all",
    reward_threshold: Optional[float] = None,
    backend: str = "auto",
):
    """GRPO outcome advantages refined by NTHR, as ``(advantages [bs, R], returns [bs, R])`` (float32).

    ``token_level_rewards [bs, R]`` summed over the response give each response's outcome score (binary:
    0/1 by default, or correct iff ``> reward_threshold`` when one is given); ``index [bs]``: verl's ``uid`` per response (a prompt's responses
    share it, in any order); ``responses [bs, R]`` the sampled ids; ``response_mask [bs, R]`` the tokens
    the policy generated (holes allowed, e.g. tool output). The response-level advantage is GRPO's
    (``norm_adv_by_std_in_grpo``, ``epsilon``); each selected negative token gets ``eta * A``. ``returns``
    equal ``advantages`` (as for GRPO). Padding gets 0. verl computes advantages on the driver, which
    holds the whole batch, so no group is split here.
    """
    for name, x in (("token_level_rewards", token_level_rewards), ("old_log_probs", old_log_probs)):
        check_float_tensor(name, x)
    if token_level_rewards.dim() != 2:
        raise ValueError(f"token_level_rewards: expected [bs, R], got shape {tuple(token_level_rewards.shape)}")
    shape = tuple(token_level_rewards.shape)
    for name, x in (("response_mask", response_mask), ("responses", responses)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name}: expected a torch.Tensor, got {type(x).__name__}")
        if tuple(x.shape) != shape:
            raise ValueError(f"{name}: expected shape {shape} (that of token_level_rewards), got {tuple(x.shape)}")
    epsilon = check_real("epsilon", epsilon)
    if not isinstance(norm_adv_by_std_in_grpo, bool):
        raise TypeError("norm_adv_by_std_in_grpo: expected a bool")
    gid = group_ids_from_uids(index)
    if gid.numel() != shape[0]:
        raise ValueError(f"index: expected {shape[0]} uids (one per response), got {gid.numel()}")
    m = response_mask.bool()
    scores = token_level_rewards.float().sum(-1)  # as verl: the outcome score is the row sum
    dev = token_level_rewards.device
    adv = _grpo_advantages(scores.cpu(), gid, epsilon, norm_adv_by_std_in_grpo).to(dev)
    res = nthr_advantages(
        old_hidden_states,
        responses,
        scores,
        adv,
        lm_head_weight=lm_head_weight,
        old_logprobs=old_log_probs,
        temperature=temperature,
        mask=m,
        group_ids=gid.to(dev),
        beta=beta,
        eta=eta,
        anchor=anchor,
        reward_threshold=reward_threshold,
        backend=backend,
    )
    a = res.token_advantages
    return a, a.clone()


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


def _batch_inputs(data, lm_head_weight, temperature) -> dict:
    batch = data.batch
    missing = [k for k in ("responses", "response_mask", "old_log_probs", HIDDEN_KEY, "token_level_rewards") if k not in batch.keys()]
    if missing:
        raise ValueError(
            f"data: batch lacks {missing}; the actor must store '{HIDDEN_KEY}' with old_log_probs "
            "(see examples/verl_capture.py)"
        )
    if "uid" not in data.non_tensor_batch:
        raise ValueError("data: non_tensor_batch lacks 'uid' (the prompt group of each response)")
    return dict(
        responses=batch["responses"],
        old_hidden_states=batch[HIDDEN_KEY],
        old_log_probs=batch["old_log_probs"],
        lm_head_weight=lm_head_weight,
        temperature=_temperature(data, temperature),
    )


def compute_nthr_advantage(
    data,
    lm_head_weight: torch.Tensor,
    *,
    temperature: Optional[float] = None,
    norm_adv_by_std_in_grpo: bool = True,
    epsilon: float = 1e-6,
    **nthr_kwargs,
):
    """Set ``data.batch["advantages"]`` and ``["returns"]`` (``[bs, R]``) from a verl ``DataProto`` holding
    ``responses``, ``response_mask``, ``token_level_rewards``, ``old_log_probs``, ``old_hidden_states``
    and ``non_tensor_batch["uid"]``. ``nthr_kwargs``: ``beta``, ``eta``, ``anchor``, ``reward_threshold``,
    ``backend``. Returns ``data``."""
    kw = _batch_inputs(data, lm_head_weight, temperature)
    adv, ret = compute_nthr_outcome_advantage(
        data.batch["token_level_rewards"],
        data.batch["response_mask"],
        data.non_tensor_batch["uid"],
        epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo,
        **kw,
        **nthr_kwargs,
    )
    data.batch["advantages"] = adv
    data.batch["returns"] = ret
    return data


@contextlib.contextmanager
def nthr_inputs(data, lm_head_weight: torch.Tensor, *, temperature: Optional[float] = None, **nthr_kwargs):
    """Make ``data``'s old-policy tensors available to the registered ``"nthr"`` estimator inside the block."""
    kw = _batch_inputs(data, lm_head_weight, temperature)
    kw.update(nthr_kwargs)
    prev = getattr(_CTX, "value", None)
    _CTX.value = (data.batch["token_level_rewards"], kw)
    try:
        yield data
    finally:
        _CTX.value = prev


def nthr_estimator(token_level_rewards, response_mask, config=None, index=None, epsilon: float = 1e-6,
                   norm_adv_by_std_in_grpo: Optional[bool] = None, **unused):
    """The function registered as ``"nthr"``: verl's estimator signature; the old-policy inputs come from
    the enclosing :func:`nthr_inputs` block."""
    ctx = getattr(_CTX, "value", None)
    if ctx is None:
        raise ValueError(
            "adv_estimator 'nthr': no old-policy inputs; call compute_advantage inside "
            "`with nthr_kernels.integrations.verl.nthr_inputs(batch, lm_head_weight=W):`"
        )
    rewards_ref, kw = ctx
    if (token_level_rewards.data_ptr(), tuple(token_level_rewards.shape)) != (rewards_ref.data_ptr(), tuple(rewards_ref.shape)):
        raise ValueError("adv_estimator 'nthr': the rewards passed in are not those of the batch given to nthr_inputs")
    if index is None:
        raise ValueError("index: verl passed no uid; NTHR needs the prompt group of every response")
    if norm_adv_by_std_in_grpo is None:
        norm_adv_by_std_in_grpo = bool(_cfg_get(config, "norm_adv_by_std_in_grpo", True))
    return compute_nthr_outcome_advantage(
        token_level_rewards, response_mask, index, epsilon=epsilon,
        norm_adv_by_std_in_grpo=norm_adv_by_std_in_grpo, **kw,
    )


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
