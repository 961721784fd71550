#pragma once
// The cache container an engine talks to: sequences, appends, memory accounting. What is stored
// per layer is the codec's business (codec/); how loops run is the backend's (backend/).
//
// A codec is a struct of runtime options with a nested `template <class Backend> class State`
// that provides:
//   State(const CacheConfig&, const Codec&);
//   void open(std::size_t seq);  void close(std::size_t seq);
//   void append(std::size_t seq, int layer, const float* x, index_t n, index_t ld);  // finite x
//   void seal(std::size_t seq, int layer);
//   index_t length(std::size_t seq, int layer) const;
//   LayerSources sources(std::size_t seq, int layer, index_t begin, index_t end, const LayerWeights&);
//   std::size_t allocated_bytes() const;
// and a `static constexpr bool values_are_linear` (true when V = value·value_projᵀ exactly, which
// is what absorbed-value attention needs).

#include <cmath>
#include <vector>

#include "../core/backend.hpp"
#include "../remat/weights.hpp"
#include "config.hpp"

namespace xquant {

using SequenceId = std::size_t;

/// \tparam Codec   what each layer stores (codec::PerLayer, ...), with its runtime options
/// \tparam Backend backend::Eigen (default) or backend::Reference
template <class Codec, class Backend = backend::Eigen>
class Cache {
  static_assert(backend::is_cpu_backend<Backend>,
                "xquant::Cache runs on backend::Eigen or backend::Reference; the GPU cache is in <xquant/cuda.cuh>");

 public:
  using codec_type = Codec;
  using backend_type = Backend;
  using State = typename Codec::template State<Backend>;

  explicit Cache(const CacheConfig& config, const Codec& codec = Codec{})
      : config_(validated(config)), codec_(codec), state_(config_, codec_) {}

  /// Opens a new, empty sequence and returns its id (ids of removed sequences are reused).
  SequenceId add_sequence() {
    SequenceId id = 0;
    while (id < live_.size() && live_[id]) ++id;
    if (id == live_.size()) live_.push_back(false);
    state_.open(id);
    live_[id] = true;
    return id;
  }
  /// Drops a sequence; its blocks return to the pool.
  void remove_sequence(SequenceId seq) {
    check_seq(seq);
    state_.close(seq);
    live_[seq] = false;
  }

  /// Appends `n` tokens of `layer`'s attention input X (n × width floats, row stride `ld`,
  /// 0 meaning width): a prefill chunk or one decode token. Layers are appended independently,
  /// normally in order for each chunk. NaN or ±Inf in X raises ValueError and stores nothing.
  void append(SequenceId seq, int layer, const float* x, index_t n, index_t ld = 0) {
    check_seq(seq);
    check_layer(layer);
    if (ld == 0) ld = config_.width;
    require<ShapeError>(n >= 0, "n: token count must be non-negative, got ", n);
    require<ShapeError>(ld >= config_.width, "ld: row stride must be at least width ", config_.width, ", got ", ld);
    require<ShapeError>(n == 0 || x != nullptr, "x: null pointer for ", n, " tokens");
    check_finite(x, n, ld);
    state_.append(seq, layer, x, n, ld);
  }

  /// Quantizes the tokens still waiting in the fp16 window of one layer (or all layers); the
  /// sequence then takes no more tokens there. For teacher-forced scoring of a whole window.
  void seal(SequenceId seq, int layer) {
    check_seq(seq);
    check_layer(layer);
    state_.seal(seq, layer);
  }
  void seal(SequenceId seq) {
    for (int l = 0; l < config_.layers; ++l) seal(seq, l);
  }

  /// Tokens of `seq` cached in `layer`.
  index_t length(SequenceId seq, int layer = 0) const {
    check_seq(seq);
    check_layer(layer);
    return state_.length(seq, layer);
  }

  /// Bytes the cache has allocated (blocks ever taken from the pool, fp16 windows), all layers.
  std::size_t allocated_bytes() const { return state_.allocated_bytes(); }

  /// What rematerialization reads for tokens [begin, end) of a layer (valid until the next call).
  LayerSources sources(SequenceId seq, int layer, index_t begin, index_t end, const LayerWeights& w) {
    check_seq(seq);
    check_layer(layer);
    const index_t n = length(seq, layer);
    require<ShapeError>(0 <= begin && begin <= end && end <= n, "token range: [", begin, ", ", end,
                        ") must lie within the ", n, " cached tokens");
    return state_.sources(seq, layer, begin, end, w);
  }

  const CacheConfig& config() const { return config_; }
  const Codec& codec() const { return codec_; }
  /// The codec's storage, for codec-specific queries (e.g. dequantized X̂).
  State& state() { return state_; }
  const State& state() const { return state_; }

 private:
  static const CacheConfig& validated(const CacheConfig& c) {
    c.validate();
    return c;
  }
  void check_seq(SequenceId seq) const {
    require<Error>(seq < live_.size() && live_[seq], "sequence: ", seq, " is not an open sequence of this cache");
  }
  void check_layer(int layer) const {
    require<ShapeError>(layer >= 0 && layer < config_.layers, "layer: must be in [0, ", config_.layers, "), got ",
                        layer);
  }
  // Our NaN/Inf policy: reject, naming the first bad element. One integer OR-reduction per row
  // (vectorizable); the search for the culprit runs only on failure.
  void check_finite(const float* x, index_t n, index_t ld) const {
    for (index_t r = 0; r < n; ++r) {
      const float* row = x + r * ld;
      std::uint32_t bad = 0;
      for (index_t j = 0; j < config_.width; ++j) {
        std::uint32_t u;
        std::memcpy(&u, row + j, 4);
        bad |= static_cast<std::uint32_t>((u & 0x7f800000u) == 0x7f800000u);
      }
      if (bad)
        for (index_t j = 0; j < config_.width; ++j)
          if (!std::isfinite(row[j]))
            throw ValueError(detail::concat("X: token ", r, " of the appended chunk, channel ", j, " is ", row[j],
                                            "; activations must be finite"));
    }
  }

  CacheConfig config_;
  Codec codec_;
  State state_;
  std::vector<bool> live_;
};

}  // namespace xquant
