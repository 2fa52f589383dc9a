// The row ops compiled for avx512 (16 fp32 lanes a vector): csrc/rows.cpp registers the best variant the
// CPU runs. One translation unit per variant, so the build compiles them in parallel.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <tuple>

#include "isa.h"

#if EXGRPO_MULTI_ISA
namespace exgrpo_native {
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,bmi2")
#define EXGRPO_LANES 16
namespace avx512 {
#include "rows.h"
#include "rows_ops.h"
}  // namespace avx512
#undef EXGRPO_LANES
#pragma GCC pop_options
}  // namespace exgrpo_native
#endif
