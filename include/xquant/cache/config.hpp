#pragma once
// Runtime configuration of a cache: the model's attention geometry and the cache's capacity.

#include "../config.hpp"
#include "../core/error.hpp"

namespace xquant {

/// Attention geometry of the model: H query heads, Hkv key/value heads of head_dim each.
struct AttentionShape {
  index_t heads = 0;     ///< H
  index_t kv_heads = 0;  ///< Hkv (== H for multi-head attention, < H for grouped-query attention)
  index_t head_dim = 0;  ///< Dh (even: RoPE rotates pairs)
  index_t kv_width() const { return kv_heads * head_dim; }  ///< dkv = Hkv·Dh
  index_t q_width() const { return heads * head_dim; }      ///< H·Dh
};

/// What a Cache is built for.
struct CacheConfig {
  int layers = 0;                ///< transformer layers
  index_t width = 0;             ///< d: width of the attention input X appended to each layer
  AttentionShape attention;      ///< head geometry, used to rematerialize K and V
  index_t capacity_tokens = 0;   ///< tokens of all sequences together (rounded up to whole blocks)
  index_t block_tokens = 128;    ///< tokens per storage block (a multiple of per-channel group sizes)

  void validate() const {
    require<ConfigError>(layers > 0, "layers: must be positive, got ", layers);
    require<ConfigError>(width > 0, "width: must be positive, got ", width);
    require<ConfigError>(attention.heads > 0 && attention.kv_heads > 0 && attention.heads % attention.kv_heads == 0,
                         "attention.heads: must be a positive multiple of attention.kv_heads, got ", attention.heads,
                         " and ", attention.kv_heads);
    require<ConfigError>(attention.head_dim > 0 && attention.head_dim % 2 == 0,
                         "attention.head_dim: must be positive and even (RoPE rotates pairs), got ", attention.head_dim);
    require<ConfigError>(capacity_tokens > 0, "capacity_tokens: must be positive, got ", capacity_tokens);
    require<ConfigError>(block_tokens > 0, "block_tokens: must be positive, got ", block_tokens);
  }
  index_t max_blocks() const { return (capacity_tokens + block_tokens - 1) / block_tokens; }
};

}  // namespace xquant
