"""No two random streams of the GRPO loop, the LLD study and the default model's pretraining coincide.

The draws are recorded where they happen: every ``AdditionTask.sample_problems`` seed (Python's
``random.Random`` streams: the problems), every ``torch.manual_seed`` (the model's initialisation), the
generator each rollout samples from and the seed of each evaluation (torch streams). The heavy parts
(sampling, the updates) are stubbed out: only the seeds matter here. Before, the GRPO run of seed 0 sampled
its responses from the initialisation stream (``manual_seed(0)``), seed s evaluated on seed s + 7's rollout
stream, seed 0 trained on the problems of the pretraining's first steps (``seed * 7919 + step``) and the
LLD study's seed 0 asked the questions of the pretraining's first batches (``seed * 100_003 + b``).
"""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from nthr_kernels.grpo import lld, loop
from nthr_kernels.grpo import model as model_mod
from nthr_kernels.grpo.demo import FULL_STUDY
from nthr_kernels.grpo.model import DEFAULT_SPEC
from nthr_kernels.grpo.task import AdditionTask

RUN_SEEDS = list(range(10))  # several seeds of one study, compared in one table
STEPS = 4


@pytest.fixture
def draws(monkeypatch):
    """``(who, seed)`` of every problem draw and every torch stream, with ``who`` set by the test."""
    rec = SimpleNamespace(who="?", problems=[], torch=[], quiet=False)
    sample = AdditionTask.sample_problems

    def sample_problems(self, n, seed, exclude=frozenset()):
        if not rec.quiet or exclude:  # quiet: problems drawn again only to be left out (held_out_problems)
            rec.problems.append((rec.who, seed))
        return sample(self, n, seed, exclude)

    manual_seed = torch.manual_seed

    def recording_manual_seed(seed):
        rec.torch.append((rec.who, int(seed)))
        return manual_seed(seed)

    monkeypatch.setattr(AdditionTask, "sample_problems", sample_problems)
    monkeypatch.setattr(torch, "manual_seed", recording_manual_seed)
    return rec


def _stub_rollouts(monkeypatch, module, rec, mixed: bool):
    def collect_rollout(model, task, problems, *, group_size, temperature, generator, **_):
        rec.torch.append((rec.who, generator.initial_seed()))  # one generator per run, continued step after step
        n = len(problems) * group_size
        rewards = torch.tensor([float(mixed and i % 2) for i in range(n)])
        return SimpleNamespace(mask=torch.ones(n, 1, dtype=torch.bool), rewards=rewards, n_groups=len(problems),
                               mixed_groups=lambda: torch.zeros(len(problems), dtype=torch.bool))

    monkeypatch.setattr(module, "collect_rollout", collect_rollout)


def _stub_training(monkeypatch, rec):
    _stub_rollouts(monkeypatch, loop, rec, mixed=True)
    monkeypatch.setattr(loop, "token_advantages",
                        lambda model, ro, method, **k: (torch.zeros_like(ro.mask, dtype=torch.float32),
                                                        torch.zeros_like(ro.mask)))
    monkeypatch.setattr(loop, "grpo_step", lambda *a, **k: {})

    def evaluate(model, task, problems, *, seed, **_):
        rec.torch.append((f"{rec.who} evaluation", seed))  # the same samples at every evaluation: one stream
        return 0.0

    monkeypatch.setattr(loop, "evaluate", evaluate)
    held_out = loop.held_out_problems

    def quiet_held_out(*args, **kw):
        """The held-out set draws the pretraining's and the run's problems again, to leave them out: those are
        not streams of its own (its own draw, with ``exclude``, is recorded)."""
        rec.quiet = True
        try:
            return held_out(*args, **kw)
        finally:
            rec.quiet = False

    monkeypatch.setattr(loop, "held_out_problems", quiet_held_out)


def _pretraining(rec):
    """The default model's pretraining draws (its seed and steps; a model small enough to train in a blink)."""
    spec = replace(DEFAULT_SPEC, hidden_size=4, intermediate_size=4, num_hidden_layers=1, num_attention_heads=1,
                   num_key_value_heads=1, batch_size=1, warmup=1)
    rec.who = "pretraining"
    model_mod.pretrain(spec, progress=False)


def _train_runs(rec, method="grpo"):
    task = AdditionTask(DEFAULT_SPEC.n_digits)
    for s in RUN_SEEDS:
        rec.who = f"train seed {s}"
        loop.train(torch.nn.Linear(1, 1), task, method=method, steps=STEPS, prompts_per_step=2, group_size=2,
                   eval_every=2, seed=s, progress=False)


def _lld_seeds(rec):
    task = AdditionTask(DEFAULT_SPEC.n_digits)
    for s in FULL_STUDY.seeds:
        rec.who = f"lld seed {s}"
        with pytest.raises(RuntimeError, match="no mixed group"):
            lld.collect_mixed_groups(None, task, 1, group_size=2, seed=s, batch_prompts=2, max_batches=3,
                                     progress=False)
        for purpose in ("random selection", "top-K random baseline"):  # the study's other streams
            rec.torch.append((f"{rec.who} {purpose}", lld.stream(s, purpose).initial_seed()))


def _clashes(records, bits=None):
    """Seeds with more than one owner; with ``bits``, seeds compared mod ``2**bits``."""
    owners = {}
    for who, seed in records:
        owners.setdefault(seed if bits is None else seed % 2**bits, set()).add(who)
    return {seed: sorted(w) for seed, w in owners.items() if len(w) > 1}


