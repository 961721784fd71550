// cache_modes.hpp — the --cache modes: runtime settings (mode name, bits, group, base layers,
// window) turned into a library cache type, once, here. Each mode is one row of cache_modes().
//
// Settings shared by every mode, and why they are chosen so (docs/ACCURACY.md repeats them):
//   group   default 128, clamped to the width of the axis it runs along when that is smaller (the
//           paper's rule): per-token groups run along the stored tensor's width (d = 64 for
//           stories260K gives groups of 64), per-channel groups along tokens (128).
//   base    the first `base_layers` layers are stored at max(bits, base_bits) bits, for every
//           quantized mode alike (the paper keeps its first 3 of 32 layers at 4 bits for every
//           method; default here 1 layer at 4 bits, about the same share of an 8-layer model).
//           XQuant-CL's base layer also seeds its cross-layer accumulator.
//   params  the group parameters' storage, fp16 (default) or bf16 (xquant::ParamBits; bf16 is what
//           the Hopper remat kernel decodes fastest, exactly): every quantizer of the mode alike.
//   window  generation (Fill::Stream): the newest tokens wait in fp16. Per-channel streams keep
//           their unfilled token group (up to 128 tokens) by construction; per-token streams keep
//           the newest `window` tokens, default 128, so every method keeps the same recent tokens
//           unquantized (DESIGN.md §1). Perplexity (Fill::TeacherForce): no window at all.
#pragma once

#include <algorithm>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include <xquant/xquant.hpp>

#include "fp32_attention.hpp"
#include "xquant_attention.hpp"

