// attention_cache.hpp — the seam between the transformer and whatever holds its past.
//
// The model hands the cache the *normalized attention input X* of each layer (not K and V): the
// caches of this project (XQuant) store a quantized X and rematerialize K = RoPE(X·Wkᵀ) and
// V = X·Wvᵀ from it, so the cache owns the K/V computation. A cache is therefore constructed with a
// reference to the loaded Model (see model.hpp: Model::layer(l).wk / .wv, Model::rope()).
// One AttentionCache instance holds one sequence. Implementations: xquant_attention.hpp (the
// library's caches, every --cache mode but one) and fp32_attention.hpp (a plain fp32 K/V cache,
// kept as an independent check of the library path).
#pragma once

#include <cstddef>

namespace llm {

struct AttentionCache {  // one sequence
  virtual ~AttentionCache() = default;

  // x: normalized attention input X of `layer` for the n_new newest tokens (n_new × dim, row-major);
  // q: their queries, pre-RoPE (n_new × n_heads*head_size). Append X's tokens to the cache, then
  // write causal attention output (before wo) for those tokens into out (n_new × n_heads*head_size).
  // Token i of the chunk has position (tokens_before + i) and attends to positions [0, its own].
  // Model::forward calls this for layer 0, 1, ..., n_layers-1 in order, once per layer per chunk.
  virtual void append_and_attend(int layer, const float* x, const float* q, int n_new, float* out) = 0;

  // Start a new sequence (a new ppl window, a new generation).
  virtual void reset() = 0;

  // Bytes the cache has allocated (all layers; storage blocks and fp16 windows), and of those the
  // bytes an empty sequence already holds (its fp16 windows), for the memory table.
  virtual std::size_t allocated_bytes() const = 0;
  virtual std::size_t empty_bytes() const = 0;
  // Tokens of the current sequence held in layer 0.
  virtual long tokens() const = 0;
};

}  // namespace llm
