// Small helpers shared by the CUDA sources (kept light: no <torch/extension.h>, so nvcc compiles fast).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "desmoe.h"

namespace desmoe {

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

}  // namespace desmoe
