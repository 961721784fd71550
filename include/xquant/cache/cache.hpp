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
//
// Snapshot hooks (needed only by Cache::snapshot / restore / fork). Every codec of this library
// has them (PerLayer, CrossLayer, LatentCrossLayer, Latent, Kivi); a codec without them (a
// third-party one) still compiles, and those three calls then stop with a static_assert naming
// the missing hook:
//   std::string Codec::describe() const;    // codec type, quantizer(s) and every option that
//                                           // changes what is stored, e.g. "PerLayer<...>{group=128,window=0}"
//   void State::save(std::size_t seq, snapshot::Writer&) const;  // all of seq's state, in a fixed order
//   void State::load(std::size_t seq, snapshot::Reader&);        // seq is open and empty
//   void State::fork(std::size_t src, std::size_t dst);          // dst is open and empty
// and, optionally,
//   std::string State::describe() const;    // what the stored bytes depend on that the state
//                                           // derived at construction, e.g. a fingerprint of the
//                                           // SVD factors of borrowed weights (empty: nothing)
// which the cache appends to the codec's description, so that a snapshot restores only where it
// is the same (ConfigError otherwise). Compute it once in the constructor: it is read on every
// snapshot and restore. (Codec::describe cannot do it: the codec holds only borrowed pointers and
// does not know the geometry, and hashing weights on every call would cost too much.)
// A codec built from cache::Stream gets save/load/fork by forwarding to each stream's, in a fixed
// order (codec/per_layer.hpp: one loop each). Per-sequence codec state that is not in a stream
// (windows, running accumulators: codec/cross_layer.hpp) is written with Writer and read back
// with Reader, whose every read is bounds-checked. Save everything a later append or read
// depends on: a restored or forked sequence must behave bit for bit like the original. On a
// throw from load or fork the cache closes `seq`/`dst`, so close() must release whatever
// load/fork took. append must be all or nothing: when it throws, the sequence is as it was (a
// codec with several streams per layer checks everything that could fail in any stream before
// the first one stores: codec/common.hpp).

#include <cmath>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "../core/backend.hpp"
#include "../remat/weights.hpp"
#include "config.hpp"
#include "snapshot.hpp"

namespace xquant {

using SequenceId = std::size_t;

namespace detail {
// Every codec of this library has the snapshot hooks; snapshot/restore/fork check for them
// (static_assert) so that a third-party codec without them gets a message naming what is missing.
template <class Codec, class State, class = void>
inline constexpr bool has_snapshot_hooks = false;
template <class Codec, class State>
inline constexpr bool has_snapshot_hooks<
    Codec, State,
    std::void_t<decltype(std::declval<const Codec&>().describe()),
                decltype(std::declval<const State&>().save(std::size_t{}, std::declval<snapshot::Writer&>())),
                decltype(std::declval<State&>().load(std::size_t{}, std::declval<snapshot::Reader&>())),
                decltype(std::declval<State&>().fork(std::size_t{}, std::size_t{}))>> = true;
template <class State, class = void>
inline constexpr bool has_state_description = false;
template <class State>
inline constexpr bool has_state_description<State, std::void_t<decltype(std::string(std::declval<const State&>().describe()))>> =
    true;
}  // namespace detail

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

  /// The whole cache of `seq` (every layer, lengths, sealed flags, quantized blocks, fp16
  /// windows) as bytes: magic, format version, configuration fingerprint, payload, CRC-32
  /// (cache/snapshot.hpp). Equal contents give equal bytes. Positions are implicit: token t of a
  /// layer sits at position t.
  std::vector<std::uint8_t> snapshot(SequenceId seq) const {
    static_assert(detail::has_snapshot_hooks<Codec, State>,
                  "xquant::Cache::snapshot: this codec lacks the snapshot hooks (Codec::describe, State::save/load/fork); "
                  "see the codec interface at the top of xquant/cache/cache.hpp");
    check_seq(seq);
    std::vector<std::uint8_t> out;
    snapshot::Writer w(out);
    const std::size_t payload = snapshot::begin(w, description());
    state_.save(seq, w);
    snapshot::finish(w, payload);
    return out;
  }

  /// Restores a snapshot into a new sequence and returns its id. Raises SnapshotError for bytes
  /// that are not an intact snapshot (bad magic, other version, truncated, checksum mismatch,
  /// inconsistent contents), ConfigError for a snapshot of a differently configured cache, and
  /// CapacityError when the pool lacks room; after any error no new sequence exists.
  SequenceId restore(const std::uint8_t* data, std::size_t size) {
    static_assert(detail::has_snapshot_hooks<Codec, State>,
                  "xquant::Cache::restore: this codec lacks the snapshot hooks (Codec::describe, State::save/load/fork); "
                  "see the codec interface at the top of xquant/cache/cache.hpp");
    const snapshot::Parsed p = snapshot::parse(data, size);
    const std::string mine = description();
    require<ConfigError>(p.description == mine, "snapshot: taken from a cache configured as \"", p.description,
                         "\", but this cache is \"", mine, "\"");
    const SequenceId seq = add_sequence();
    try {
      snapshot::Reader r(p.payload, p.payload_bytes, static_cast<std::size_t>(p.payload - data));
      state_.load(seq, r);
      if (r.remaining() != 0) r.fail("end of payload", ": ", r.remaining(), " bytes left after the last record");
    } catch (...) {
      remove_sequence(seq);
      throw;
    }
    return seq;
  }
  SequenceId restore(const std::vector<std::uint8_t>& bytes) { return restore(bytes.data(), bytes.size()); }

  /// A new sequence with the same cached contents as `src` (for beam search and parallel
  /// sampling); the two then grow independently. The fork is a full copy of src's blocks and
  /// windows, not copy-on-write sharing. CapacityError, creating nothing, when the pool lacks room.
  SequenceId fork(SequenceId src) {
    static_assert(detail::has_snapshot_hooks<Codec, State>,
                  "xquant::Cache::fork: this codec lacks the snapshot hooks (Codec::describe, State::save/load/fork); "
                  "see the codec interface at the top of xquant/cache/cache.hpp");
    check_seq(src);
    const SequenceId dst = add_sequence();
    try {
      state_.fork(src, dst);
    } catch (...) {
      remove_sequence(dst);
      throw;
    }
    return dst;
  }

  /// What a snapshot must have been taken from to restore here: the cache geometry (capacity
  /// excluded), the codec's description and, where the codec's state has one, the state's (e.g.
  /// a fingerprint of SVD factors).
  std::string description() const {
    const AttentionShape& a = config_.attention;
    std::string d = detail::concat("xquant::Cache{layers=", config_.layers, ",width=", config_.width, ",heads=", a.heads,
                                   ",kv_heads=", a.kv_heads, ",head_dim=", a.head_dim, ",block_tokens=",
                                   config_.block_tokens, "} ", codec_.describe());
    if constexpr (detail::has_state_description<State>) {
      const std::string s = state_.describe();
      if (!s.empty()) d += " " + s;
    }
    return d;
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
