"""The embedded default model: a tiny Qwen2 built from a config and pretrained here, on CPU.

Nothing is downloaded. :func:`load_default_model` trains the model on the synthetic addition task
(:mod:`nthr_kernels.grpo.task`) the first time and caches the weights under
``$NTHR_KERNELS_CACHE`` (default ``$XDG_CACHE_HOME/nthr_kernels`` or ``~/.cache/nthr_kernels``).
The cache key is a hash of everything that determines the weights (architecture, task, training
hyper-parameters, seed), so a changed recipe never loads stale weights.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .task import AdditionTask

__all__ = ["ModelSpec", "DEFAULT_SPEC", "QUICK_SPEC", "build_model", "pretrain", "load_default_model", "cache_dir",
           "torch_threads"]

_RECIPE_VERSION = 1


@dataclass(frozen=True)
class ModelSpec:
    """Everything that determines the pretrained weights."""

    n_digits: int = 3
    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    # Stopped part-way on purpose: at ~300 steps the sampled accuracy (T = 1) is about 40-50 %, so most
    # groups of 8 responses are mixed, which is what the LLD study needs. Trained longer, it reaches ~98 %.
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
# Small enough to train in a few seconds; used by the demo's quick mode and by tests.
QUICK_SPEC = ModelSpec(n_digits=2, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, steps=400, batch_size=64, lr=3e-3,
                       warmup=25)


class torch_threads:
    """Context manager: run with ``n`` intra-op threads (default ``$NTHR_KERNELS_THREADS`` or 1), then restore.

    The models here are tiny: one thread is about as fast as two on an idle 2-core machine and much
    faster on a busy one (OpenMP threads of tiny matmuls contend badly).
    """

    def __init__(self, n: int | None = None) -> None:
        self.n = int(os.environ.get("NTHR_KERNELS_THREADS", "1")) if n is None else int(n)
        if self.n < 1:
            raise ValueError(f"thread count must be >= 1, got {self.n}")

    def __enter__(self):
        self.prev = torch.get_num_threads()
        torch.set_num_threads(self.n)
        return self

    def __exit__(self, *exc):
        torch.set_num_threads(self.prev)
        return False


def cache_dir() -> Path:
    env = os.environ.get("NTHR_KERNELS_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "nthr_kernels"


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


def pretrain(spec: ModelSpec, *, progress: bool = True, desc: str = "pretraining tiny Qwen2"):
    """Supervised pretraining on worked solutions; returns the model (deterministic from the seed)."""
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
        problems = task.sample_problems(spec.batch_size, seed=spec.seed * 1_000_003 + step)
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


def load_default_model(spec: ModelSpec = DEFAULT_SPEC, *, cache: bool = True, progress: bool = True):
    """Return ``(model, task)``: the cached pretrained model, training (and caching) it if needed."""
    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    task = AdditionTask(spec.n_digits)
    path = cache_dir() / f"tiny-qwen2-addition-{spec.key()}.pt"
    if cache and path.is_file():
        model = build_model(spec)
        state = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(state["model"])
        model.eval()
        return model, task
    t0 = time.perf_counter()
    model = pretrain(spec, progress=progress)
    elapsed = time.perf_counter() - t0
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        try:
            torch.save({"model": model.state_dict(), "spec": asdict(spec), "train_seconds": elapsed}, tmp)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        if progress:
            print(f"[nthr_kernels] pretrained the default model in {elapsed:.0f} s; cached at {path}")
    return model, task
