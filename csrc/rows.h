// Row math of the fused kernels on the CPU: the twins of kernels/_rows.py's Triton device functions.
//
// A row is one token's raw logits x[0..V) (the GEMM output, bias included), any float dtype; the math is fp32, as in
// the Triton kernels and the torch twin. z' = soft_cap(pre x) / tau. Statistics are online over blocks of kBlk
// columns: one pass over the row in memory (each block is transformed into an L1 buffer, its max taken, the running
// sums rescaled once per block, then exp'd and summed). Gradients are one pass (read x, write g; g may alias x).
//
// Vectorised explicitly with GCC/Clang vector extensions, kW fp32 lanes: one register of the instruction set it is
// compiled for (16 for AVX-512, 8 for AVX2, 4 for the SSE2 baseline), so no vector spills to the stack
// rather than left to the auto-vectoriser, which turns the clamps of exp into branches and gives up.
// Included by rows.cpp once per instruction set, inside that ISA's namespace (no include guard, no namespace of
// its own): the same source compiled for AVX-512, AVX2 + FMA and the x86-64 baseline.

constexpr int64_t kIgnore = -100;
constexpr int kW = EXGRPO_LANES;  // fp32 lanes per vector: one register of the ISA (rows.cpp sets it)
constexpr int kBlk = 512;  // columns per statistics block: 2 KiB of fp32, stays in L1

typedef float vf __attribute__((vector_size(kW * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(kW * sizeof(int32_t))));

inline vf splat(float a) { return vf{} + a; }
inline vf vmax(vf a, vf b) { return a > b ? a : b; }
inline float hsum(vf v) {
  float s = 0.0f;
  for (int i = 0; i < kW; ++i) s += v[i];
  return s;
}
inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < kW; ++i) m = v[i] > m ? v[i] : m;
  return m;
}

