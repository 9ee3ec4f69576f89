"""The embedded default model: a tiny Qwen2 whose weights ship in the package (``grpo/weights/``).

Nothing is downloaded and nothing is trained on use: :func:`load_default_model` reads
``weights/model.safetensors`` (no pickle), checks ``weights/config.json`` (the recipe that made it) and
``weights/tokenizer.json`` (the vocabulary) against the code, and returns the model. The weights were
made by ``python -m nthr_kernels.grpo.pretrain`` (:mod:`nthr_kernels.grpo.pretrain`), which runs
:func:`pretrain` on :data:`DEFAULT_SPEC` and writes the three files; rerun it after changing the recipe.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .task import AdditionTask

__all__ = ["ModelSpec", "DEFAULT_SPEC", "WEIGHTS_DIR", "build_model", "pretrain", "load_default_model",
           "load_weights", "torch_threads"]

_RECIPE_VERSION = 1
WEIGHTS_DIR = Path(__file__).parent / "weights"
WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE = "model.safetensors", "config.json", "tokenizer.json"


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the pretrained weights."""

    n_digits: int = 3
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Stopped part-way on purpose: after 300 steps the shipped weights answer about a quarter of the sampled
    # questions right (T = 1; "sample_accuracy" in benchmarks/results/lld-study.json), so many groups of 8
    # responses are mixed, which is what the LLD study needs. Trained longer, it reaches ~98 %.
    steps: int = 300
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    seed: int = 0

    def key(self) -> str:
        blob = json.dumps({"v": _RECIPE_VERSION, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


DEFAULT_SPEC = ModelSpec()


class torch_threads:
    """Context manager: run with ``n`` intra-op threads (default ``$NTHR_KERNELS_THREADS`` or 1), then restore.

    The models here are tiny: one thread is about as fast as two on an idle 2-core machine and much
    faster on a busy one (OpenMP threads of tiny matmuls contend badly).
    """

    def __init__(self, n: int | None = None) -> None:
        if n is None:
            env = os.environ.get("NTHR_KERNELS_THREADS", "1")
            if not env.strip().isdigit() or int(env) < 1:
                raise ValueError(f"NTHR_KERNELS_THREADS: expected a positive integer, got {env!r}")
            n = int(env)
        self.n = int(n)
        if self.n < 1:
            raise ValueError(f"thread count must be >= 1, got {self.n}")

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)
        return False


def build_model(spec: ModelSpec, seed: int | None = None):
    """A freshly initialised tiny ``Qwen2ForCausalLM`` for ``spec`` (deterministic from the seed)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    task = AdditionTask(spec.n_digits)
    tok = task.tokenizer
    config = Qwen2Config(
        vocab_size=tok.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        max_position_embeddings=max(64, task.prompt_len + task.max_completion_len + 8),
        tie_word_embeddings=True,
        pad_token_id=tok.pad_id,
        bos_token_id=tok.bos_id,
        eos_token_id=tok.eos_id,
        use_sliding_window=False,
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed if seed is None else seed)
        model = Qwen2ForCausalLM(config)
    model.eval()
    return model


def pretraining_problems(spec: ModelSpec, step: int | None = None):
    """The problems :func:`pretrain` trains on at ``step`` (a list), or at every step (a frozenset: what a
    held-out set must leave out)."""
    task = AdditionTask(spec.n_digits)
    if step is not None:
        return task.sample_problems(spec.batch_size, seed=spec.seed * 1_000_003 + step)
    return frozenset(p for s in range(spec.steps) for p in pretraining_problems(spec, s))


def pretrain(spec: ModelSpec, *, progress: bool = True, desc: str = "pretraining tiny Qwen2"):
    """Supervised pretraining on worked solutions; returns the model (deterministic from the seed on a
    given machine; another CPU may round differently, which is why the default weights are shipped)."""
    with torch_threads():
        return _pretrain(spec, progress, desc)


def _pretrain(spec: ModelSpec, progress: bool, desc: str):
    from tqdm.auto import tqdm

    model = build_model(spec)
    task = AdditionTask(spec.n_digits)
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, betas=(0.9, 0.98), weight_decay=spec.weight_decay)

    # linear warm-up, then constant: the run is deliberately stopped part-way (see ModelSpec)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / spec.warmup))
    model.train()
    bar = tqdm(range(spec.steps), desc=desc, disable=not progress, leave=False)
    for step in bar:
        problems = pretraining_problems(spec, step)
        ids, labels = task.sft_batch(problems)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if step % 25 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    model.eval()
    return model


def load_weights(folder) -> tuple[torch.nn.Module, AdditionTask, dict]:
    """``(model, task, config)`` from a weights folder written by :mod:`nthr_kernels.grpo.pretrain`.

    Checks that the recorded spec hashes to the recorded key and that the tokenizer definition is the
    code's; loads the tensors with ``safetensors`` (no pickle), every parameter required.
    """
    from safetensors.torch import load_model

    if not isinstance(folder, (str, os.PathLike)):
        raise TypeError(f"folder must be a path, got {type(folder).__name__}")
    folder = Path(folder)
    missing = [f for f in (WEIGHTS_FILE, CONFIG_FILE, TOKENIZER_FILE) if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(f"weights folder {folder} lacks {missing}: run python -m nthr_kernels.grpo.pretrain")
    config = json.loads((folder / CONFIG_FILE).read_text())
    spec = ModelSpec(**config["spec"])
    if spec.key() != config["spec_key"]:
        raise ValueError(f"{folder / CONFIG_FILE}: spec_key {config['spec_key']} does not match the spec "
                         f"({spec.key()}); the file was edited or the recipe version changed")
    task = AdditionTask(spec.n_digits)
    shipped_tok = json.loads((folder / TOKENIZER_FILE).read_text())
    if shipped_tok != task.tokenizer.definition():
        raise ValueError(f"{folder / TOKENIZER_FILE} differs from the code's CharTokenizer: regenerate the weights")
    model = build_model(spec)
    load_model(model, str(folder / WEIGHTS_FILE), strict=True)
    model.eval()
    return model, task, config


def load_default_model(*, progress: bool = True):
    """Return ``(model, task)``: the shipped pretrained model (:data:`DEFAULT_SPEC`). Trains nothing."""
    model, task, config = load_weights(WEIGHTS_DIR)
    if config["spec_key"] != DEFAULT_SPEC.key():
        raise ValueError(f"the shipped weights were made with spec {config['spec']}, not DEFAULT_SPEC: "
                         f"run python -m nthr_kernels.grpo.pretrain")
    if progress:
        print(f"[nthr_kernels] loaded the embedded tiny Qwen2 ({sum(p.numel() for p in model.parameters())} "
              f"parameters) from {WEIGHTS_DIR / WEIGHTS_FILE}")
    return model, task
