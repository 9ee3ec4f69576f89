"""Regenerate the embedded model's weights: ``python -m nthr_kernels.grpo.pretrain [--out DIR]``.

How the shipped weights were made (and how to make them again):

1. :func:`~nthr_kernels.grpo.model.build_model` builds a tiny ``Qwen2ForCausalLM`` from
   :data:`~nthr_kernels.grpo.model.DEFAULT_SPEC` (4 layers, hidden 128, tied embeddings, character
   vocabulary of 17 tokens), initialised from ``torch.manual_seed(spec.seed)``.
2. :func:`~nthr_kernels.grpo.model.pretrain` trains it with teacher forcing on worked solutions of
   3-digit addition (:mod:`nthr_kernels.grpo.task`): ``spec.steps`` AdamW steps of ``spec.batch_size``
   problems (problem ``k`` of step ``s`` drawn from seed ``spec.seed * 1000003 + s``), linear warm-up,
   gradient clipping at 1, one torch thread. It stops part-way on purpose, so that the model answers
   about half of the questions right and most groups of 8 sampled responses are mixed.
3. This script writes ``model.safetensors`` (the parameters; the tied head is stored once),
   ``config.json`` (the spec, its key, the machine and torch version that made it, the seconds it took)
   and ``tokenizer.json`` (the vocabulary), each atomically, into ``--out`` (default: the package's
   ``grpo/weights/``, i.e. it replaces the shipped weights).

The run is deterministic on one machine; another CPU can round differently and end with different
weights, which is why the weights are shipped rather than trained on first use.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict

import torch

from .files import atomic_path, write_text_atomic
from .model import (CONFIG_FILE, DEFAULT_SPEC, TOKENIZER_FILE, WEIGHTS_DIR, WEIGHTS_FILE, ModelSpec, pretrain,
                    torch_threads)
from .task import AdditionTask

__all__ = ["save_weights", "main"]


def save_weights(model, spec: ModelSpec, folder, *, train_seconds: float | None = None) -> None:
    """Write ``model`` (made from ``spec``) as a weights folder that ``load_weights`` reads."""
    from safetensors.torch import save_model

    from nthr_kernels.demo_synthetic import machine_description

    if not isinstance(spec, ModelSpec):
        raise TypeError(f"spec must be a ModelSpec, got {type(spec).__name__}")
    with atomic_path(f"{folder}/{WEIGHTS_FILE}") as tmp:
        save_model(model, str(tmp), metadata={"spec_key": spec.key()})
    with torch_threads() as threads:  # the thread count pretrain ran with
        machine = machine_description()
    config = {"spec": asdict(spec), "spec_key": spec.key(), "architecture": type(model).__name__,
              "parameters": sum(p.numel() for p in model.parameters()),
              "made_by": "python -m nthr_kernels.grpo.pretrain", "machine": machine, "torch_threads": threads.n,
              "torch": torch.__version__, "train_seconds": train_seconds}
    write_text_atomic(f"{folder}/{CONFIG_FILE}", json.dumps(config, indent=1) + "\n")
    tok = AdditionTask(spec.n_digits).tokenizer.definition()
    write_text_atomic(f"{folder}/{TOKENIZER_FILE}", json.dumps(tok, indent=1) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m nthr_kernels.grpo.pretrain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(WEIGHTS_DIR), help="folder for the three files (default: the package's)")
    args = ap.parse_args(argv)
    print(f"pretraining {DEFAULT_SPEC} (key {DEFAULT_SPEC.key()})")
    t0 = time.perf_counter()
    model = pretrain(DEFAULT_SPEC)
    seconds = time.perf_counter() - t0
    save_weights(model, DEFAULT_SPEC, args.out, train_seconds=round(seconds, 1))
    print(f"trained in {seconds:.0f} s; wrote {WEIGHTS_FILE}, {CONFIG_FILE}, {TOKENIZER_FILE} into {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
