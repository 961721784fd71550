#pragma once
// Views of the model weights that rematerialization needs, and the linear maps codecs hand to it.

#include "../config.hpp"

namespace xquant {

/// One layer's key and value projections, borrowed from the engine (not copied).
/// Layout: row-major (Hkv·Dh) × d — the nn.Linear / llama2.c "out × in" layout — so that
/// K = X·Wkᵀ (+ bk) and V = X·Wvᵀ (+ bv). Biases are optional (nullptr: none).
struct LayerWeights {
  const float* wk = nullptr;
  const float* wv = nullptr;
  const float* bk = nullptr;
  const float* bv = nullptr;
};

/// Dense float rows produced by a codec for a token range: `rows` × `cols`, row stride `ld`.
struct RowsView {
  const float* data = nullptr;
  index_t rows = 0, cols = 0, ld = 0;
};

/// y = x·Wᵀ + bias with W row-major `out` × `in`. `w == nullptr` means the identity (out == in).
struct Projection {
  const float* w = nullptr;
  index_t out = 0, in = 0;
  const float* bias = nullptr;
};

/// What a codec gives rematerialization for one layer and token range:
/// K = RoPE(key·key_projᵀ), V = value·value_projᵀ. For XQuant key and value are the same X̂ and
/// the projections are Wk and Wv; other codecs cache other tensors with other maps.
struct LayerSources {
  RowsView key, value;
  Projection key_proj, value_proj;
};

}  // namespace xquant
