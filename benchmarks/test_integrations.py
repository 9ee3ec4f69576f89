"""What each trainer integration costs, measured against the same trainer without NTHR in one run.

- TRL: one training step (generate + score + advantages, then one loss forward/backward) of
  ``NTHRGRPOTrainer`` against ``GRPOTrainer`` with the same config and the same sampled batch, in each
  capture mode: ``generate`` (hidden states recorded during ``generate()``), ``old_logps`` (recorded in
  the forward TRL runs for its old log-probs: ``num_iterations=2``), ``forward`` (the extra forward; on
  GPU the mode of vLLM with the importance-sampling correction off). The tiny model of
  ``examples/trl_train.py``, 8 prompts x 4 generations, up to 24 new tokens.
- verl: advantages for one rollout batch computed on the driver (it receives the hidden states and the
  LM-head weight: serialised and deserialised here, as Ray would) against the worker side (2 gloo ranks
  standing in for the data-parallel group: each computes ``nthr_scale`` for its contiguous half, prompt
  groups straddling the cut, and ships only that). Bytes moved are reported for the tiny shape
  (measured serialised sizes) and, from the formula, for qwen1.5b-step.

Rounds are interleaved (baseline, NTHR, NTHR, baseline, ...) after one warm-up each, one torch thread per
process; the ratio is of medians.

    pytest benchmarks/test_integrations.py --benchmark-only -s

``python -m benchmarks.integrations_report`` runs this into ``benchmarks/results/integrations-<date>.json``
(pytest-benchmark's JSON, the numbers in each benchmark's ``extra_info``) and writes the README's figures
from it.
"""
from __future__ import annotations

import copy
import importlib.util
import io
import os
import pathlib
import statistics
import time
import warnings

import pytest
import torch

ROUNDS = 6  # timed rounds per variant (after one warm-up); 1 untimed round under --benchmark-disable


def _rounds(benchmark) -> int:
    return ROUNDS if benchmark.enabled else 0


def _interleaved(fns: dict, rounds: int) -> dict:
    """Median seconds of each zero-argument function over ``rounds`` interleaved calls (the order reversed
    every other round), after one warm-up (nothing with 0 rounds)."""
    if rounds == 0:
        return {}
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for i in range(rounds):
        for k, fn in (list(fns.items()) if i % 2 == 0 else list(fns.items())[::-1]):
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items() if v}


# --------------------------------------------------------------------------------------------------
# TRL
# --------------------------------------------------------------------------------------------------
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
warnings.filterwarnings("ignore")

_spec = importlib.util.spec_from_file_location(
    "trl_train_example", pathlib.Path(__file__).resolve().parents[1] / "examples" / "trl_train.py")
example = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(example)

G, PROMPTS = 4, ["1+2=", "3+4=", "ab", "9 9", "j=", "0+0=", "5 5", "cd"]
# the GRPOConfig fields that select each capture mode on CPU
TRL_MODES = {"generate": {}, "old_logps": {"num_iterations": 2}, "forward": {}}


def _trl_trainer(cls, tmp, cfg, **kw):
    from trl import GRPOConfig

    args = GRPOConfig(output_dir=str(tmp), per_device_train_batch_size=len(PROMPTS) * G // 2, num_generations=G,
                      steps_per_generation=2, max_completion_length=24, report_to="none", use_cpu=True,
                      save_strategy="no", seed=0, bf16=False, **cfg)
    tr = cls(model=example.tiny_model(0), reward_funcs=example.parity_reward, args=args,
             train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), processing_class=example.tiny_tokenizer(),
             **kw)
    tr.model.train()
    tr.current_gradient_accumulation_steps = 1
    return tr


def _trl_step(tr, rows):
    def step():
        torch.manual_seed(0)
        out = tr._generate_and_score_completions(copy.deepcopy(rows))
        tr._compute_loss(tr.model, out).backward()
        tr.model.zero_grad(set_to_none=True)
    return step


