"""Seeds of the random streams of the GRPO loop and the LLD study, derived so that no two coincide.

Every random draw of a study run (the problems of a step or batch, the sampled responses, the random
selection, the evaluation samples) comes from a stream named by a key: a scope (``"train"``, ``"lld"``),
a purpose (``"problems"``, ``"rollouts"``, ...) and the integers that tell its instances apart (the run's
seed, the step). :func:`seed_of` maps the key to a seed:

- the key is written as JSON (``json.dumps([scope, purpose, *ints])``), which is injective on lists of
  strings and integers, so distinct keys give distinct texts;
- the seed is ``2**62 + (first 8 bytes of sha256("nthr-kernels " + text), little-endian) mod 2**62``.

Two distinct keys share a seed only if their digests agree in 62 bits: with the few thousand streams a study
uses, a probability under ``1e-11``. That holds for the ``random.Random`` streams (the problems), which use
every bit of the seed. A CPU ``torch.Generator`` does not: it seeds its Mersenne Twister from the low 32
bits only (``manual_seed(2**62 + 5)`` draws what ``manual_seed(5)`` draws), so two torch streams
(:func:`stream`, the evaluation seed of ``loop.train``) coincide if their seeds agree mod ``2**32``, and a
derived torch stream is that of a small literal seed (model init ``torch.manual_seed(spec.seed)``) if its
seed is that literal mod ``2**32``. Neither happens for the study's streams (``tests/test_grpo_seeds.py``
compares the torch seeds mod ``2**32``; the smallest low part among seeds 0..1999 of every torch purpose is
143234), but for torch streams the separation is checked, not structural: a few dozen torch streams share
one with a probability under ``1e-6``. The problems' streams (Python's ``random.Random``: the pretraining problems of step
``s`` from ``random.Random(spec.seed * 1_000_003 + s)``, which stay as they were, since they made the
shipped weights) lie far below ``2**62``, so a derived problem stream can never be one of those.
Before, the streams were small sums such as ``seed * 7919 + step`` or ``seed + 7``: the GRPO run of seed 0 trained on the problems of the
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
    """A CPU ``torch.Generator`` seeded with :func:`seed_of` of the key (its draws depend on that seed mod
    ``2**32`` only: see the module docstring)."""
    return torch.Generator().manual_seed(seed_of(scope, purpose, *key))
