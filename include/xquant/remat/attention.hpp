#pragma once
// The library's causal GQA attention over the cache, for engines without their own loop.
// Two rematerialization policies:
//   remat::Materialize  — form K and V for every cached token, then attend (the plain way).
//   remat::AbsorbValues — form K only; per head, weight the cached value source by the softmax
//                          first and project once: o_h = (p_h·X̂)·Wv_hᵀ (+ bv_h, since softmax rows
//                          sum to 1). V is never formed: l·d·dkv multiply-adds become about l·d·H.
// Keys cannot be absorbed: RoPE rotates each cached token by its own position.

#include <cmath>
#include <limits>
#include <vector>

#include "materialize.hpp"

namespace xquant {
namespace remat {
/// Rematerialize K and V, then attend.
struct Materialize {};
/// Rematerialize K only; apply the value projection after the softmax-weighted sum.
struct AbsorbValues {};
}  // namespace remat

/// Attention output for the `nq` newest tokens of `seq` (already appended to `layer`).
/// \tparam Policy remat::Materialize or remat::AbsorbValues
/// \param q   queries before RoPE, nq × (H·Dh), row stride ldq (0: H·Dh); query i sits at position
///            length−nq+i and attends causally to positions [0, its own].
/// \param out nq × (H·Dh), row stride ldo (0: H·Dh): the heads' outputs before the output projection.
template <class Policy, class CacheT>
void attend(CacheT& cache, SequenceId seq, int layer, const float* q, index_t nq, const LayerWeights& w,
            const Rope& rope, float* out, index_t ldq = 0, index_t ldo = 0) {
  static_assert(std::is_same_v<Policy, remat::Materialize> || std::is_same_v<Policy, remat::AbsorbValues>,
                "xquant::attend: Policy must be remat::Materialize or remat::AbsorbValues");
  static_assert(!std::is_same_v<Policy, remat::AbsorbValues> || CacheT::codec_type::values_are_linear,
                "xquant::attend<remat::AbsorbValues>: this codec does not absorb values (its V is cached as "
                "V itself, e.g. KIVI, or is not a linear map of the cached tensor); use remat::Materialize");
  using LA = remat::LinAlg<typename CacheT::backend_type>;
  const AttentionShape& a = cache.config().attention;
  const index_t H = a.heads, Hkv = a.kv_heads, Dh = a.head_dim, dkv = a.kv_width(), hpg = H / Hkv;
  ldq = ldq ? ldq : H * Dh;
  ldo = ldo ? ldo : H * Dh;
  const index_t n = cache.length(seq, layer);
  require<ShapeError>(nq >= 1 && nq <= n, "nq: must be in [1, ", n, "] (the queries' tokens must be appended first), got ", nq);
  require<ShapeError>(q != nullptr && out != nullptr, "q, out: pointers must not be null");
  require<ShapeError>(ldq >= H * Dh && ldo >= H * Dh, "ldq, ldo: row strides must be at least H·Dh ", H * Dh);
  require<ConfigError>(rope.head_dim() == Dh, "rope: head_dim ", rope.head_dim(), " differs from attention.head_dim ", Dh);
  const index_t first = n - nq;

  std::vector<float> qr(static_cast<std::size_t>(nq * H * Dh));
  for (index_t i = 0; i < nq; ++i) std::copy(q + i * ldq, q + i * ldq + H * Dh, qr.begin() + i * H * Dh);
  rope.apply(qr.data(), nq, H * Dh, H, first);

  const LayerSources s = cache.sources(seq, layer, 0, n, w);
  std::vector<float> K(static_cast<std::size_t>(n * dkv)), V;
  LA::project(s.key, s.key_proj, K.data(), dkv);
  rope.apply(K.data(), n, dkv, Hkv, 0);
  if constexpr (std::is_same_v<Policy, remat::Materialize>) {
    V.resize(static_cast<std::size_t>(n * dkv));
    LA::project(s.value, s.value_proj, V.data(), dkv);
  }

  // Per KV head, the scores of its hpg query heads are stacked: rows (j·nq + i) for head g·hpg+j.
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dh));
  std::vector<float> P(static_cast<std::size_t>(hpg * nq * n)), O(static_cast<std::size_t>(hpg * nq * Dh)), Y;
  if constexpr (std::is_same_v<Policy, remat::AbsorbValues>) Y.resize(static_cast<std::size_t>(hpg * nq * s.value.cols));
  for (index_t g = 0; g < Hkv; ++g) {
    for (index_t j = 0; j < hpg; ++j)
      LA::gemm_nt(nq, n, Dh, scale, qr.data() + (g * hpg + j) * Dh, H * Dh, K.data() + g * Dh, dkv,
                  P.data() + j * nq * n, n);
    for (index_t row = 0; row < hpg * nq; ++row) {  // causal softmax
      float* p = P.data() + row * n;
      const index_t last = first + row % nq;  // attends to [0, last]
      float mx = -std::numeric_limits<float>::infinity();
      for (index_t t = 0; t <= last; ++t) mx = p[t] > mx ? p[t] : mx;
      float sum = 0.0f;
      for (index_t t = 0; t <= last; ++t) sum += (p[t] = std::exp(p[t] - mx));
      const float inv = 1.0f / sum;
      for (index_t t = 0; t <= last; ++t) p[t] *= inv;
      for (index_t t = last + 1; t < n; ++t) p[t] = 0.0f;
    }
    if constexpr (std::is_same_v<Policy, remat::Materialize>) {
      LA::gemm_nn(hpg * nq, Dh, n, P.data(), n, V.data() + g * Dh, dkv, O.data(), Dh);
    } else {
      const index_t wv = s.value.cols;
      LA::gemm_nn(hpg * nq, wv, n, P.data(), n, s.value.data, s.value.ld, Y.data(), wv);
      const Projection& vp = s.value_proj;
      const Projection head{vp.w ? vp.w + g * Dh * vp.in : nullptr, Dh, vp.in, vp.bias ? vp.bias + g * Dh : nullptr};
      const RowsView y{vp.w ? Y.data() : Y.data() + g * Dh, hpg * nq, wv, wv};
      LA::project(y, head, O.data(), Dh);
    }
    for (index_t j = 0; j < hpg; ++j)
      for (index_t i = 0; i < nq; ++i)
        std::copy(O.data() + (j * nq + i) * Dh, O.data() + (j * nq + i + 1) * Dh, out + i * ldo + (g * hpg + j) * Dh);
  }
}

}  // namespace xquant