// exp(x), kW lanes, for x <= ~0 (a logit minus its row's max or log-sum-exp): x = n ln2 + r (|r| <= ln2 / 2,
// two-part ln2), exp(r) by Cephes' degree-5 minimax polynomial, 2^n through the exponent bits. About 1 ulp.
// n comes from the 1.5 * 2^23 (+ 127 bias) shifter: t = x log2(e) + shifter holds round(x log2 e) + 127 in its low
// mantissa bits, so the exponent field is (bits(t) - bits(1.5 * 2^23)) << 23, no float -> int conversion.
// Below -87.3 the result is exp(-87.3) ~ 1.2e-38 rather than 0 (a difference no fp32 sum of a row can see).
// NaN is not carried through (the clamp may lower to a max instruction): the callers check each row for NaN.
inline vf vexp_neg(vf x) {
  constexpr float kShift = 12582912.0f + 127.0f;
  const vf xc = x < -87.3f ? splat(-87.3f) : x;
  const vf t = xc * 1.44269504088896341f + kShift;
  const vf n = t - kShift;
  const vf r = xc - n * 0.693359375f + n * 2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  vi tb;
  std::memcpy(&tb, &t, sizeof(tb));
  const vi bits = (tb - 0x4B400000) << 23;
  vf scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// exp(x) over the whole range: x > 88.7 is taken as 88.7 (exp ~ 3.3e38; tanh's use needs only "huge")
inline vf vexp(vf x) { return vexp_neg(x > 88.7f ? splat(88.7f) : x); }

// tanh(v) = 1 - 2 / (exp(2v) + 1), as the Triton kernels compute it (2 sigmoid(2v) - 1)
inline vf vtanh(vf v) { return 1.0f - 2.0f / (vexp(v * 2.0f) + 1.0f); }

struct Xf {
  float inv_tau, pre, cap;
};

// z' = soft_cap(pre x) / tau,  soft_cap(y) = cap tanh(y / cap);  without the cap: x (pre / tau), one multiply
template <bool CAP>
inline vf xform(vf x, const Xf& f) {
  if constexpr (CAP) {
    return f.cap * vtanh(x * (f.pre / f.cap)) * f.inv_tau;
  } else {
    return x * (f.pre * f.inv_tau);
  }
}

// dz'/dx = pre (1 - tanh^2(pre x / cap)) / tau   (without the cap: pre / tau)
template <bool CAP>
inline vf xform_grad(vf x, const Xf& f) {
  const float k = f.pre * f.inv_tau;
  if constexpr (CAP) {
    const vf t = vtanh(x * (f.pre / f.cap));
    return k * (1.0f - t * t);
  } else {
    return splat(k);
  }
}

// n <= kW elements of any float type -> kW fp32 lanes (the rest = pad)
template <typename T>
inline vf load(const T* p, int n, float pad) {
  vf v;
  if constexpr (std::is_same_v<T, float>) {
    if (n == kW) {
      std::memcpy(&v, p, sizeof(v));
      return v;
    }
  }
  for (int i = 0; i < kW; ++i) v[i] = i < n ? static_cast<float>(p[i]) : pad;
  return v;
}

template <typename G>
inline void store(G* p, vf v, int n) {
  if constexpr (std::is_same_v<G, float>) {
    if (n == kW) {
      std::memcpy(p, &v, sizeof(v));
      return;
    }
  }
  for (int i = 0; i < n; ++i) p[i] = static_cast<G>(v[i]);
}

struct RowStats {
  float lse, logp, ent;
};

// lse = m + log s,  s = sum_j exp(z'_j - m);  H = lse - (sum_j exp(z'_j - m) z'_j) / s;  l = z'[t] - lse.
// m is the running max: a block whose max exceeds it rescales s and a by exp(m_old - m_new) once.
template <bool CAP, bool ENT, typename T>
inline RowStats stats_row(const T* x, int64_t V, int64_t t, const Xf& f) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  alignas(64) float buf[kBlk];
  float m = -kInf, s = 0.0f, a = 0.0f;
  vf ysum = splat(0.0f);  // NaN detection: a NaN anywhere in the row makes the sum NaN
  for (int64_t v0 = 0; v0 < V; v0 += kBlk) {
    const int n = static_cast<int>(V - v0 < kBlk ? V - v0 : kBlk);
    const int nv = (n + kW - 1) / kW;
    vf bm = splat(-kInf);
    for (int k = 0; k < nv; ++k) {
      const int cnt = n - k * kW < kW ? n - k * kW : kW;
      vf y = xform<CAP>(load(x + v0 + k * kW, cnt, 0.0f), f);
      if (cnt < kW) {  // pad lanes: -inf (exp 0, never the max)
        for (int i = cnt; i < kW; ++i) y[i] = -kInf;
      }
      std::memcpy(buf + k * kW, &y, sizeof(y));
      bm = vmax(bm, y);
      ysum += y;  // NaN only with a NaN (or +inf and -inf: a row torch makes NaN too); -inf pads keep it -inf
    }
    const float mb = hmax(bm);
    if (mb > m) {
      const float sc = std::exp(m - mb);  // 0 on the first block
      s *= sc;
      a *= sc;
      m = mb;
    }
    vf vs = splat(0.0f), va = splat(0.0f);
    for (int k = 0; k < nv; ++k) {
      vf y;
      std::memcpy(&y, buf + k * kW, sizeof(y));
      const vf e = vexp_neg(y - m);
      vs += e;
      if constexpr (ENT) va += e * (y > -kInf ? y : splat(0.0f));  // a pad lane or a -inf logit: p log p -> 0
    }
    s += hsum(vs);
    a += hsum(va);
  }
  RowStats r;
  r.lse = std::isnan(hsum(ysum)) ? std::numeric_limits<float>::quiet_NaN() : m + std::log(s);
  r.ent = ENT ? r.lse - a / s : 0.0f;
  if (t == kIgnore) {
    r.logp = 0.0f;
  } else {
    r.logp = xform<CAP>(splat(static_cast<float>(x[t])), f)[0] - r.lse;
  }
  return r;
}

// p_j = exp(z'_j - lse);  dJ/dz'_j = c_l (1[j = t] - p_j) - c_h p_j (log p_j + H);  g_j = dJ/dz'_j dz'_j/dx_j.
// Columns are col0 + j (col0 > 0 for a vocabulary slab). g may alias x (each vector is read before it is written).
template <bool CAP, bool WH, typename T, typename G>
inline void grad_row(const T* x, G* g, int64_t V, int64_t col0, int64_t t, const Xf& f, float lse, float ent,
                     float cl, float ch) {
  const int64_t lt = t == kIgnore ? -1 : t - col0;
  cl += lse - lse;  // NaN where the row's statistics are NaN: its whole gradient is NaN, as in torch
  for (int64_t j = 0; j < V; j += kW) {
    const int cnt = V - j < kW ? static_cast<int>(V - j) : kW;
    const vf xv = load(x + j, cnt, 0.0f);
    const vf lp = xform<CAP>(xv, f) - lse;
    const vf p = vexp_neg(lp);
    vf d = -cl * p;
    if (lt >= j && lt < j + cnt) d[lt - j] += cl;  // the one-hot column
    if constexpr (WH) d -= ch * p * (p > 0.0f ? lp + ent : splat(0.0f));
    d *= xform_grad<CAP>(xv, f);
    store(g + j, d, cnt);
  }
}
