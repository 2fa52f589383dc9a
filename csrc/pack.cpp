// CPU implementation of exgrpo_native::pack (kernels/packing.py, the twin of its Triton _pack_kernel).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Optional.h>
#include <torch/library.h>

#include <tuple>

namespace exgrpo_native {
namespace {

using at::Tensor;

template <typename T>
void pack_seq(const T* xp, const bool* mp, int64_t a, int64_t b, int64_t s, int64_t* ip, int64_t* pp, int64_t* tp,
              int64_t* sp, bool* lp) {
  if (a == b) return;
#pragma omp simd
  for (int64_t i = a; i < b - 1; ++i) {
    ip[i] = static_cast<int64_t>(xp[i]);
    pp[i] = i - a;
    sp[i] = s;
    tp[i] = static_cast<int64_t>(xp[i + 1]);
    lp[i] = mp ? mp[i + 1] : true;
  }
  ip[b - 1] = static_cast<int64_t>(xp[b - 1]);
  pp[b - 1] = b - 1 - a;
  sp[b - 1] = s;
  tp[b - 1] = -100;
  lp[b - 1] = false;
}

// For sequence s with tokens [cu[s], cu[s+1]):  ids[i] = tok[i], pos[i] = i - cu[s], seq[i] = s,
// tgt[i] = tok[i+1] (or -100 at the last token), lmask[i] = tgt exists and tmask[i+1] (or just: tgt exists).
// Sequences in parallel; within one, a straight copy the compiler vectorises.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pack(const Tensor& tokens, const Tensor& cu,
                                                        const c10::optional<Tensor>& tmask) {
  TORCH_CHECK(tokens.device().is_cpu() && tokens.dim() == 1 && (tokens.numel() <= 1 || tokens.stride(0) == 1),
              "exgrpo_native::pack: tokens must be a contiguous 1-D CPU tensor, got shape ", tokens.sizes());
  TORCH_CHECK(cu.device().is_cpu() && cu.dim() == 1 && cu.size(0) >= 2 && cu.scalar_type() == at::kInt &&
                  cu.stride(0) == 1,
              "exgrpo_native::pack: cu must be a contiguous int32 [S+1] CPU vector (S >= 1), got ", cu.scalar_type(),
              " ", cu.sizes());
  const int64_t N = tokens.size(0), S = cu.size(0) - 1;
  const int32_t* cp = cu.const_data_ptr<int32_t>();
  TORCH_CHECK(cp[0] == 0 && cp[S] == N, "exgrpo_native::pack: cu must run from 0 to N = ", N, ", got ", cp[0],
              " .. ", cp[S]);
  const bool* mp = nullptr;
  if (tmask.has_value()) {
    TORCH_CHECK(tmask->scalar_type() == at::kBool && tmask->dim() == 1 && tmask->size(0) == N &&
                    (N <= 1 || tmask->stride(0) == 1),
                "exgrpo_native::pack: token_mask must be a contiguous bool [", N, "] vector, got ",
                tmask->scalar_type(), " ", tmask->sizes());
    mp = tmask->const_data_ptr<bool>();
  }
  auto o64 = tokens.options().dtype(at::kLong);
  Tensor ids = at::empty({N}, o64), pos = at::empty({N}, o64), tgt = at::empty({N}, o64), seq = at::empty({N}, o64);
  Tensor lmask = at::empty({N}, tokens.options().dtype(at::kBool));
  int64_t *ip = ids.data_ptr<int64_t>(), *pp = pos.data_ptr<int64_t>(), *tp = tgt.data_ptr<int64_t>(),
          *sp = seq.data_ptr<int64_t>();
  bool* lp = lmask.data_ptr<bool>();
  AT_DISPATCH_INTEGRAL_TYPES(tokens.scalar_type(), "exgrpo_native::pack", [&] {
    const scalar_t* xp = tokens.const_data_ptr<scalar_t>();
    at::parallel_for(0, S, std::max<int64_t>(1, S * 4096 / std::max<int64_t>(N, 1)), [&](int64_t s0, int64_t s1) {
      for (int64_t s = s0; s < s1; ++s) {
        TORCH_CHECK(cp[s] <= cp[s + 1], "exgrpo_native::pack: cu decreases at ", s);
        pack_seq(xp, mp, cp[s], cp[s + 1], s, ip, pp, tp, sp, lp);
      }
    });
  });
  return {ids, pos, tgt, seq, lmask};
}

}  // namespace

TORCH_LIBRARY_IMPL(exgrpo_native, CPU, m) { m.impl("pack", &pack); }

}  // namespace exgrpo_native
