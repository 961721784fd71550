// attention_cache.hpp — the seam between the transformer and whatever holds its past.
//
// The model hands the cache the *normalized attention input X* of each layer (not K and V): the
// caches of this project (XQuant) store a quantized X and rematerialize K = RoPE(X·Wkᵀ) and
// V = X·Wvᵀ from it, so the cache owns the K/V computation. A cache is therefore constructed with a
// reference to the loaded Model (see model.hpp: Model::layer(l).wk / .wv, Model::rope()).
// One AttentionCache instance holds one sequence.
#pragma once

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

  // Called by Model::forward once after a *prefill* chunk (the caller says which chunks are
  // prefills: a ppl window, a generation prompt) has been appended to every layer, and before the
  // next chunk or reset(). Hook for a cache to seal partial groups (e.g. quantize a last, partially
  // filled token group that it kept in full precision while the prompt was streaming in). It is not
  // called after single-token decode steps. Work done here cannot change the outputs already
  // written for the prefill chunk; it only affects later chunks of the same sequence.
  virtual void finish_prefill() {}
};

}  // namespace llm
