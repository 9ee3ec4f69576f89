// sgemm for the native ops (gemm.cpp): one thread, fixed summation order.
#pragma once
#include <ATen/ATen.h>

namespace nthr {

// c = a b, or c += a b with accumulate: float32 2-D views of any strides (c with unit column stride for the
// packed kernel, else ATen's mm).
void gemm(const at::Tensor& c, const at::Tensor& a, const at::Tensor& b, bool accumulate = false);

// Which engine gemm uses on this CPU: "nthr-avx512" (the packed kernel) or "aten" (ATen's mm).
const char* gemm_engine();

}  // namespace nthr
