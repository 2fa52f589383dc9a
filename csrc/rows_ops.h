// The exgrpo_native row ops' CPU implementations, compiled once per instruction set by rows.cpp (which includes this
// file inside a namespace per ISA, after rows.h; schemas: csrc/registration.cpp). Python callers:
// kernels/_rows.py (chunk_stats, chunk_grad_), kernels/grpo_loss/rows.py (token-level fast path),
// kernels/nll_loss.py. Each op walks the rows of a [C, V] logits tile in parallel (ATen's OpenMP pool).


using at::Tensor;

void check_tile(const Tensor& z, const char* name) {
  TORCH_CHECK(z.device().is_cpu(), "exgrpo_native: ", name, " must be a CPU tensor, got ", z.device());
  TORCH_CHECK(z.dim() == 2, "exgrpo_native: ", name, " must be a [C, V] tile, got shape ", z.sizes());
  TORCH_CHECK(z.size(1) <= 1 || z.stride(1) == 1, "exgrpo_native: ", name,
              " must have contiguous columns (stride(1) == 1), got strides ", z.strides());
}

void check_rows(const Tensor& x, int64_t C, at::ScalarType dt, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "exgrpo_native: ", name, " must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 1 && x.size(0) == C, "exgrpo_native: ", name, " must be a [", C, "] vector, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dt, "exgrpo_native: ", name, " must be ", dt, ", got ", x.scalar_type());
  TORCH_CHECK(C <= 1 || x.stride(0) == 1, "exgrpo_native: ", name, " must be contiguous, got stride ", x.stride(0));
}

Xf make_xf(double inv_tau, double pre, double cap) {
  return Xf{static_cast<float>(inv_tau), static_cast<float>(pre), static_cast<float>(cap)};
}

// rows per parallel task: about 32K elements of work
int64_t grain(int64_t V) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(V, 1)); }

// bool template arguments from runtime flags
template <typename F>
void with_bool(bool b, F&& f) {
  if (b) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// ------------------------------------------------------------------------------------------ row_stats

std::tuple<Tensor, Tensor, Tensor> row_stats(const Tensor& z, const Tensor& t, double inv_tau, double pre, double cap,
                                             bool with_entropy) {
  check_tile(z, "z");
  const int64_t C = z.size(0), V = z.size(1);
  check_rows(t, C, at::kLong, "t");
  auto opts = z.options().dtype(at::kFloat);
  Tensor logp = at::empty({C}, opts), lse = at::empty({C}, opts);
  Tensor ent = at::empty({with_entropy ? C : 0}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "exgrpo_native::row_stats", [&] {
    const Xf f = make_xf(inv_tau, pre, cap);
    const scalar_t* zp = z.const_data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>(), *en = with_entropy ? ent.data_ptr<float>() : nullptr;
    const int64_t sz = z.stride(0);
    with_bool(cap > 0, [&](auto CAP) {
      with_bool(with_entropy, [&](auto ENT) {
        at::parallel_for(0, C, grain(V), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            const auto st = stats_row<CAP(), ENT()>(zp + r * sz, V, tp[r], f);
            lp[r] = (st.logp);
            ls[r] = (st.lse);
            if constexpr (ENT()) en[r] = (st.ent);
          }
        });
      });
    });
  });
  return {logp, lse, ent};
}

// ------------------------------------------------------------------------------------------ row_grad_

