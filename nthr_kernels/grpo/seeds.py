"""Seeds of the random streams of the GRPO loop and the LLD study, derived so that no two coincide.

Every random draw of a study run (the problems of a step or batch, the sampled responses, the random
selection, the evaluation samples) comes from a stream named by a key: a scope (``"train"``, ``"lld"``),
a purpose (``"problems"``, ``"rollouts"``, ...) and the integers that tell its instances apart (the run's
seed, the step). :func:`seed_of` maps the key to a seed:

- the key is written as JSON (``json.dumps([scope, purpose, *ints])``), which is injective on lists of
  strings and integers, so distinct keys give distinct texts;
- the seed is ``2**62 + (first 8 bytes of sha256("nthr-kernels " + text), little-endian) mod 2**62``.

Two distinct keys share a seed only if their digests agree in 62 bits: with the few thousand streams a study
uses, a probability under ``1e-11``. And a derived seed is at least ``2**62``, while the seeds this package
uses as literals lie far below (model init ``torch.manual_seed(spec.seed)``, the pretraining problems of
step ``s`` from ``random.Random(spec.seed * 1_000_003 + s)``: those stay as they were, since they made the
shipped weights), so a derived stream can never be one of those. Before, the streams were small sums such
as ``seed * 7919 + step`` or ``seed + 7``: the GRPO run of seed 0 trained on the problems of the
pretraining's first steps and sampled its responses from the model-initialisation stream, its evaluation
samples were seed 7's rollout stream, and the LLD study's seed 0 asked the questions of the pretraining's
first 32 batches.
"""

from __future__ import annotations

import hashlib
import json

import torch

__all__ = ["DERIVED_MIN", "seed_of", "stream"]

DERIVED_MIN = 2**62  # every derived seed is in [DERIVED_MIN, 2**63)


def seed_of(scope: str, purpose: str, *key: int) -> int:
    """The seed of the stream ``(scope, purpose, *key)``, in ``[2**62, 2**63)`` (see the module docstring)."""
    if not isinstance(scope, str) or not isinstance(purpose, str):
        raise TypeError("scope and purpose must be str")
    if not all(isinstance(k, int) and not isinstance(k, bool) for k in key):
        raise TypeError(f"key: expected ints, got {key!r}")
    text = "nthr-kernels " + json.dumps([scope, purpose, *key])
    digest = int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
    return DERIVED_MIN + digest % DERIVED_MIN


def stream(scope: str, purpose: str, *key: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`seed_of` of the key."""
    return torch.Generator().manual_seed(seed_of(scope, purpose, *key))
