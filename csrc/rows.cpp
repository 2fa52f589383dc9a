// The row ops of the fused kernels on the CPU, for any x86-64 host: the same source (rows.h: the row math;
// rows_ops.h: the ops) compiled three times, in rows_avx512.cpp (AVX-512 F, BW, DQ, VL), rows_avx2.cpp (AVX2 + FMA)
// and rows_base.cpp (the x86-64 baseline, SSE2), each in its own namespace under `#pragma GCC target` and with one
// register of lanes per vector; this file declares them and registers the one chosen: the variant registered as the CPU
// implementation is chosen once, when the library loads, from what the CPU supports (as PyTorch's own CPU kernels
// dispatch on the CPU's capability). $EXGRPO_NATIVE_ISA (avx512 | avx2 | base) forces one (tests, benchmarks); asking
// for more than the CPU has is refused (the library loads its best variant and Python raises the error), never run. The library itself is built for the baseline, so a build made on
// an AVX-512 login node runs on an AVX2 compute node. Compilers without the GCC target pragma (and non-x86 hosts)
// build the baseline only.
//
// Only functions defined after a target pragma take its instruction set: ATen's and the standard library's inline
// functions, included first, stay baseline, so no ISA leaks into code the linker may share.
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

// the ops of each variant (rows_ops.h), defined in rows_<isa>.cpp
#define EXGRPO_DECLARE_ROWS(ns)                                                                                        \
  namespace ns {                                                                                                       \
  using at::Tensor;                                                                                                    \
  std::tuple<Tensor, Tensor, Tensor> row_stats(const Tensor& z, const Tensor& t, double inv_tau, double pre,            \
                                               double cap, bool with_entropy);                                         \
  void row_grad_(const Tensor& z, const Tensor& t, const Tensor& lse, const c10::optional<Tensor>& ent,                \
                 const Tensor& c_l, const c10::optional<Tensor>& c_h, double inv_tau, double pre, double cap,           \
                 int64_t col0, Tensor out);                                                                            \
  std::tuple<Tensor, Tensor> row_stats_grad_(Tensor z, const Tensor& t, const Tensor& c_l, double inv_tau, double pre, \
                                             double cap);                                                              \
  std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grpo_token_rows_(                                                 \
      Tensor z, const Tensor& t, const Tensor& sid, const Tensor& adv, const Tensor& w_seq,                            \
      const c10::optional<Tensor>& seq_isw, const c10::optional<Tensor>& old, const c10::optional<Tensor>& ref,        \
      const c10::optional<Tensor>& gen, const c10::optional<Tensor>& ext, double inv_tau, double pre, double cap,      \
      double eps_low, double eps_high, double delta, double beta, double is_cap, int64_t kl_est, int64_t is_mode,      \
      bool with_entropy, bool compute_grad);                                                                           \
  }
#if EXGRPO_MULTI_ISA
EXGRPO_DECLARE_ROWS(avx512)
EXGRPO_DECLARE_ROWS(avx2)
#endif
EXGRPO_DECLARE_ROWS(base)

namespace {
std::string g_isa_error;  // why $EXGRPO_NATIVE_ISA was not honoured ("" when it was, or is unset)

std::string choose_isa() {
  std::string best = "base";
#if EXGRPO_MULTI_ISA
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = "avx2";
  if (best == "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl"))
    best = "avx512";
#endif
  const char* env = std::getenv("EXGRPO_NATIVE_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  const int rank_want = want == "avx512" ? 2 : want == "avx2" ? 1 : want == "base" ? 0 : -1;
  const int rank_best = best == "avx512" ? 2 : best == "avx2" ? 1 : 0;
  if (rank_want < 0) {
    g_isa_error = "EXGRPO_NATIVE_ISA must be avx512, avx2 or base, got '" + want + "'";
  } else if (rank_want > rank_best) {
    g_isa_error = "EXGRPO_NATIVE_ISA=" + want + ": this CPU supports up to " + best;
  } else {
    return want;
  }
  return best;  // never run what the CPU lacks; the Python side raises g_isa_error (kernels/_native.py)
}
}  // namespace

const char* cpu_isa() {
  static const std::string chosen = choose_isa();
  return chosen.c_str();
}

const char* isa_error() {
  cpu_isa();
  return g_isa_error.c_str();
}

#define EXGRPO_REGISTER_ROWS(ns)                           \
  m.impl("row_stats", &ns::row_stats);                     \
  m.impl("row_grad_", &ns::row_grad_);                     \
  m.impl("row_stats_grad_", &ns::row_stats_grad_);         \
  m.impl("grpo_token_rows_", &ns::grpo_token_rows_)

TORCH_LIBRARY_IMPL(exgrpo_native, CPU, m) {
  const std::string isa = cpu_isa();
#if EXGRPO_MULTI_ISA
  if (isa == "avx512") {
    EXGRPO_REGISTER_ROWS(avx512);
    return;
  }
  if (isa == "avx2") {
    EXGRPO_REGISTER_ROWS(avx2);
    return;
  }
#endif
  EXGRPO_REGISTER_ROWS(base);
}

}  // namespace exgrpo_native
