// The row ops compiled for avx2 (8 fp32 lanes a vector): csrc/rows.cpp registers the best variant the
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
#pragma GCC target("avx2,fma,bmi2")
#define EXGRPO_LANES 8
namespace avx2 {
#include "rows.h"
#include "rows_ops.h"
}  // namespace avx2
#undef EXGRPO_LANES
#pragma GCC pop_options
}  // namespace exgrpo_native
#endif