template <typename T, typename G>
void row_grad_impl(const Tensor& z, const Tensor& t, const Tensor& lse, const c10::optional<Tensor>& ent,
                   const Tensor& c_l, const c10::optional<Tensor>& c_h, double inv_tau, double pre, double cap,
                   int64_t col0, Tensor& out) {
  const Xf f = make_xf(inv_tau, pre, cap);
  const int64_t C = z.size(0), V = z.size(1), sz = z.stride(0), sg = out.stride(0);
  const T* zp = z.const_data_ptr<T>();
  G* gp = out.data_ptr<G>();
  const int64_t* tp = t.const_data_ptr<int64_t>();
  const float *lsp = lse.const_data_ptr<float>(), *clp = c_l.const_data_ptr<float>();
  const bool wh = c_h.has_value();
  const float* enp = wh ? ent->const_data_ptr<float>() : nullptr;
  const float* chp = wh ? c_h->const_data_ptr<float>() : nullptr;
  with_bool(cap > 0, [&](auto CAP) {
    with_bool(wh, [&](auto WH) {
      at::parallel_for(0, C, grain(V), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          const float cl = tp[r] == kIgnore ? 0.0f : static_cast<float>(clp[r]);
          grad_row<CAP(), WH()>(zp + r * sz, gp + r * sg, V, col0, tp[r], f, static_cast<float>(lsp[r]),
                                WH() ? static_cast<float>(enp[r]) : 0.0f, cl, WH() ? static_cast<float>(chp[r]) : 0.0f);
        }
      });
    });
  });
}

void row_grad_(const Tensor& z, const Tensor& t, const Tensor& lse, const c10::optional<Tensor>& ent,
               const Tensor& c_l, const c10::optional<Tensor>& c_h, double inv_tau, double pre, double cap,
               int64_t col0, Tensor out) {
  check_tile(z, "z");
  check_tile(out, "out");
  const int64_t C = z.size(0);
  TORCH_CHECK(out.sizes() == z.sizes(), "exgrpo_native::row_grad_: out has shape ", out.sizes(), " but z has ",
              z.sizes());
  check_rows(t, C, at::kLong, "t");
  check_rows(lse, C, at::kFloat, "lse");
  check_rows(c_l, C, at::kFloat, "c_l");
  TORCH_CHECK(ent.has_value() == c_h.has_value(), "exgrpo_native::row_grad_: ent and c_h come together");
  if (c_h.has_value()) {
    check_rows(*ent, C, at::kFloat, "ent");
    check_rows(*c_h, C, at::kFloat, "c_h");
  }
  // out aliasing z is allowed only as the same tile (in place): a shifted overlap would read written values
  TORCH_CHECK(out.data_ptr() == z.data_ptr() || out.scalar_type() != z.scalar_type() || !out.is_alias_of(z),
              "exgrpo_native::row_grad_: out overlaps z without being z");
  const auto zt = z.scalar_type(), gt = out.scalar_type();
  if (zt == gt) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, zt, "exgrpo_native::row_grad_", [&] {
      row_grad_impl<scalar_t, scalar_t>(z, t, lse, ent, c_l, c_h, inv_tau, pre, cap, col0, out);
    });
  } else if (zt == at::kFloat && gt == at::kBFloat16) {
    row_grad_impl<float, at::BFloat16>(z, t, lse, ent, c_l, c_h, inv_tau, pre, cap, col0, out);
  } else if (zt == at::kFloat && gt == at::kHalf) {
    row_grad_impl<float, at::Half>(z, t, lse, ent, c_l, c_h, inv_tau, pre, cap, col0, out);
  } else {
    TORCH_CHECK(false, "exgrpo_native::row_grad_: z ", zt, " -> out ", gt,
                " is not supported (out must be z's dtype, or bf16/fp16 from fp32 z)");
  }
}

// ------------------------------------------------------------------------------------------ NLL rows

// per row: statistics, then in place x <- c_l (onehot - p) dz'/dx with the row still in cache. -> (logp, lse)
std::tuple<Tensor, Tensor> row_stats_grad_(Tensor z, const Tensor& t, const Tensor& c_l, double inv_tau, double pre,
                                           double cap) {
  check_tile(z, "z");
  const int64_t C = z.size(0), V = z.size(1);
  check_rows(t, C, at::kLong, "t");
  check_rows(c_l, C, at::kFloat, "c_l");
  auto opts = z.options().dtype(at::kFloat);
  Tensor logp = at::empty({C}, opts), lse = at::empty({C}, opts);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "exgrpo_native::row_stats_grad_", [&] {
    const Xf f = make_xf(inv_tau, pre, cap);
    scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t* tp = t.const_data_ptr<int64_t>();
    const float* clp = c_l.const_data_ptr<float>();
    float *lp = logp.data_ptr<float>(), *ls = lse.data_ptr<float>();
    const int64_t sz = z.stride(0);
    with_bool(cap > 0, [&](auto CAP) {
      at::parallel_for(0, C, grain(V), [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
          scalar_t* row = zp + r * sz;
          const auto st = stats_row<CAP(), false>(row, V, tp[r], f);
          lp[r] = (st.logp);
          ls[r] = (st.lse);
          const float cl = tp[r] == kIgnore ? 0.0f : static_cast<float>(clp[r]);
          grad_row<CAP(), false>(row, row, V, 0, tp[r], f, st.lse, 0.0f, cl, 0.0f);
        }
      });
    });
  });
  return {logp, lse};
}