namespace llm {

struct CacheSettings {
  std::string mode = "fp32";
  int bits = 4;
  int group = 128;       // before clamping
  int base_layers = 1;   // quantized modes only
  int base_bits = 4;
  xquant::ParamBits params = xquant::ParamBits::Fp16;  // the quantizers' group parameters
  int window = -1;       // per-token generation window; -1: default (128)
  Fill fill = Fill::TeacherForce;
};

// What was actually built, for printing and JSON.
struct CacheInfo {
  std::string mode;
  bool quantized = false;
  int bits = 32;        // bits of the non-base layers (32/16 for the float modes)
  int group = 0;        // group along the per-token axis (0: none)
  int base_layers = 0;  // layers at base_bits
  int base_bits = 0;
  int window = 0;       // fp16 window of per-token streams (0 in teacher forcing)
  std::string params;   // group parameters of the quantized modes: "fp16" or "bf16"
  std::string codec;    // the library type, described
};

struct CacheModeError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

namespace modes {

inline int clamp_group(int group, int width) { return std::min(group, width); }

// Calls f(PB) with the settings' parameter storage as a compile-time constant (like dispatch_bits).
template <class F>
auto dispatch_params(xquant::ParamBits p, F&& f) {
  using xquant::ParamBits;
  if (p == ParamBits::Bf16) return f(std::integral_constant<ParamBits, ParamBits::Bf16>{});
  return f(std::integral_constant<ParamBits, ParamBits::Fp16>{});
}
// Uniform<B, axis> with parameters stored as PB.
template <int B, xquant::Axis A, xquant::ParamBits PB>
using UniformQ = xquant::quant::Uniform<B, A, xquant::Scheme::Asymmetric, PB>;

// A quantized mode's layout: layers [0, base) at base bits, the rest at bits.
struct Layout {
  int base_layers, base_bits, bits, window;
};

inline Layout layout(const Model& m, const CacheSettings& s) {
  const int L = m.config().n_layers;
  if (s.base_layers < 0 || s.base_layers > L)
    throw CacheModeError("--base-layers must be in 0.." + std::to_string(L) + " for this model, got " +
                         std::to_string(s.base_layers));
  Layout lo{s.base_layers, std::max(s.bits, s.base_bits), s.bits, 0};
  if (lo.base_layers == 0) lo.base_bits = 0;
  if (s.fill == Fill::Stream) lo.window = s.window < 0 ? 128 : s.window;
  return lo;
}

// Per-layer XQuant (per-token groups along d) for layers [first, first + count) at B bits.
template <int B, xquant::ParamBits PB>
std::unique_ptr<AttentionCache> per_layer(const Model& m, int group, const Layout& lo, Fill fill, int first,
                                          int count) {
  using Q = UniformQ<B, xquant::Axis::Token, PB>;
  xquant::codec::PerLayer<Q> codec;
  codec.group = group;
  codec.window = lo.window;
  return std::make_unique<XquantAttention<xquant::codec::PerLayer<Q>>>(m, codec, fill, first, count);
}

// K/V weights of layers [first, first + count), for codecs that take them in their options.
inline std::vector<xquant::LayerWeights> weights_of(const Model& m, int first, int count) {
  const std::vector<xquant::LayerWeights> all = kv_weights(m);
  return std::vector<xquant::LayerWeights>(all.begin() + first, all.begin() + first + count);
}

// KIVI*: K quantized per channel before RoPE (groups of 128 tokens), V per token; B bits.
// quant::Fp16 for both is the FP16 K/V cache.
template <class KeyQ, class ValueQ>
std::unique_ptr<AttentionCache> kivi(const Model& m, int value_group, const Layout& lo, Fill fill, int first, int count) {
  xquant::codec::Kivi<KeyQ, ValueQ> codec;
  codec.weights = weights_of(m, first, count);
  codec.key_group = 128;
  codec.value_group = value_group;
  codec.window = lo.window;
  return std::make_unique<XquantAttention<xquant::codec::Kivi<KeyQ, ValueQ>>>(m, codec, fill, first, count);
}

// Latent (SVD) XQuant: X·Uk per channel (groups of 128 tokens), X·Uv per token; B bits.
template <int B, xquant::ParamBits PB>
std::unique_ptr<AttentionCache> latent(const Model& m, int value_group, const Layout& lo, Fill fill, int first,
                                       int count) {
  using C = xquant::codec::Latent<UniformQ<B, xquant::Axis::Channel, PB>, UniformQ<B, xquant::Axis::Token, PB>>;
  C codec;
  codec.weights = weights_of(m, first, count);
  codec.key_group = 128;
  codec.value_group = value_group;
  codec.window = lo.window;
  return std::make_unique<XquantAttention<C>>(m, codec, fill, first, count);
}

// XQuant-CL (Latent: in the SVD basis of each layer's [Wk|Wv]): deltas at B bits, the first
// base_layers (at least 1: layer 0 has no predecessor) plainly at BB bits.
template <bool Latent, int B, int BB, xquant::ParamBits PB>
std::unique_ptr<AttentionCache> cross_layer(const Model& m, int group, int base_layers, const Layout& lo, Fill fill) {
  using C = xquant::codec::CrossLayerCodec<UniformQ<B, xquant::Axis::Token, PB>, UniformQ<BB, xquant::Axis::Token, PB>,
                                           Latent>;
  C codec;
  codec.base_layers = base_layers;
  codec.group = group;
  codec.window = lo.window;
  if (Latent) codec.weights = kv_weights(m);
  return std::make_unique<XquantAttention<C>>(m, codec, fill);
}

// Builds `make(bits, first, count)` for the base layers and the rest, split if there are base layers.
inline std::unique_ptr<AttentionCache> with_base_layers(
    const Model& m, const Layout& lo,
    const std::function<std::unique_ptr<AttentionCache>(int bits, int first, int count)>& make) {
  const int L = m.config().n_layers;
  if (lo.base_layers == 0) return make(lo.bits, 0, L);
  if (lo.base_layers == L) return make(lo.base_bits, 0, L);
  return std::make_unique<LayerSplit>(lo.base_layers, make(lo.base_bits, 0, lo.base_layers),
                                      make(lo.bits, lo.base_layers, L - lo.base_layers));
}

}  // namespace modes

struct CacheMode {
  const char* name;
  const char* help;
  std::function<std::unique_ptr<AttentionCache>(const Model&, const CacheSettings&, CacheInfo&)> make;
};

// Fills the quantized-mode fields of `info`.
inline void describe_layout(CacheInfo& info, const modes::Layout& lo, int group, const std::string& codec,
                            xquant::ParamBits params) {
  info.quantized = true;
  info.params = params == xquant::ParamBits::Bf16 ? "bf16" : "fp16";
  info.bits = lo.bits;
  info.group = group;
  info.base_layers = lo.base_layers;
  info.base_bits = lo.base_bits;
  info.window = lo.window;
  info.codec = codec;
}

// XQuant-CL and its latent variant: base layers are part of the codec (at least one).
template <bool Latent>
std::unique_ptr<AttentionCache> make_cross_layer(const Model& m, const CacheSettings& s, CacheInfo& info) {
  using namespace modes;
  const Config& c = m.config();
  Layout lo = layout(m, s);
  if (lo.base_layers == 0) {  // layer 0 has no previous layer to take a delta from
    lo.base_layers = 1;
    lo.base_bits = lo.bits;
  }
  const int width = Latent ? std::min(c.dim, 2 * c.kv_dim()) : c.dim;
  const int group = clamp_group(s.group, width);
  describe_layout(info, lo, group,
                  std::string(Latent ? "LatentCrossLayer" : "CrossLayer") + "<Uniform<bits,Token>,Uniform<base_bits,Token>>{group=" +
                      std::to_string(group) + ",base_layers=" + std::to_string(lo.base_layers) + "}",
                  s.params);
  return dispatch_params(s.params, [&](auto PB) {
    return xquant::dispatch_bits(lo.bits, [&](auto B) {
      return xquant::dispatch_bits(lo.base_bits, [&](auto BB) {
        return cross_layer<Latent, B(), BB(), PB()>(m, group, lo.base_layers, lo, s.fill);
      });
    });
  });
}

inline const std::vector<CacheMode>& cache_modes() {
  using namespace modes;
  using xquant::Axis;
  static const std::vector<CacheMode> t = {
      {"fp32", "library cache of X in fp32, K and V rematerialized (unquantized reference)",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) -> std::unique_ptr<AttentionCache> {
         using C = xquant::codec::PerLayer<xquant::quant::Fp32>;
         info.codec = C{}.describe();
         return std::make_unique<XquantAttention<C>>(m, C{}, s.fill);
       }},
      {"fp32-kv", "plain fp32 K/V cache outside the library (independent check of fp32)",
       [](const Model& m, const CacheSettings&, CacheInfo& info) -> std::unique_ptr<AttentionCache> {
         info.codec = "llm::Fp32KvAttention";
         return std::make_unique<Fp32KvAttention>(m);
       }},
      {"xquant", "XQuant: quantized X per token (groups along d), K and V rematerialized",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) -> std::unique_ptr<AttentionCache> {
         const Layout lo = layout(m, s);
         const int group = clamp_group(s.group, m.config().dim);
         describe_layout(info, lo, group, "PerLayer<Uniform<bits,Token>>{group=" + std::to_string(group) + "}",
                         s.params);
         return with_base_layers(m, lo, [&](int bits, int first, int count) {
           return dispatch_params(s.params, [&](auto PB) {
             return xquant::dispatch_bits(bits,
                                          [&](auto B) { return per_layer<B(), PB()>(m, group, lo, s.fill, first, count); });
           });
         });
       }},
      {"fp16", "K and V stored in fp16, as an inference engine does (the FP16 K/V baseline)",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) -> std::unique_ptr<AttentionCache> {
         using F = xquant::quant::Fp16;
         info.bits = 16;
         info.codec = "Kivi<Fp16,Fp16>";
         Layout lo{0, 0, 16, 0};
         return kivi<F, F>(m, m.config().kv_dim(), lo, s.fill, 0, m.config().n_layers);
       }},
      {"kivi", "KIVI*: K quantized per channel before RoPE (groups of 128 tokens), V per token",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) -> std::unique_ptr<AttentionCache> {
         const Layout lo = layout(m, s);
         const int group = clamp_group(s.group, m.config().kv_dim());
         describe_layout(info, lo, group,
                         "Kivi<Uniform<bits,Channel>,Uniform<bits,Token>>{key_group=128,value_group=" +
                             std::to_string(group) + "}",
                         s.params);
         return with_base_layers(m, lo, [&](int bits, int first, int count) {
           return dispatch_params(s.params, [&](auto PB) {
             return xquant::dispatch_bits(bits, [&](auto B) {
               using K = UniformQ<B(), Axis::Channel, PB()>;
               using V = UniformQ<B(), Axis::Token, PB()>;
               return kivi<K, V>(m, group, lo, s.fill, first, count);
             });
           });
         });
       }},
      {"xquant-cl", "XQuant-CL: per layer the quantized delta X_i - X^_{i-1}; base layers plain",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) { return make_cross_layer<false>(m, s, info); }},
      {"xquant-svd", "XQuant for GQA: latents X.Uk per channel and X.Uv per token (SVD of Wk, Wv)",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) -> std::unique_ptr<AttentionCache> {
         const Layout lo = layout(m, s);
         const int rank_v = std::min(m.config().dim, m.config().kv_dim());
         const int group = clamp_group(s.group, rank_v);
         describe_layout(info, lo, group,
                         "Latent<Uniform<bits,Channel>,Uniform<bits,Token>>{key_group=128,value_group=" +
                             std::to_string(group) + "}",
                         s.params);
         return with_base_layers(m, lo, [&](int bits, int first, int count) {
           return dispatch_params(s.params, [&](auto PB) {
             return xquant::dispatch_bits(bits,
                                          [&](auto B) { return latent<B(), PB()>(m, group, lo, s.fill, first, count); });
           });
         });
       }},
      {"xquant-svd-cl", "XQuant-CL in the SVD basis of each layer's [Wk|Wv] (GQA-CL)",
       [](const Model& m, const CacheSettings& s, CacheInfo& info) { return make_cross_layer<true>(m, s, info); }},
  };
  return t;
}

inline const CacheMode* find_cache_mode(const std::string& name) {
  for (const CacheMode& c : cache_modes())
    if (name == c.name) return &c;
  return nullptr;
}

// Modes the driver knows by name but whose codec is not in the library yet.
inline const std::vector<std::string>& pending_cache_modes() {
  static const std::vector<std::string> t = {};
  return t;
}

inline std::unique_ptr<AttentionCache> make_attention(const Model& m, const CacheSettings& s, CacheInfo& info) {
  info = CacheInfo{};
  info.mode = s.mode;
  if (const CacheMode* c = find_cache_mode(s.mode)) return c->make(m, s, info);
  for (const std::string& p : pending_cache_modes())
    if (s.mode == p) throw CacheModeError("cache mode '" + s.mode + "' is not available yet (its codec is not in the library)");
  std::string names;
  for (const CacheMode& c : cache_modes()) names += (names.empty() ? "" : ", ") + std::string(c.name);
  throw CacheModeError("unknown --cache mode '" + s.mode + "' (known: " + names + ")");
}

}  // namespace llm