def test_no_two_streams_coincide(monkeypatch, draws):
    _stub_training(monkeypatch, draws)
    _stub_rollouts(monkeypatch, lld, draws, mixed=False)
    _pretraining(draws)
    _train_runs(draws)
    _lld_seeds(draws)
    assert ("pretraining", DEFAULT_SPEC.seed) in draws.torch  # the model's initialisation stream was seen
    n_problem_draws = DEFAULT_SPEC.steps + len(RUN_SEEDS) * (STEPS + 1) + 3 * len(FULL_STUDY.seeds)
    assert len(draws.problems) == n_problem_draws
    assert _clashes(draws.problems) == {}  # problems: pretraining vs runs vs the study, steps, seeds
    assert len({s for _, s in draws.problems}) == n_problem_draws  # and no step or batch repeats another's
    # init vs rollouts vs evaluation vs the study's streams; a CPU torch.Generator draws from the low 32 bits of
    # its seed only (test_torch_streams_depend_on_the_low_32_bits), so the seeds are compared mod 2**32
    assert _clashes(draws.torch, bits=32) == {}


def test_torch_streams_depend_on_the_low_32_bits():
    """Why the torch seeds are compared mod 2**32 above: seeds that agree there give the same draws, however far
    apart (a derived seed of 2**62 + s is the stream of manual_seed(s)); Python's random.Random uses every bit."""
    import random

    from nthr_kernels.grpo.seeds import DERIVED_MIN

    for s in (0, 5, 2**31 + 3):
        draw = lambda seed: torch.rand(8, generator=torch.Generator().manual_seed(seed))  # noqa: E731
        assert torch.equal(draw(DERIVED_MIN + s), draw(s))
        assert torch.equal(draw(DERIVED_MIN + 2**32 + s), draw(s))
        assert random.Random(DERIVED_MIN + s).random() != random.Random(s).random()


def test_two_methods_of_one_seed_draw_the_same_streams(monkeypatch, draws):
    """What train() promises: two methods from the same seed see the same problems and streams."""
    _stub_training(monkeypatch, draws)
    _train_runs(draws, "grpo")
    first = (list(draws.problems), list(draws.torch))
    draws.problems.clear()
    draws.torch.clear()
    _train_runs(draws, "nthr")
    assert (draws.problems, draws.torch) == first
    with pytest.raises(TypeError, match="seed"):
        loop.train(torch.nn.Linear(1, 1), AdditionTask(1), seed=1.5, progress=False)


class _Stop(Exception):
    """Raised by a stub to end a benchmark once its streams are recorded."""


def _benchmark(name: str):
    """The module ``benchmarks.<name>`` (the repository root put on ``sys.path``)."""
    import importlib
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    return importlib.import_module(f"benchmarks.{name}")


def test_logprob_check_draws_streams_of_its_own(monkeypatch, draws):
    """benchmarks/logprob_check.py (the table of docs/NTHR.md) measured on the pretraining's problems of step 123
    (``sample_problems(16, seed=123)``: the model had been trained on them) and drew its responses and its noise
    from the model's initialisation stream (``manual_seed(0)``, DEFAULT_SPEC.seed = 0)."""
    logprob_check = _benchmark("logprob_check")

    def collect_rollout(model, task, problems, *, generator, **_):
        draws.torch.append(("logprob_check rollouts", generator.initial_seed()))
        return None

    def logprob_variants(model, rollout, seed=0):
        draws.torch.append(("logprob_check noise", int(seed)))
        raise _Stop

    monkeypatch.setattr(logprob_check, "load_default_model",
                        lambda **_: (SimpleNamespace(lm_head=torch.nn.Linear(1, 1, bias=False)),
                                     AdditionTask(DEFAULT_SPEC.n_digits)))
    monkeypatch.setattr(logprob_check, "collect_rollout", collect_rollout)
    monkeypatch.setattr(logprob_check, "logprob_variants", logprob_variants)
    _pretraining(draws)
    draws.who = "logprob_check"
    with pytest.raises(_Stop):
        logprob_check.measure(16)
    assert {w for w, _ in draws.torch} >= {"logprob_check rollouts", "logprob_check noise"}
    assert any(w == "logprob_check" for w, _ in draws.problems)
    assert _clashes(draws.problems) == {}
    assert _clashes(draws.torch, bits=32) == {}


def test_grpo_overhead_benchmark_draws_streams_of_its_own(monkeypatch, draws):
    """benchmarks/test_grpo_overhead.py built its model from ``manual_seed(0)`` (the default model's
    initialisation stream, DEFAULT_SPEC.seed = 0), sampled its prompts with ``seed=0`` (the pretraining's
    problems of step 0) and its responses from ``manual_seed(0)`` again. Its streams are now named
    (``seed_of("grpo_overhead", ...)``) and coincide with none of the study's."""
    overhead = _benchmark("test_grpo_overhead")

    def collect_rollout(model, task, problems, *, generator, **_):
        draws.torch.append(("grpo_overhead rollouts", generator.initial_seed()))
        raise _Stop

    _stub_training(monkeypatch, draws)
    _stub_rollouts(monkeypatch, lld, draws, mixed=False)
    _pretraining(draws)
    _train_runs(draws)
    _lld_seeds(draws)
    monkeypatch.setattr(overhead, "collect_rollout", collect_rollout)
    draws.who = "grpo_overhead"
    model, task, problems, rewards = overhead.make_setup()
    with pytest.raises(_Stop):
        overhead._step(model, task, problems, rewards, "grpo", [])
    assert {w for w, _ in draws.torch} >= {"grpo_overhead", "grpo_overhead rollouts"}
    assert any(w == "grpo_overhead" for w, _ in draws.problems)
    assert _clashes(draws.problems) == {}
    assert _clashes(draws.torch, bits=32) == {}