@pytest.fixture
def one_thread():
    """One torch thread, as each verl rank below: on a shared, loaded machine tiny matmuls with several
    threads time the contention, not the work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _probe(monkeypatch, owner, name, times: list, only=None):
    """Replace ``owner.name`` by a wrapper appending each call's seconds to ``times`` (calls whose first
    argument is an instance of ``only``, if given)."""
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            if only is None or isinstance(args[0], only):
                times.append(time.perf_counter() - t0)

    monkeypatch.setattr(owner, name, timed)


@pytest.mark.parametrize("mode", list(TRL_MODES))
def test_trl_step(benchmark, tmp_path, one_thread, monkeypatch, mode):
    from trl import GRPOTrainer

    import nthr_kernels.integrations.trl as nthr_trl
    from nthr_kernels.integrations.trl import NTHRGRPOTrainer

    cfg = TRL_MODES[mode]
    grpo = _trl_trainer(GRPOTrainer, tmp_path / "g", cfg)
    nthr = _trl_trainer(NTHRGRPOTrainer, tmp_path / "n", cfg, nthr_beta=0.0, nthr_capture=mode)
    rows = [{"prompt": p} for p in PROMPTS for _ in range(G)]
    # inside NTHRGRPOTrainer's step: the kernel call, TRL's batch (the parent's method) and the whole method;
    # the trainer's work after TRL's batch is ready = whole - TRL's batch
    kernel, inner, outer = [], [], []
    _probe(monkeypatch, nthr_trl, "nthr_advantages", kernel)
    _probe(monkeypatch, GRPOTrainer, "_generate_and_score_completions", inner, only=NTHRGRPOTrainer)
    _probe(monkeypatch, NTHRGRPOTrainer, "_generate_and_score_completions", outer)
    med = _interleaved({"grpo": _trl_step(grpo, rows), "nthr": _trl_step(nthr, rows)}, _rounds(benchmark))
    if med:
        ratio = med["nthr"] / med["grpo"]
        n = _rounds(benchmark)  # the timed rounds: the warm-up call comes first
        kernel_s = statistics.median(kernel[-n:])
        after_s = statistics.median(o - i for o, i in zip(outer[-n:], inner[-n:]))
        benchmark.extra_info.update(mode=mode, grpo_s=med["grpo"], nthr_s=med["nthr"], ratio=ratio,
                                    kernel_s=kernel_s, after_batch_s=after_s,
                                    rounds=_rounds(benchmark), threads=torch.get_num_threads())
        print(f"\nTRL step, capture={mode}: GRPOTrainer {med['grpo'] * 1e3:.0f} ms, NTHRGRPOTrainer "
              f"{med['nthr'] * 1e3:.0f} ms, ratio {ratio:.3f}; nthr_advantages {kernel_s * 1e3:.2f} ms, "
              f"trainer's work after TRL's batch {after_s * 1e3:.1f} ms (medians of {n} calls)")
    benchmark.pedantic(_trl_step(nthr, rows), rounds=1, iterations=1)
    assert nthr.nthr_last is not None and nthr.nthr_capture == mode


# --------------------------------------------------------------------------------------------------
# verl: driver side vs worker side
# --------------------------------------------------------------------------------------------------
VERL_SHAPE = dict(n_groups=16, group_size=8, lengths=(32, 256), d=256, vocab=8192)  # tiny stand-in
WORLD = 2
# qwen1.5b-step: 64 groups x 8 responses, lengths 256..1792, Qwen2.5-1.5B (d, |V|), bf16
QWEN = dict(bs=512, r_max=1792, mean_len=(256 + 1792) / 2, d=1536, vocab=151936, bf16=2, f32=4)


def transfer_bytes_per_step(bs, r_max, mean_len, d, vocab, bf16, f32) -> dict:
    """Bytes the workers send the driver for NTHR per step (formula). Driver side: the hidden states of
    every response token (bf16; padded to ``r_max`` as verl ships ``[bs, R, d]``, or unpadded) plus the
    LM-head weight; worker side: ``nthr_scale [bs, R]`` in float32."""
    return dict(driver_hidden_padded=bs * r_max * d * bf16, driver_hidden_unpadded=int(bs * mean_len * d * bf16),
                driver_weight=vocab * d * bf16, worker_scale=bs * r_max * f32)


def _verl_data(seed=0):
    import numpy as np

    from nthr_kernels.synthetic import make_batch

    b = make_batch(**VERL_SHAPE, seed=seed, temperature=1.0)
    bs, r = b.token_ids.shape
    tlr = torch.zeros(bs, r)
    last = (b.mask.sum(1) - 1).clamp_min(0)
    tlr[torch.arange(bs), last] = b.rewards
    # contiguous groups shifted by half a group: verl's contiguous split cuts groups at the rank boundary
    shift = VERL_SHAPE["group_size"] // 2
    uid = np.array([f"g{(i + shift) // VERL_SHAPE['group_size']}" for i in range(bs)], dtype=object)
    bf16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731  (bf16 values, as a bf16 policy has)
    return dict(tlr=tlr, mask=b.mask, uid=uid, responses=b.token_ids, hidden=bf16(b.hidden),
                old_log_probs=b.old_logprobs, weight=bf16(b.lm_head_weight))


def _ship(*tensors, dtype=None) -> tuple:
    """Serialise (in ``dtype`` if given) and deserialise to float32, as a Ray object transfer would;
    returns (tensors, bytes)."""
    buf = io.BytesIO()
    torch.save([t if dtype is None else t.to(dtype) for t in tensors], buf)
    n = buf.tell()
    buf.seek(0)
    return [t.float() for t in torch.load(buf)], n


def _driver_side(data, backend="auto"):
    from nthr_kernels.integrations.verl import compute_nthr_outcome_advantage

    (hidden, weight), n = _ship(data["hidden"], data["weight"], dtype=torch.bfloat16)
    adv, _ = compute_nthr_outcome_advantage(data["tlr"], data["mask"], data["uid"], responses=data["responses"],
                                            old_hidden_states=hidden, old_log_probs=data["old_log_probs"],
                                            lm_head_weight=weight, temperature=1.0, beta=0.0, backend=backend)
    return adv, n


def _verl_rank(rank, init_file, out_dir, rounds):
    import torch.distributed as dist

    from nthr_kernels.integrations.verl import compute_nthr_scale

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    data = _verl_data()
    half = data["tlr"].shape[0] // WORLD
    sl = slice(rank * half, (rank + 1) * half)

    def step():
        dist.barrier()
        scale = compute_nthr_scale(data["tlr"][sl], data["mask"][sl], data["uid"][sl],
                                   responses=data["responses"][sl], old_hidden_states=data["hidden"][sl],
                                   old_log_probs=data["old_log_probs"][sl], lm_head_weight=data["weight"],
                                   temperature=1.0, process_group=dist.group.WORLD, beta=0.0)
        return _ship(scale)

    (scale,), n = step()  # warm-up
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    torch.save(dict(scale=scale, bytes=n, times=times), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def test_verl_driver_vs_worker(benchmark, tmp_path, one_thread):
    import torch.multiprocessing as mp

    from nthr_kernels.integrations.verl import scaled_grpo_advantage

    rounds = _rounds(benchmark)
    mp.spawn(_verl_rank, args=(str(tmp_path / "init"), str(tmp_path), rounds), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    data = _verl_data()
    with torch.inference_mode():
        adv, n_driver = _driver_side(data)
        # "auto" picks the native CPU kernels; the distributed path on the workers runs the torch backend
        med = _interleaved({"driver": lambda: _driver_side(data), "driver_torch": lambda: _driver_side(data, "torch")},
                           rounds)
    worker_adv, _ = scaled_grpo_advantage(data["tlr"], data["mask"], data["uid"],
                                          nthr_scale=torch.cat([r["scale"] for r in ranks]))
    assert torch.equal(worker_adv, adv)  # the two paths give the same advantages
    n_worker = sum(r["bytes"] for r in ranks)
    formula = transfer_bytes_per_step(**QWEN)
    benchmark.extra_info.update(bytes_driver_tiny=n_driver, bytes_worker_tiny=n_worker, qwen_formula=formula)
    if med:
        worker_s = statistics.median(max(ts) for ts in zip(*(r["times"] for r in ranks)))
        benchmark.extra_info.update(driver_s=med["driver"], driver_torch_s=med["driver_torch"], worker_s=worker_s,
                                    ratio=med["driver"] / worker_s, ratio_torch=med["driver_torch"] / worker_s,
                                    rounds=rounds, world=WORLD, verl_shape=VERL_SHAPE, qwen_shape=QWEN)
        print(f"\nverl advantages, {VERL_SHAPE}: driver side {med['driver'] * 1e3:.1f} ms (native backend; torch "
              f"backend {med['driver_torch'] * 1e3:.1f} ms), {n_driver / 1e6:.2f} MB shipped; worker side (2 ranks, "
              f"torch backend) {worker_s * 1e3:.1f} ms, {n_worker / 1e6:.3f} MB shipped; driver/worker "
              f"{med['driver'] / worker_s:.2f} (torch backend on both: {med['driver_torch'] / worker_s:.2f})")
        print("qwen1.5b-step bytes per step (formula): " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in formula.items()))
    benchmark.pedantic(lambda: _driver_side(data), rounds=1, iterations=1)