// ------------------------------------------------------------------------------------------ GRPO token rows

struct PolicyCfg {
  double eps_low, eps_high, delta, beta, is_cap;
  int64_t kl_est, is_mode;
};

// The token-level GRPO terms of one row from its log-prob l (closed form; kernels/grpo_loss/losses.py policy_terms):
//   rho = exp(l - l_old),  pg = -min(rho_u A, clip(rho, 1 - eps_low, 1 + eps_high) A),  rho_u = min(rho, delta)
//   J = w (isw pg + beta KL),  c = dJ/dl = w (isw dpg/dl + beta dKL/dl)  (min: ties split; clamps pass inclusively)
struct TokenTerms {
  float rho, kl, j, c;
};

inline TokenTerms token_terms(float l, float old, float adv, float w, float isw, bool has_ref, float ref,
                              const PolicyCfg& p) {
  const float rho = std::exp(l - old);
  const float lo = static_cast<float>(1.0 - p.eps_low), hi = static_cast<float>(1.0 + p.eps_high);
  const float rho_c = std::min(std::max(rho, lo), hi);
  const float d_c = (rho >= lo && rho <= hi) ? rho : 0.0f;
  float rho_u = rho, d_u = rho;
  if (p.delta > 0) {
    const float dl = static_cast<float>(p.delta);
    rho_u = std::min(rho, dl);
    d_u = rho <= dl ? rho : 0.0f;
  }
  const float t1 = rho_u * adv, t2 = rho_c * adv;
  const float pg = -std::min(t1, t2);
  const float dpg = t1 < t2 ? -adv * d_u : (t2 < t1 ? -adv * d_c : -adv * 0.5f * (d_u + d_c));
  float kl = 0.0f, dkl = 0.0f;
  if (has_ref) {
    const float d = ref - l;
    if (p.kl_est == 1) {
      kl = -d;
      dkl = 1.0f;
    } else if (p.kl_est == 2) {
      kl = 0.5f * d * d;
      dkl = -d;
    } else {
      const float ed = std::exp(d);
      kl = ed - d - 1.0f;
      dkl = 1.0f - ed;
    }
  }
  const float beta = static_cast<float>(p.beta);
  return {rho, kl, w * (isw * pg + beta * kl), w * (isw * dpg + beta * dkl)};
}

template <typename T>
const T* opt_ptr(const c10::optional<Tensor>& x) {
  return x.has_value() ? x->const_data_ptr<T>() : nullptr;
}

