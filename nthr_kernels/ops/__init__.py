"""Layer 3: the implementations, one folder per op (reference, torch, Triton, native), the shared
Triton kernels (:mod:`.triton_kernels`) and the native library loader (:mod:`.native_lib`)."""
