// The row ops compiled for base (4 fp32 lanes a vector): csrc/rows.cpp registers the best variant the
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

namespace exgrpo_native {
#define EXGRPO_LANES 4
namespace base {
#include "rows.h"
#include "rows_ops.h"
}  // namespace base
#undef EXGRPO_LANES
}  // namespace exgrpo_native
