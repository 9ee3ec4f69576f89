"""nthr-kernels: fused, batched NTHR (Negative Token Hidden Reward) for GRPO trainers.

    from nthr_kernels import nthr_advantages, score_tokens, prediction_errors

Importing this package never imports triton, compiles C++, or touches CUDA.
"""
from .api import ErrorsOnVocab, NTHRResult, available_backends, nthr_advantages, prediction_errors, score_tokens

__version__ = "0.1.0"

__all__ = [
    "ErrorsOnVocab",
    "NTHRResult",
    "available_backends",
    "nthr_advantages",
    "prediction_errors",
    "score_tokens",
    "__version__",
]
