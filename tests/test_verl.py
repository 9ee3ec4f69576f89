"""The verl estimator on verl-shaped tensors (uid strings, response_mask, token_level_rewards), without verl.

verl pins another transformers and pulls Ray, so it lives in a venv of its own (``scripts/verl_env.sh``);
``tests/test_verl_real.py`` runs there against real verl. Here its registry is exercised with a stand-in
module that has verl's ``register_adv_est`` / ``get_adv_estimator_fn`` interface.
"""
from __future__ import annotations

import sys
import types

import numpy as np
import pytest
import torch

from nthr_kernels import nthr_advantages
from nthr_kernels.integrations import verl as nv
from nthr_kernels.synthetic import make_batch

G, N_GROUPS, T = 4, 6, 0.8


class FakeDataProto:
    """The three attributes of verl's DataProto the estimator reads."""

    def __init__(self, batch, non_tensor_batch, meta_info):
        self.batch, self.non_tensor_batch, self.meta_info = batch, non_tensor_batch, meta_info


def _data(holes=False, seed=0):
    b = make_batch(N_GROUPS, G, (0, 20), 16, 64, seed=seed, temperature=T, holes=holes)
    bs, r = b.token_ids.shape
    perm = torch.randperm(bs, generator=torch.Generator().manual_seed(seed))  # verl reorders the batch
    group = (torch.arange(bs) // G)[perm]
    mask = b.mask[perm]
    reward = b.rewards[perm]
    tlr = torch.zeros(bs, r)
    last = torch.where(mask.any(1), r - 1 - mask.flip(1).int().argmax(1), torch.zeros(bs, dtype=torch.int64))
    tlr[torch.arange(bs), last] = reward  # outcome reward on the last response token
    uid = np.array([f"uid-{int(g) * 37 % 101}" for g in group], dtype=object)
    data = FakeDataProto(
        {
            "responses": b.token_ids[perm],
            "response_mask": mask.long(),
            "token_level_rewards": tlr,
            "old_log_probs": b.old_logprobs[perm],
            nv.HIDDEN_KEY: b.hidden[perm],
        },
        {"uid": uid},
        {"temperature": T},
    )
    return data, b, group, reward


def _expected(data, b, group, reward, **kw):
    # GRPO per group (unbiased std, eps 1e-6), written out directly
    adv = torch.zeros(reward.numel())
    for g in group.unique():
        idx = (group == g).nonzero().squeeze(1)
        s = reward[idx].double()
        adv[idx] = ((s - s.mean()) / (s.std() + 1e-6)).float()
    return nthr_advantages(
        data.batch[nv.HIDDEN_KEY], data.batch["responses"], reward, adv, lm_head_weight=b.lm_head_weight,
        old_logprobs=data.batch["old_log_probs"], temperature=T, mask=data.batch["response_mask"].bool(),
        group_ids=group, **kw,
    )


@pytest.mark.parametrize("holes", [False, True])
def test_estimator_matches_direct_call(holes):
    data, b, group, reward = _data(holes, seed=int(holes))
    snap = {k: v.clone() for k, v in data.batch.items()}
    exp = _expected(data, b, group, reward)
    assert bool(exp.selected.any()) and bool(exp.active.any())
    out = nv.compute_nthr_advantage(data, b.lm_head_weight)
    assert torch.equal(out.batch["advantages"], exp.token_advantages)
    assert torch.equal(out.batch["returns"], exp.token_advantages)
    assert out.batch["advantages"].shape == data.batch["responses"].shape
    assert bool((out.batch["advantages"][data.batch["response_mask"] == 0] == 0).all())
    for k, v in snap.items():
        assert torch.equal(data.batch[k], v), k


def test_options_and_no_std_normalisation():
    data, b, group, reward = _data(seed=3)
    out = nv.compute_nthr_advantage(data, b.lm_head_weight, beta=0.0, eta="1-p", anchor="others",
                                    norm_adv_by_std_in_grpo=False)
    adv = torch.zeros(reward.numel())
    for g in group.unique():
        idx = (group == g).nonzero().squeeze(1)
        adv[idx] = (reward[idx] - reward[idx].mean())
    exp = nthr_advantages(
        data.batch[nv.HIDDEN_KEY], data.batch["responses"], reward, adv, lm_head_weight=b.lm_head_weight,
        old_logprobs=data.batch["old_log_probs"], temperature=T, mask=data.batch["response_mask"].bool(),
        group_ids=group, beta=0.0, eta="1-p", anchor="others",
    )
    torch.testing.assert_close(out.batch["advantages"], exp.token_advantages, rtol=1e-6, atol=1e-7)


def test_group_ids_from_uids():
    gid = nv.group_ids_from_uids(np.array(["b", "a", "b", "c", "a"], dtype=object))
    assert gid.tolist() == [0, 1, 0, 2, 1]
    assert nv.group_ids_from_uids([7, 3, 7]).tolist() == [0, 1, 0]
    with pytest.raises(ValueError, match="index"):
        nv.group_ids_from_uids(np.zeros((2, 2)))


def test_single_response_group_convention():
    # a group of one: mean 0, std 1 (the response keeps its score as advantage); not mixed, so no NTHR
    data, b, group, reward = _data(seed=4)
    data.non_tensor_batch["uid"] = np.array([f"u{i}" for i in range(reward.numel())], dtype=object)
    out = nv.compute_nthr_advantage(data, b.lm_head_weight)
    m = data.batch["response_mask"].bool()
    exp = (reward / (1 + 1e-6))[:, None].expand_as(m)
    torch.testing.assert_close(out.batch["advantages"][m], exp[m])


def test_bad_inputs():
    data, b, group, reward = _data(seed=5)
    data.meta_info = {}
    with pytest.raises(ValueError, match="temperature"):
        nv.compute_nthr_advantage(data, b.lm_head_weight)
    data.meta_info = {"temperature": 1.0}
    with pytest.raises(ValueError, match="temperature"):
        nv.compute_nthr_advantage(data, b.lm_head_weight, temperature=0.8)
    data.meta_info = {"temperature": torch.tensor([T, 1.0])}
    with pytest.raises(ValueError, match="per-sample"):
        nv.compute_nthr_advantage(data, b.lm_head_weight)
    data.meta_info = {"temperature": T}
    h = data.batch.pop(nv.HIDDEN_KEY)
    with pytest.raises(ValueError, match=nv.HIDDEN_KEY):
        nv.compute_nthr_advantage(data, b.lm_head_weight)
    data.batch[nv.HIDDEN_KEY] = h
    graded = 1.0 + torch.arange(reward.numel())[:, None] % 3  # rewards 1, 2, 3: not binary
    data.batch["token_level_rewards"] = data.batch["token_level_rewards"] * graded
    with pytest.raises(ValueError, match="rewards: expected binary"):
        nv.compute_nthr_advantage(data, b.lm_head_weight)
    with pytest.raises(ValueError, match="responses"):
        nv.compute_nthr_outcome_advantage(
            torch.zeros(2, 3), torch.ones(2, 3), ["a", "a"], responses=torch.zeros(2, 4, dtype=torch.long),
            old_hidden_states=torch.zeros(2, 3, 4), old_log_probs=torch.zeros(2, 3),
            lm_head_weight=torch.zeros(5, 4), temperature=1.0)


@pytest.fixture
def fake_verl(monkeypatch):
    """A stand-in for ``verl.trainer.ppo.core_algos`` with verl's registry interface."""
    registry = {}

    def register_adv_est(name):
        def deco(fn):
            if name in registry and registry[name] is not fn:
                raise ValueError(f"Adv estimator {name} has already been registered")
            registry[name] = fn
            return fn

        return deco

    core = types.SimpleNamespace(ADV_ESTIMATOR_REGISTRY=registry, register_adv_est=register_adv_est,
                                 get_adv_estimator_fn=lambda n: registry[n])
    for name, mod in (("verl", types.ModuleType("verl")), ("verl.trainer", types.ModuleType("verl.trainer")),
                      ("verl.trainer.ppo", types.ModuleType("verl.trainer.ppo"))):
        monkeypatch.setitem(sys.modules, name, mod)
    sys.modules["verl.trainer.ppo"].core_algos = core
    monkeypatch.setitem(sys.modules, "verl.trainer.ppo.core_algos", core)
    return core


def test_registered_estimator_through_verl_style_call(fake_verl):
    assert nv.register() and nv.register()  # idempotent
    data, b, group, reward = _data(seed=6)
    fn = fake_verl.get_adv_estimator_fn("nthr")
    # the keyword arguments verl's compute_advantage passes to a registered estimator
    kwargs = dict(token_level_rewards=data.batch["token_level_rewards"], response_mask=data.batch["response_mask"],
                  config={"norm_adv_by_std_in_grpo": True}, index=data.non_tensor_batch["uid"])
    with pytest.raises(ValueError, match="nthr_inputs"):
        fn(**kwargs)
    with nv.nthr_inputs(data, b.lm_head_weight):
        adv, ret = fn(**kwargs)
        with pytest.raises(ValueError, match="not those of the batch"):
            fn(**{**kwargs, "token_level_rewards": kwargs["token_level_rewards"].clone()})
    exp = _expected(data, b, group, reward)
    assert torch.equal(adv, exp.token_advantages) and torch.equal(ret, exp.token_advantages)


def test_register_without_verl(monkeypatch):
    monkeypatch.setitem(sys.modules, "verl", None)
    assert nv.register() is False


def test_worker_capture_example_runs():
    pytest.importorskip("transformers")
    import importlib.util
    import pathlib

    path = pathlib.Path(__file__).resolve().parents[1] / "examples" / "verl_capture.py"
    spec = importlib.util.spec_from_file_location("verl_capture_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    mod._demo()  # asserts the capture reproduces the model's log-probs in both layouts, then runs the estimator


def test_capture_keeps_only_the_rows_asked_for():
    """``LMHeadInputCapture(model, rows=...)`` keeps, of the rows of all forwards together (in call order),
    only the ones listed, as each forward comes: the same values as the whole capture, a [k, d] tensor per
    forward (possibly empty), and ``rows_seen`` counts every row."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    seqs = [torch.randint(0, 30, (1, n)) for n in (5, 3, 7)]
    rows = torch.tensor([1, 2, 3, 9, 10, 14])  # none of the second forward's rows (5..7)
    with torch.no_grad(), nv.LMHeadInputCapture(model) as whole, nv.LMHeadInputCapture(model, rows=rows) as some:
        for s in seqs:
            model(input_ids=s)
    assert whole.rows_seen == some.rows_seen == 15
    assert [tuple(c.shape) for c in some.captured] == [(3, 16), (0, 16), (3, 16)]
    every = torch.cat([c.reshape(-1, 16) for c in whole.captured])
    assert torch.equal(torch.cat(some.captured), every[rows])
    for bad, err in ((torch.tensor([2, 1]), ValueError), (torch.tensor([-1, 0]), ValueError),
                     (torch.tensor([[0]]), TypeError), (torch.tensor([0.0]), TypeError), ([0, 1], TypeError)):
        with pytest.raises(err, match="rows"):
            nv.LMHeadInputCapture(model, rows=bad)


def test_capture_refuses_models_whose_logits_are_not_wh():
    """docs/NTHR.md: models with an lm_head bias or logit soft-capping are out of scope and rejected
    clearly. The verl capture (also the worker extension's) accepted them, computing NTHR for W h / T."""
    transformers = pytest.importorskip("transformers")
    cfg = transformers.Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    nv.LMHeadInputCapture(transformers.Qwen2ForCausalLM(cfg))  # W h: accepted
    model = transformers.Qwen2ForCausalLM(cfg)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        nv.LMHeadInputCapture(model)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(30))
    with pytest.raises(ValueError, match="bias"):
        nv.LMHeadInputCapture(model)


def test_full_lm_head_weight_gathers_once_and_refuses_heads_it_cannot_use():
    """The TRL trainer and the verl worker read the LM-head weight through one function,
    ``integrations.lm_head.full_lm_head_weight`` (each had its own copy of the FSDP2 gather; the verl one
    checked the bias only): an FSDP2 ``DTensor`` is gathered once per call and returned detached; a
    partitioned head (FSDP1's flat shard, ZeRO-3) and logits that are not ``W h`` are refused."""
    transformers = pytest.importorskip("transformers")
    from nthr_kernels.integrations.lm_head import full_lm_head_weight

    cfg = transformers.Qwen2Config(vocab_size=30, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                   num_attention_heads=2, num_key_value_heads=1)
    model = transformers.Qwen2ForCausalLM(cfg)
    w = full_lm_head_weight(model)
    assert w.data_ptr() == model.lm_head.weight.data_ptr() and not w.requires_grad
    whole, calls = torch.randn(30, 16), []
    model.lm_head.weight.full_tensor = lambda: calls.append(1) or whole.clone().requires_grad_()  # as a DTensor
    w = full_lm_head_weight(model)
    assert calls == [1] and torch.equal(w, whole) and not w.requires_grad
    model.lm_head.weight = torch.nn.Parameter(torch.zeros(30 * 16 // 4))  # a flat shard
    with pytest.raises(ValueError, match="partitioned"):
        full_lm_head_weight(model)
    model = transformers.Qwen2ForCausalLM(cfg)
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="soft-capping"):
        full_lm_head_weight(model)


# --------------------------------------------------------------------------------------------------
# worker side: nthr_scale on the workers, GRPO times the scale on the driver
# --------------------------------------------------------------------------------------------------
def _scale_data(data, b):
    scale = nv.compute_nthr_scale(
        data.batch["token_level_rewards"], data.batch["response_mask"], data.non_tensor_batch["uid"],
        responses=data.batch["responses"], old_hidden_states=data.batch[nv.HIDDEN_KEY],
        old_log_probs=data.batch["old_log_probs"], lm_head_weight=b.lm_head_weight, temperature=T)
    worker = FakeDataProto({k: v for k, v in data.batch.items() if k != nv.HIDDEN_KEY}, data.non_tensor_batch, {})
    worker.batch[nv.SCALE_KEY] = scale
    return worker, scale


@pytest.mark.parametrize("holes", [False, True])
def test_worker_scale_equals_driver_path(holes):
    data, b, group, reward = _data(holes, seed=int(holes))
    worker, scale = _scale_data(data, b)
    m = data.batch["response_mask"].bool()
    exp = _expected(data, b, group, reward)
    assert bool(exp.selected.any())
    # 1 on every token but the selected ones, which carry their group's eta
    assert torch.equal(scale != 1, exp.selected & (exp.eta[group][:, None] != 1))
    assert bool((scale[~m] == 1).all())
    out = nv.compute_nthr_advantage(worker)  # no hidden states, no weight
    assert torch.equal(out.batch["advantages"], exp.token_advantages)
    assert torch.equal(out.batch["advantages"], nv.compute_nthr_advantage(data, b.lm_head_weight).batch["advantages"])


def test_worker_scale_refuses_driver_options():
    data, b, _, _ = _data(seed=0)
    worker, _ = _scale_data(data, b)
    for kw in (dict(lm_head_weight=b.lm_head_weight), dict(beta=0.0), dict(temperature=T)):
        with pytest.raises(ValueError, match="computed on the workers"):
            nv.compute_nthr_advantage(worker, **kw)
    with pytest.raises(ValueError, match="lm_head_weight: required"):
        nv.compute_nthr_advantage(data)


def test_global_group_ids_agree_across_shares():
    uid = np.array(["p-3", "p-1", "p-3", "p-2", "p-1", "p-2"], dtype=object)
    whole = nv.global_group_ids(uid)
    assert torch.equal(torch.cat([nv.global_group_ids(uid[:3]), nv.global_group_ids(uid[3:])]), whole)
    assert whole.unique().numel() == 3 and bool((whole >= 0).all())
    assert torch.equal(nv.global_group_ids([5, 5, 6]), nv.global_group_ids(["5", "5", "6"]))


def test_verl_integration_imports_without_trl():
    """The verl integration shares the LM-head check with the TRL trainer through a module that needs
    neither (``integrations.lm_head``): a verl install without TRL imports it (it once imported the check
    from ``integrations.trl``, which needs TRL, and the real-verl CI job failed to collect)."""
    import subprocess
    import sys

    code = ("import sys; sys.modules['trl'] = None\n"  # import trl raises ImportError, as without TRL
            "import nthr_kernels.integrations.verl as v, nthr_kernels.integrations.lm_head as h\n"
            "assert v.check_logits_form is h.check_logits_form\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]


def test_trl_integration_without_trl_names_an_install_that_works(monkeypatch):
    """Without TRL, importing the TRL trainer says what to install. It said ``pip install 'nthr-kernels[trl]'``,
    which fails: nthr-kernels is not on PyPI (it installs from a checkout, ``pip install -e '.[trl]'``)."""
    import importlib
    import sys

    monkeypatch.setitem(sys.modules, "trl", None)  # import trl raises ImportError, as without TRL
    monkeypatch.delitem(sys.modules, "nthr_kernels.integrations.trl", raising=False)
    with pytest.raises(ImportError) as ei:
        importlib.import_module("nthr_kernels.integrations.trl")
    msg = str(ei.value)
    assert "pip install 'trl>=1.16,<2'" in msg and "nthr-kernels[trl]" not in msg, msg