// -> (logp, ratio, kl, ent or [0], j) per row; with compute_grad the tile z becomes dJ/dx in place
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> grpo_token_rows_(
    Tensor z, const Tensor& t, const Tensor& sid, const Tensor& adv, const Tensor& w_seq,
    const c10::optional<Tensor>& seq_isw, const c10::optional<Tensor>& old, const c10::optional<Tensor>& ref,
    const c10::optional<Tensor>& gen, const c10::optional<Tensor>& ext, double inv_tau, double pre, double cap,
    double eps_low, double eps_high, double delta, double beta, double is_cap, int64_t kl_est, int64_t is_mode,
    bool with_entropy, bool compute_grad) {
  check_tile(z, "z");
  const int64_t C = z.size(0), V = z.size(1), S = adv.size(0);
  check_rows(t, C, at::kLong, "t");
  check_rows(sid, C, at::kLong, "sid");
  check_rows(adv, S, at::kFloat, "adv");
  check_rows(w_seq, S, at::kFloat, "w_seq");
  TORCH_CHECK(kl_est >= 1 && kl_est <= 3, "exgrpo_native::grpo_token_rows_: kl_est must be 1, 2 or 3, got ", kl_est);
  TORCH_CHECK(is_mode >= 0 && is_mode <= 2, "exgrpo_native::grpo_token_rows_: is_mode must be 0, 1 or 2, got ",
              is_mode);
  TORCH_CHECK(is_mode != 1 || gen.has_value(), "exgrpo_native::grpo_token_rows_: is_mode 1 needs gen");
  TORCH_CHECK(is_mode != 2 || seq_isw.has_value(), "exgrpo_native::grpo_token_rows_: is_mode 2 needs seq_isw");
  if (seq_isw) check_rows(*seq_isw, S, at::kFloat, "seq_isw");
  if (old) check_rows(*old, C, at::kFloat, "old");
  if (ref) check_rows(*ref, C, at::kFloat, "ref");
  if (gen) check_rows(*gen, C, at::kFloat, "gen");
  if (ext) check_rows(*ext, C, at::kFloat, "ext");
  auto opts = z.options().dtype(at::kFloat);
  Tensor logp = at::empty({C}, opts), ratio = at::empty({C}, opts), kl = at::empty({C}, opts),
         jt = at::empty({C}, opts), ent = at::empty({with_entropy ? C : 0}, opts);
  const PolicyCfg pc{eps_low, eps_high, delta, beta, is_cap, kl_est, is_mode};
  const int64_t *tp = t.const_data_ptr<int64_t>(), *sp = sid.const_data_ptr<int64_t>();
  const float *ap = adv.const_data_ptr<float>(), *wp = w_seq.const_data_ptr<float>();
  const float *sip = opt_ptr<float>(seq_isw), *op = opt_ptr<float>(old), *rp = opt_ptr<float>(ref),
              *gp = opt_ptr<float>(gen), *ep = opt_ptr<float>(ext);
  float *lp = logp.data_ptr<float>(), *rhop = ratio.data_ptr<float>(), *klp = kl.data_ptr<float>(),
        *jp = jt.data_ptr<float>(), *enp = with_entropy ? ent.data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, z.scalar_type(), "exgrpo_native::grpo_token_rows_", [&] {
    const Xf f = make_xf(inv_tau, pre, cap);
    scalar_t* zp = z.data_ptr<scalar_t>();
    const int64_t sz = z.stride(0);
    with_bool(cap > 0, [&](auto CAP) {
      with_bool(with_entropy, [&](auto ENT) {
        at::parallel_for(0, C, grain(V), [&](int64_t r0, int64_t r1) {
          for (int64_t r = r0; r < r1; ++r) {
            scalar_t* row = zp + r * sz;
            const int64_t s = sp[r];
            TORCH_CHECK(s >= 0 && s < S, "exgrpo_native::grpo_token_rows_: sid[", r, "] = ", s, " outside [0, ", S,
                        ")");
            const auto st = stats_row<CAP(), ENT()>(row, V, tp[r], f);
            const float l = (st.logp);
            const float o = op ? op[r] : l;
            float isw = 1.0f;
            if (pc.is_mode == 1) isw = std::min(std::exp(o - gp[r]), static_cast<float>(pc.is_cap));
            if (pc.is_mode == 2) isw = sip[s];
            if (ep) isw *= ep[r];
            const TokenTerms tt = token_terms(l, o, ap[s], wp[s], isw, rp != nullptr, rp ? rp[r] : 0.0f, pc);
            lp[r] = l;
            rhop[r] = tt.rho;
            klp[r] = tt.kl;
            jp[r] = tt.j;
            if constexpr (ENT()) enp[r] = (st.ent);
            if (compute_grad) grad_row<CAP(), false>(row, row, V, 0, tp[r], f, st.lse, 0.0f, tt.c, 0.0f);
          }
        });
      });
    });
  });
  return {logp, ratio, kl, ent, jt};
}
