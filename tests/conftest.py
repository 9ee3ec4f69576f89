import os

# Triton kernels run through the interpreter on CPU-only machines. This must be set before triton is
# first imported; nthr_kernels never imports triton at import time, so setting it here is enough.
try:
    import torch as _torch

    _has_cuda = _torch.cuda.is_available()
except Exception:  # pragma: no cover
    _has_cuda = False
if not _has_cuda:
    os.environ.setdefault("TRITON_INTERPRET", "1")
