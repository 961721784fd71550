#pragma once
// Rematerialization for an engine with its own attention loop: K (post-RoPE) and V of a token
// range, computed from the cache.

#include "../cache/cache.hpp"
#include "linalg.hpp"
#include "rope.hpp"

namespace xquant {

/// Writes K = RoPE(key·key_projᵀ) (each token rotated at its own position) and
/// V = value·value_projᵀ for tokens [begin, end) of `layer` into K and V ((end−begin) × dkv,
/// row strides ldk / ldv, 0 meaning dkv).
template <class CacheT>
void materialize(CacheT& cache, SequenceId seq, int layer, index_t begin, index_t end, const LayerWeights& w,
                 const Rope& rope, float* K, float* V, index_t ldk = 0, index_t ldv = 0) {
  using LA = remat::LinAlg<typename CacheT::backend_type>;
  const AttentionShape& a = cache.config().attention;
  require<ConfigError>(rope.head_dim() == a.head_dim, "rope: head_dim ", rope.head_dim(),
                       " differs from the cache's attention.head_dim ", a.head_dim);
  require<ShapeError>(K != nullptr && V != nullptr, "K, V: output pointers must not be null");
  const index_t dkv = a.kv_width();
  ldk = ldk ? ldk : dkv;
  ldv = ldv ? ldv : dkv;
  require<ShapeError>(ldk >= dkv && ldv >= dkv, "ldk, ldv: row strides must be at least dkv ", dkv);
  const LayerSources s = cache.sources(seq, layer, begin, end, w);
  LA::project(s.key, s.key_proj, K, ldk);
  rope.apply(K, end - begin, ldk, a.kv_heads, begin);
  LA::project(s.value, s.value_proj, V, ldv);
}

}  // namespace xquant
