"""A synthetic verifiable task: multi-digit addition with a short worked solution.

Prompt (fixed length, so a batch of prompts needs no padding)::

    <bos>347+285=

Completion (one "step" per digit, least significant first, carry folded into the next step)::

    7+5=12,4+8+1=13,3+2+1=6>632<eos>

The reward is binary and verifiable: 1 iff the completion ends with ``>`` followed by the digits of
``a + b`` and ``<eos>``. Everything before ``>`` is the "reasoning"; it is not checked, but a model
that gets it wrong usually gets the answer wrong too, which is what makes correct and incorrect
responses share many tokens (the situation NTHR is about).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

__all__ = ["CharTokenizer", "AdditionTask", "Problem"]


class CharTokenizer:
    """Character-level tokenizer over ``0-9 + = , >`` plus ``<pad>``, ``<bos>``, ``<eos>``."""

    SPECIALS = ("<pad>", "<bos>", "<eos>")
    CHARS = "0123456789+=,>"

    def __init__(self) -> None:
        self.itos = list(self.SPECIALS) + list(self.CHARS)
        self.stoi = {s: i for i, s in enumerate(self.itos)}
        self.pad_id, self.bos_id, self.eos_id = 0, 1, 2

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    def definition(self) -> dict:
        """The vocabulary as plain data (shipped beside the weights as ``tokenizer.json``)."""
        return {"type": "char", "specials": list(self.SPECIALS), "chars": self.CHARS,
                "pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id}

    def encode(self, text: str) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        bad = sorted({c for c in text if c not in self.stoi})
        if bad:
            raise ValueError(f"text contains characters outside the vocabulary: {bad}")
        return [self.stoi[c] for c in text]

    def decode(self, ids, *, stop_at_eos: bool = True) -> str:
        """Decode ids to text; specials other than ``<eos>`` are dropped, ``<eos>`` ends the text."""
        out = []
        for i in (ids.tolist() if isinstance(ids, torch.Tensor) else ids):
            i = int(i)
            if i == self.eos_id and stop_at_eos:
                break
            if 0 <= i < len(self.itos) and i >= len(self.SPECIALS):
                out.append(self.itos[i])
        return "".join(out)

    def token_str(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self.itos):
            raise ValueError(f"token id {i} outside the vocabulary of size {len(self.itos)}")
        return self.itos[i]


@dataclass(frozen=True)
class Problem:
    a: int
    b: int

    @property
    def answer(self) -> int:
        return self.a + self.b


class AdditionTask:
    """``n_digits``-digit addition with a digit-by-digit worked solution."""

    def __init__(self, n_digits: int = 3) -> None:
        if not isinstance(n_digits, int) or isinstance(n_digits, bool):
            raise TypeError(f"n_digits must be an int, got {type(n_digits).__name__}")
        if not 1 <= n_digits <= 9:
            raise ValueError(f"n_digits must be in [1, 9], got {n_digits}")
        self.n_digits = n_digits
        self.tokenizer = CharTokenizer()

    # --- text ---------------------------------------------------------------------------------
    def prompt_text(self, p: Problem) -> str:
        n = self.n_digits
        return f"{p.a:0{n}d}+{p.b:0{n}d}="

    def solution_text(self, p: Problem) -> str:
        n = self.n_digits
        da, db = f"{p.a:0{n}d}"[::-1], f"{p.b:0{n}d}"[::-1]
        steps, carry = [], 0
        for x, y in zip(da, db):
            s = int(x) + int(y) + carry
            steps.append(f"{x}+{y}+1={s}" if carry else f"{x}+{y}={s}")
            carry = s // 10
        return ",".join(steps) + f">{p.answer}"

    @property
    def prompt_len(self) -> int:
        """Tokens in every prompt, ``<bos>`` included."""
        return 1 + 2 * self.n_digits + 2

    @property
    def max_completion_len(self) -> int:
        """Longest correct completion, ``<eos>`` included, plus slack for wrong ones."""
        worst = self.solution_text(Problem(10**self.n_digits - 1, 10**self.n_digits - 1))
        return len(worst) + 1 + 4

    # --- sampling -----------------------------------------------------------------------------
    def sample_problems(self, n: int, seed: int, exclude=frozenset()) -> list[Problem]:
        """``n`` problems drawn from ``random.Random(seed)``; those in ``exclude`` (problems a model trained
        on, for a held-out set) are skipped and the draw goes on, so the problems kept are the stream's first
        ones outside ``exclude``."""
        if not isinstance(n, int) or n < 0:
            raise ValueError(f"n must be a non-negative int, got {n!r}")
        hi = 10**self.n_digits - 1
        if len(exclude) * 2 > (hi + 1) ** 2:
            raise ValueError(f"exclude: {len(exclude)} problems leave too few of the {(hi + 1) ** 2} to draw from")
        rng, out = random.Random(seed), []
        while len(out) < n:
            p = Problem(rng.randint(0, hi), rng.randint(0, hi))
            if p not in exclude:
                out.append(p)
        return out

    def prompt_ids(self, problems: list[Problem]) -> torch.Tensor:
        """``[len(problems), prompt_len]`` int64, no padding needed."""
        tok = self.tokenizer
        rows = [[tok.bos_id] + tok.encode(self.prompt_text(p)) for p in problems]
        return torch.tensor(rows, dtype=torch.long).reshape(len(problems), self.prompt_len)

    def sft_batch(self, problems: list[Problem]) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher-forcing batch: ``(input_ids, labels)``, labels -100 on the prompt and padding."""
        tok = self.tokenizer
        seqs, labs = [], []
        for p in problems:
            prompt = [tok.bos_id] + tok.encode(self.prompt_text(p))
            comp = tok.encode(self.solution_text(p)) + [tok.eos_id]
            seqs.append(prompt + comp)
            labs.append([-100] * len(prompt) + comp)
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), tok.pad_id, dtype=torch.long)
        labels = torch.full((len(seqs), width), -100, dtype=torch.long)
        for i, (s, l) in enumerate(zip(seqs, labs)):
            ids[i, : len(s)] = torch.tensor(s)
            labels[i, : len(l)] = torch.tensor(l)
        return ids, labels

    # --- reward -------------------------------------------------------------------------------
    def reward(self, completion_ids, problem: Problem) -> float:
        """1.0 iff the completion's final answer (after the last ``>``) is ``a + b`` and it ends."""
        tok = self.tokenizer
        ids = completion_ids.tolist() if isinstance(completion_ids, torch.Tensor) else list(completion_ids)
        if tok.eos_id not in ids:
            return 0.0
        text = tok.decode(ids[: ids.index(tok.eos_id)], stop_at_eos=False)
        if ">" not in text:
            return 0.0
        ans = text.rsplit(">", 1)[1]
        return 1.0 if ans.isdigit() and ans == str(problem.answer) else 0.0
