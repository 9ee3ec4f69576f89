"""Hidden-state alignment on a real (tiny, randomly initialised) transformers causal LM.

NTHR.md: h_{i,k} is the lm_head input at absolute position ``prompt_len + k - 1`` (0-based k). Taken
that way, ``W h`` reproduces the model's own logits for every completion token, and NTHR computed
from (hidden, lm_head weight, old log-probs) equals NTHR computed from the model's logits.
"""
import pytest
import torch

import nthr_kernels as nk

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )
    m = transformers.Qwen2ForCausalLM(cfg).eval()
    return m


def _rollouts(model, n_resp=6, prompt_len=5, comp_len=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    prompt = torch.randint(0, 97, (prompt_len,), generator=g)
    comp = torch.randint(0, 97, (n_resp, comp_len), generator=g)
    ids = torch.cat([prompt.expand(n_resp, -1), comp], 1)
    with torch.no_grad():
        out = model(input_ids=ids, output_hidden_states=True)
    return ids, comp, out


def test_hidden_states_reproduce_logits(model):
    ids, comp, out = _rollouts(model)
    P, L = 5, comp.shape[1]
    last = out.hidden_states[-1]  # after the final norm: the lm_head input
    h = last[:, P - 1 : P - 1 + L]  # row k predicts completion token k
    logits = out.logits[:, P - 1 : P - 1 + L]
    torch.testing.assert_close(h @ model.lm_head.weight.T, logits, rtol=1e-5, atol=1e-5)
    # the off-by-one alignment does not
    wrong = last[:, P : P + L - 1] @ model.lm_head.weight.T
    assert not torch.allclose(wrong, logits[:, : L - 1], atol=1e-3)
    # and a pre-hook on lm_head sees exactly these inputs
    seen = {}
    hook = model.lm_head.register_forward_pre_hook(lambda mod, args: seen.__setitem__("x", args[0].detach()))
    try:
        with torch.no_grad():
            model(input_ids=ids)
    finally:
        hook.remove()
    torch.testing.assert_close(seen["x"][:, P - 1 : P - 1 + L], h)


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_nthr_from_hidden_equals_nthr_from_logits(model, temperature):
    ids, comp, out = _rollouts(model, n_resp=8, seed=1)
    P, L = 5, comp.shape[1]
    h = out.hidden_states[-1][:, P - 1 : P - 1 + L]
    logits = out.logits[:, P - 1 : P - 1 + L]
    old_lp = torch.log_softmax(logits.double() / temperature, -1).gather(-1, comp[..., None]).squeeze(-1).float()
    rewards = torch.tensor([1, 0, 0, 1, 0, 1, 1, 0], dtype=torch.float32)
    adv = (rewards - rewards.mean()) / rewards.std()
    mask = torch.ones(8, L, dtype=torch.bool)
    mask[2, 5:] = False  # a shorter response
    common = dict(mask=mask, group_size=8, temperature=temperature, beta=0.0, backend="torch")
    a = nk.nthr_advantages(h, comp, rewards, adv, lm_head_weight=model.lm_head.weight, old_logprobs=old_lp, **common)
    b = nk.nthr_advantages(h, comp, rewards, adv, logits=logits, **common)
    r = nk.nthr_advantages(h, comp, rewards, adv, logits=logits, **{**common, "backend": "reference"})
    scale = float(r.scores.abs().max())
    assert float((a.scores - r.scores).abs().max()) <= 1e-4 * scale
    assert float((b.scores - r.scores).abs().max()) <= 1e-4 * scale
    assert bool(r.active.all())
