"""Driver-side fallback for verl: ship the old policy's hidden states to the driver.

Prefer the worker side (``nthr_kernels.integrations.verl_worker.NTHRActorRolloutRefWorker``): it computes
NTHR on the workers and ships only ``nthr_scale [bs, R]``. This file is for trainers that cannot change the
actor worker class but can add a tensor to its output.

verl's actor computes ``old_log_probs`` with a no-grad forward of the policy over ``prompt + response``.
NTHR also needs the LM-head *inputs* of that forward at the response positions. This file shows how to
capture them and put them into the batch as ``old_hidden_states [bs, R, d]``; the driver then computes
advantages with :mod:`nthr_kernels.integrations.verl`.

What the worker must do (verl 0.9 layout: prompts left-padded, responses right-padded, ``seq = P + R``):

1. Around the forward that produces ``old_log_probs`` (the actor's ``compute_log_prob`` /
   ``infer_batch``), enter :class:`~nthr_kernels.integrations.verl.LMHeadInputCapture` on the *unwrapped* HF model. It records the
   tensor entering ``lm_head`` (a forward pre-hook gives exactly its inputs). When verl's fused kernels
   compute log-probs without calling ``lm_head`` (``use_fused_kernels=True``), it records the backbone's
   ``last_hidden_state`` instead (the same tensor).
2. Turn what was recorded into the response layout with :func:`response_hidden_states`: padded forwards
   give ``[bs, seq, d]``; remove-padding forwards (``use_remove_padding=True``) give ``[total_nnz, d]``,
   which is unpacked with the attention mask. Row ``P + t - 1`` predicts response token ``t``, so the
   response rows are ``[:, -R - 1 : -1]`` (the last ``R + 1`` positions without the last).
   With Ulysses sequence parallelism the packed rows are split over the SP group: all-gather them (as
   verl does for the log-probs) before unpacking.
3. Return ``old_hidden_states`` with ``old_log_probs`` (bf16 is fine: it halves the transfer; NTHR
   accumulates in float32). On the driver, also provide the LM-head weight of the same policy (e.g. one
   worker returns ``model.get_output_embeddings().weight`` gathered to full size, once per step).

Driver side::

    from nthr_kernels.integrations.verl import compute_nthr_advantage, nthr_inputs

    batch = compute_nthr_advantage(batch, lm_head_weight=w)        # custom trainer, or
    with nthr_inputs(batch, lm_head_weight=w):                     # verl's own compute_advantage
        batch = compute_advantage(batch, adv_estimator="nthr", ...)

Transfer cost per step: ``bs * R * d * 2`` bytes of hidden states (bf16) from the workers to the driver,
plus ``|V| * d * 2`` for the weight (Qwen2.5-1.5B: 467 MB).

Running this file (``python examples/verl_capture.py``) checks the capture on a tiny randomly initialised
model in verl's padded and remove-padding layouts, on CPU, and runs the estimator on the result. It needs
``transformers`` but neither verl nor Ray.
"""
from __future__ import annotations

import torch

from nthr_kernels.integrations.verl import LMHeadInputCapture


def response_hidden_states(hidden: torch.Tensor, attention_mask: torch.Tensor, response_length: int) -> torch.Tensor:
    """``[bs, R, d]`` lm-head inputs for the response tokens from a padded ``[bs, seq, d]`` or a
    remove-padding ``[total_nnz, d]`` (or ``[1, total_nnz, d]``) capture of a ``prompt + response`` forward."""
    bs, seq = attention_mask.shape
    if hidden.dim() == 3 and hidden.shape[0] == 1 and bs != 1 or hidden.dim() == 2:
        packed = hidden.reshape(-1, hidden.shape[-1])
        valid = attention_mask.bool()
        if packed.shape[0] != int(valid.sum()):
            raise ValueError(f"hidden: {packed.shape[0]} packed rows, attention_mask has {int(valid.sum())} tokens")
        full = packed.new_zeros(bs, seq, packed.shape[-1])
        full[valid] = packed
        hidden = full
    if hidden.shape[:2] != (bs, seq):
        raise ValueError(f"hidden: expected [{bs}, {seq}, d] or packed rows, got {tuple(hidden.shape)}")
    r = int(response_length)
    return hidden[:, -r - 1 : -1]


# --------------------------------------------------------------------------------------------------
# demo: a tiny model, verl's layout, both forward modes, then the estimator
# --------------------------------------------------------------------------------------------------
def _demo() -> None:
    import numpy as np
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from nthr_kernels.integrations.verl import HIDDEN_KEY, compute_nthr_advantage

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    model = Qwen2ForCausalLM(cfg).eval()
    bs, p, r, temperature = 8, 5, 7, 0.8
    prompt_len = torch.randint(2, p + 1, (bs,))
    resp_len = torch.randint(1, r + 1, (bs,))
    ids = torch.randint(1, 50, (bs, p + r))
    am = torch.zeros(bs, p + r, dtype=torch.long)
    for i in range(bs):
        am[i, p - int(prompt_len[i]) : p + int(resp_len[i])] = 1
    responses, response_mask = ids[:, p:], am[:, p:]
    pos = (am.cumsum(1) - 1).clamp_min(0)

    # padded forward, the way the actor computes old_log_probs from the logits
    with torch.no_grad(), LMHeadInputCapture(model) as cap:
        logits = model(input_ids=ids, attention_mask=am, position_ids=pos).logits
    old_log_probs = torch.log_softmax(logits[:, -r - 1 : -1] / temperature, -1).gather(-1, responses[..., None]).squeeze(-1)
    hidden = response_hidden_states(cap.captured[0], am, r)
    w = model.get_output_embeddings().weight.detach()
    own = torch.log_softmax(hidden @ w.T / temperature, -1).gather(-1, responses[..., None]).squeeze(-1)
    m = response_mask.bool()
    assert torch.allclose(own[m], old_log_probs[m], atol=1e-5), "capture misaligned"

    # remove-padding layout: unpack the packed capture back to [bs, R, d]
    packed = cap.captured[0][am.bool()]
    assert torch.equal(response_hidden_states(packed, am, r)[m], hidden[m])

    rewards = (torch.rand(bs) < 0.5).float()
    tlr = torch.zeros(bs, r)
    tlr[torch.arange(bs), resp_len - 1] = rewards
    uids = np.array([f"prompt-{i // 4}" for i in range(bs)], dtype=object)

    class DataProtoLike:  # the attributes of verl.DataProto the estimator reads
        batch = {"responses": responses, "response_mask": response_mask, "token_level_rewards": tlr,
                 "old_log_probs": old_log_probs * m, HIDDEN_KEY: hidden}
        non_tensor_batch = {"uid": uids}
        meta_info = {"temperature": temperature}

    data = compute_nthr_advantage(DataProtoLike(), w)
    print("capture aligned with the model's log-probs; advantages", tuple(data.batch["advantages"].shape))
    print(data.batch["advantages"])


if __name__ == "__main__":
    _demo()
