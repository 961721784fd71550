#pragma once
// XQuant-CL codec (DESIGN.md §1): consecutive layers' inputs are similar, so layer i caches
// ΔX̂_i = Q(X_i − X̂_{i−1}) against the *reconstruction* of layer i−1, and X̂_i = X̂_{i−1} + ΔX̂_i.
// Each layer's error is then only its own delta's quantization error: nothing accumulates.
// The first `base_layers` layers are cached plainly (BaseQ); the last of them seeds the
// accumulator. The latent variant for GQA models (LatentCrossLayer) caches the delta in the
// span of layer i's [Wk|Wv]: Q((X_i − X̂_{i−1})·Ukv_i), X̂_i = X̂_{i−1} + Q(·)·Ukv_iᵀ, which leaves
// K and V exact up to that quantization (Ukv_i Ukv_iᵀ is the identity on the rows of Wk and Wv).
//
// Call order. Appending layer i ≥ base_layers needs X̂_{i−1} of the tokens being committed, which
// the codec keeps from layer i−1's append (the "chunk accumulator"). So, for every chunk of
// tokens (a prefill chunk or one decode token), append layers 0, 1, ..., L−1 in order with the
// same tokens; likewise seal layers in order (Cache::seal(seq) does). A layer appended before
// its predecessor raises xquant::Error and stores nothing. Attention may visit layers in any
// order: a per-sequence running accumulator (n × d floats of working memory, reported by
// working_bytes(), not by allocated_bytes()) is advanced by one delta per layer when layers are
// visited in order, and rebuilt from the base layer when they are not.
//
// Window. With window > 0 the newest `window` tokens of each layer wait in fp16 as themselves
// (X_i, or X_i·Ukv_i), not as deltas, and are reconstructed from that; a token's delta is taken
// when it leaves the window, against layer i−1's final reconstruction of it. Every token then
// passes through fp16, so the cache does not depend on how tokens were chunked.
//
// Snapshots (Cache::snapshot / restore / fork) carry, besides each layer's stream, what later
// appends and reconstructions read: every layer's length, sealed flag and window tokens, the
// chunk accumulator (when a later layer may still use it) and the running accumulator (fp32, up
// to length × d floats: one extended token by token rounds differently from one rebuilt at once,
// and a restored sequence must read back the original's bits). So an XQuant-CL snapshot depends
// on the reads before it, not only on the cached tokens. The latent variant's description
// includes a fingerprint of its SVD bases: a snapshot restores only into a cache factored from
// the same weights.

#include <algorithm>
#include <string>
#include <vector>

#include "../backend/eigen/linalg.hpp"
#include "../cache/config.hpp"
#include "../cache/snapshot.hpp"
#include "../cache/stream.hpp"
#include "../quant/uniform.hpp"
#include "../remat/weights.hpp"
#include "common.hpp"
#include "svd_factors.hpp"

namespace xquant::codec {

/// Cross-layer delta codec (use the aliases CrossLayer and LatentCrossLayer).
///
/// \tparam DeltaQ  quantizer of the deltas of layers [base_layers, L): a per-token
///                 quant::Uniform<bits, Axis::Token> (bits 2, 3, 4), or quant::Fp16 / quant::Fp32
/// \tparam BaseQ   quantizer of the plainly cached layers [0, base_layers) (the paper: 4 bits)
/// \tparam InLatent false: cache X (XQuant-CL, MHA); true: cache in the SVD basis of [Wk|Wv] (GQA-CL)
template <class DeltaQ, class BaseQ, bool InLatent>
struct CrossLayerCodec {
  static_assert(DeltaQ::is_float || DeltaQ::axis == Axis::Token,
                "xquant::codec::CrossLayer: DeltaQ must group per token (Axis::Token) or be quant::Fp16/Fp32; "
                "a per-channel delta would not be final until its group fills");
  static_assert(BaseQ::is_float || BaseQ::axis == Axis::Token,
                "xquant::codec::CrossLayer: BaseQ must group per token (Axis::Token) or be quant::Fp16/Fp32");
  using delta_quantizer = DeltaQ;
  using base_quantizer = BaseQ;
  static constexpr bool latent = InLatent;

  int base_layers = 3;  ///< layers [0, base_layers) cached plainly; the last one seeds the accumulator
  index_t group = 128;  ///< per-token group size; divides the cached width (d, or rank of [Wk|Wv])
  index_t window = 0;   ///< newest tokens of each layer kept in fp16 (0 in teacher forcing)
  /// Latent variant only: each layer's Wk and Wv (borrowed; factored at State construction).
  std::vector<LayerWeights> weights;

  /// V = X̂·Wvᵀ with X̂ the accumulated reconstruction: absorbed-value attention applies.
  static constexpr bool values_are_linear = true;

  /// Snapshot hook: the codec type, both quantizers and every option that changes what is stored
  /// (the latent variant's SVD bases are fingerprinted by State::describe).
  std::string describe() const {
    std::string d = xquant::detail::concat(InLatent ? "LatentCrossLayer<" : "CrossLayer<",
                                           snapshot::describe_quantizer<DeltaQ>(), ",",
                                           snapshot::describe_quantizer<BaseQ>(), ">{base_layers=", base_layers);
    if (!(DeltaQ::is_float && BaseQ::is_float)) d += xquant::detail::concat(",group=", group);
    return d + xquant::detail::concat(",window=", window, "}");
  }

  template <class Backend>
  class State {
    using LA = remat::LinAlg<Backend>;
    using BaseStream = cache::Stream<BaseQ, Backend>;
    using DeltaStream = cache::Stream<DeltaQ, Backend>;

   public:
    State(const CacheConfig& c, const CrossLayerCodec& codec)
        : config_(c), L_(c.layers), b_(codec.base_layers), d_(c.width), window_(codec.window) {
      require<ConfigError>(b_ >= 1 && b_ <= L_, "base_layers: must be in [1, layers=", L_, "], got ", b_);
      require<ConfigError>(window_ >= 0 && window_ <= c.block_tokens, "window: must be in [0, block_tokens=",
                           c.block_tokens, "], got ", window_);
      r_ = d_;
      if constexpr (InLatent) {
        require<ConfigError>(static_cast<int>(codec.weights.size()) == L_, "weights: expected one LayerWeights per layer (",
                             L_, "), got ", codec.weights.size());
        const index_t dkv = c.attention.kv_width();
        for (int l = 0; l < L_; ++l) {
          const LayerWeights& w = codec.weights[l];
          require<ConfigError>(w.wk != nullptr && w.wv != nullptr, "weights: wk and wv of layer ", l, " must be given");
          basis_.push_back(svd::factorize_stacked({w.wk, w.wv}, {dkv, dkv}, d_));
        }
        r_ = basis_.front().rank;
        // What the stored rows depend on besides the options: the bases they are projected on.
        std::vector<const svd::Factors*> bases;
        for (const svd::Factors& f : basis_) bases.push_back(&f);
        description_ = svd::describe_bases(bases);
      }
      const index_t mb = c.max_blocks();
      for (int l = 0; l < L_; ++l) {
        const cache::StreamShape shape{r_, codec.group, c.block_tokens, mb, 0};
        if (l < b_) base_.emplace_back(shape);
        else delta_.emplace_back(shape);
      }
    }

    void open(std::size_t seq) {
      for (auto& s : base_) s.open(seq);
      for (auto& s : delta_) s.open(seq);
      if (seq >= seqs_.size()) seqs_.resize(seq + 1);
      Seq& q = seqs_[seq];
      q = Seq{};
      q.open = true;
      q.length.assign(static_cast<std::size_t>(L_), 0);
      q.sealed.assign(static_cast<std::size_t>(L_), false);
      q.ring.assign(static_cast<std::size_t>(L_), std::vector<std::uint16_t>(static_cast<std::size_t>(window_ * r_)));
    }
    void close(std::size_t seq) {
      for (auto& s : base_) s.close(seq);
      for (auto& s : delta_) s.close(seq);
      seqs_[seq] = Seq{};
    }

    void append(std::size_t seq, int layer, const float* x, index_t n, index_t ld) {
      Seq& q = seqs_[seq];
      require<CapacityError>(!q.sealed[layer], "sequence ", seq, ", layer ", layer,
                             ": sealed sequences accept no more tokens");
      commit(seq, layer, x, n, ld, window_);
    }
    /// Commits the window of `layer` (layers must be sealed in order, like appends).
    void seal(std::size_t seq, int layer) {
      Seq& q = seqs_[seq];
      if (q.sealed[layer]) return;
      commit(seq, layer, nullptr, 0, d_, 0);
      visit(layer, [&](auto& s) { s.seal(seq); });
      q.sealed[layer] = true;
    }
    index_t length(std::size_t seq, int layer) const { return seqs_[seq].length[layer]; }
    /// Tokens of `layer` whose delta (or base value) is stored; the rest wait in the window.
    index_t committed(std::size_t seq, int layer) const {
      return visit(layer, [&](const auto& s) { return s.length(seq); });
    }

    /// X̂ of tokens [begin, end) of a layer (d wide).
    void dequantize(std::size_t seq, int layer, index_t begin, index_t end, float* out, index_t ld) {
      require<ShapeError>(0 <= begin && begin <= end && end <= length(seq, layer), "token range: [", begin, ", ", end,
                          ") must lie within the ", length(seq, layer), " cached tokens");
      const RowsView x = reconstruct(seq, layer, begin, end);
      for (index_t t = 0; t < x.rows; ++t) std::copy(x.data + t * x.ld, x.data + t * x.ld + d_, out + t * ld);
    }

    /// Key and value both come from the accumulated X̂ through the model's Wk and Wv.
    LayerSources sources(std::size_t seq, int layer, index_t begin, index_t end, const LayerWeights& w) {
      require<ShapeError>(w.wk != nullptr && w.wv != nullptr, "weights: wk and wv of layer ", layer,
                          " must be given (XQuant-CL rematerializes K and V from X̂)");
      const index_t dkv = config_.attention.kv_width();
      const RowsView x = reconstruct(seq, layer, begin, end);
      return {x, x, Projection{w.wk, dkv, d_, w.bk}, Projection{w.wv, dkv, d_, w.bv}};
    }

    /// Cache bytes: every block ever taken from the pools plus the fp16 windows of open sequences.
    std::size_t allocated_bytes() const {
      std::size_t b = 0;
      for (const auto& s : base_) b += s.allocated_bytes();
      for (const auto& s : delta_) b += s.allocated_bytes();
      for (const Seq& q : seqs_)
        for (const auto& r : q.ring) b += r.size() * sizeof(std::uint16_t);
      return b;
    }
    /// Working memory that is not cache: the running and chunk accumulators of every sequence and
    /// the scratch rows (floats, as currently sized).
    std::size_t working_bytes() const {
      std::size_t f = scratch_.capacity() + tmp_.capacity() + out_.capacity();
      for (const Seq& q : seqs_) f += q.run.rows.capacity() + q.chunk.rows.capacity();
      return f * sizeof(float);
    }

    /// Snapshot hooks. The payload: each layer's stream record in layer order, then one record
    ///   u32 tag "XQCL"; per layer: i64 length, u8 sealed, the fp16 rows (cached width) of its
    ///   window tokens, oldest first; the chunk accumulator: i64 layer+1 (0: none), i64 begin,
    ///   i64 end, and its (end − begin) × d fp32 rows when a later layer may still use them
    ///   (layer < L−1); the running accumulator: i64 layer+1, i64 end, its end × d fp32 rows.
    void save(std::size_t seq, snapshot::Writer& w) const {
      for (int l = 0; l < L_; ++l) visit(l, [&](const auto& s) { s.save(seq, w); });
      const Seq& q = seqs_[seq];
      w.u32(kRecordTag);
      for (int l = 0; l < L_; ++l) {
        w.i64(q.length[l]);
        w.u8(q.sealed[l] ? 1 : 0);
        for (index_t t = committed(seq, l); t < q.length[l]; ++t)
          w.u16s(q.ring[l].data() + (t % window_) * r_, static_cast<std::size_t>(r_));
      }
      w.i64(q.chunk.layer + 1);
      w.i64(q.chunk.begin);
      w.i64(q.chunk.end);
      if (chunk_rows_saved(q.chunk.layer))
        w.f32s(q.chunk.rows.data(), static_cast<std::size_t>((q.chunk.end - q.chunk.begin) * d_));
      w.i64(q.run.layer + 1);
      w.i64(q.run.end);
      if (q.run.layer >= 0) w.f32s(q.run.rows.data(), static_cast<std::size_t>(q.run.end * d_));
    }
    /// Reads what save() wrote into `seq` (open and empty). SnapshotError on a record that does
    /// not fit the streams (lengths, flags, accumulator ranges) or holds a non-finite value.
    void load(std::size_t seq, snapshot::Reader& r) {
      for (int l = 0; l < L_; ++l) visit(l, [&](auto& s) { s.load(seq, r); });
      Seq& q = seqs_[seq];
      if (r.u32("cross-layer record tag") != kRecordTag)
        r.fail("cross-layer record tag", ": not the start of a cross-layer record");
      for (int l = 0; l < L_; ++l) {
        const index_t c = committed(seq, l);
        const bool stream_sealed = visit(l, [&](const auto& s) { return s.sealed(seq); });
        const index_t len = r.count("layer length", c, c + window_);
        const bool sealed = r.flag("layer sealed flag");
        if (sealed != stream_sealed || (sealed && len != c))
          r.fail("layer sealed flag", ": layer ", l, " is ", sealed ? "" : "not ", "sealed but its stream is ",
                 stream_sealed ? "" : "not ", "sealed and ", len - c, " tokens wait in its window");
        for (index_t t = c; t < len; ++t) {
          std::uint16_t* h = q.ring[l].data() + (t % window_) * r_;
          r.u16s("window tokens", h, static_cast<std::size_t>(r_));
          for (index_t j = 0; j < r_; ++j)
            if (!half_is_finite(h[j])) r.fail("window tokens", ": a waiting value is not finite");
        }
        q.length[l] = len;
        q.sealed[l] = sealed;
      }
      // Accumulators: X̂ of a layer ≥ base_layers−1 (the ones that seed or carry deltas).
      const int chunk_layer = static_cast<int>(r.count("chunk accumulator layer", 0, L_)) - 1;
      if (chunk_layer >= 0 && chunk_layer < b_ - 1)
        r.fail("chunk accumulator layer", ": layer ", chunk_layer, " is below the seed layer ", b_ - 1);
      // It holds the tokens its layer committed last: [begin, end) with end its committed count.
      const index_t cc = chunk_layer < 0 ? 0 : committed(seq, chunk_layer);
      const index_t begin = r.count("chunk accumulator begin", 0, cc);
      const index_t end = r.count("chunk accumulator end", cc, cc);
      if (chunk_layer >= 0 && begin == end) r.fail("chunk accumulator begin", ": the accumulator holds no tokens");
      if (chunk_rows_saved(chunk_layer)) {
        const index_t n = end - begin;
        r.need("chunk accumulator rows", static_cast<std::size_t>(n * d_) * sizeof(float));
        q.chunk.rows.resize(static_cast<std::size_t>(n * d_));
        r.f32s("chunk accumulator rows", q.chunk.rows.data(), q.chunk.rows.size());
      }
      q.chunk.layer = chunk_layer;
      q.chunk.begin = begin;
      q.chunk.end = end;
      const int run_layer = static_cast<int>(r.count("running accumulator layer", 0, L_)) - 1;
      if (run_layer >= 0 && run_layer < b_ - 1)
        r.fail("running accumulator layer", ": layer ", run_layer, " is below the seed layer ", b_ - 1);
      const index_t run_end = r.count("running accumulator end", 0, run_layer < 0 ? 0 : committed(seq, run_layer));
      if (run_layer >= 0) {
        r.need("running accumulator rows", static_cast<std::size_t>(run_end * d_) * sizeof(float));
        q.run.rows.resize(static_cast<std::size_t>(run_end * d_));
        r.f32s("running accumulator rows", q.run.rows.data(), q.run.rows.size());
      }
      q.run.layer = run_layer;
      q.run.end = run_end;
    }
    /// Makes `dst` (open and empty) a copy of `src`: streams, windows and both accumulators.
    void fork(std::size_t src, std::size_t dst) {
      require<Error>(src != dst, "fork: source and destination are both sequence ", src);
      for (int l = 0; l < L_; ++l) visit(l, [&](auto& s) { s.fork(src, dst); });
      seqs_[dst] = seqs_[src];
    }
    /// Snapshot description of what the state derived at construction: the latent variant's
    /// fingerprint of its SVD bases (empty for plain XQuant-CL).
    const std::string& describe() const { return description_; }

    int base_layers() const { return b_; }
    /// Width of the cached rows: d, or the rank of [Wk|Wv] in the latent variant.
    index_t cached_width() const { return r_; }
    /// Latent variant: the SVD factors of layer `layer`'s [Wk|Wv].
    const svd::Factors& basis(int layer) const { return basis_.at(static_cast<std::size_t>(layer)); }
    const BaseStream& base_stream(int layer) const { return base_.at(static_cast<std::size_t>(layer)); }
    const DeltaStream& delta_stream(int layer) const { return delta_.at(static_cast<std::size_t>(layer - b_)); }

   private:
    /// X̂ of some layer for tokens [begin, end) (row-major, d wide).
    struct Acc {
      int layer = -1;
      index_t begin = 0, end = 0;
      std::vector<float> rows;
    };
    struct Seq {
      bool open = false;
      std::vector<index_t> length;
      std::vector<bool> sealed;
      std::vector<std::vector<std::uint16_t>> ring;  // per layer: window × r fp16, token t at t % window
      Acc chunk;  // X̂ of the tokens the latest append committed, for the next layer's delta
      Acc run;    // X̂ of tokens [0, end) of one layer, for attention (begin is always 0)
    };
    static constexpr std::uint32_t kRecordTag = 0x4c435158u;  // "XQCL" little-endian

    // Rows of a chunk accumulator that a later append may still read (layer L−1 has no successor).
    bool chunk_rows_saved(int layer) const { return layer >= 0 && layer < L_ - 1; }

    template <class F>
    decltype(auto) visit(int layer, F&& f) {
      if (layer < b_) return f(base_[static_cast<std::size_t>(layer)]);
      return f(delta_[static_cast<std::size_t>(layer - b_)]);
    }
    template <class F>
    decltype(auto) visit(int layer, F&& f) const {
      if (layer < b_) return f(base_[static_cast<std::size_t>(layer)]);
      return f(delta_[static_cast<std::size_t>(layer - b_)]);
    }

    static void grow(std::vector<float>& v, index_t n) {
      if (static_cast<index_t>(v.size()) < n) v.resize(static_cast<std::size_t>(n));
    }

    // out (n × r) = x·U (latent) or x (n × d rows, stride ldx).
    void to_cached(int layer, const float* x, index_t n, index_t ldx, float* out) {
      if constexpr (InLatent) {
        const svd::Factors& f = basis_[static_cast<std::size_t>(layer)];
        LA::project(RowsView{x, n, d_, ldx}, Projection{f.basis_t.data(), r_, d_, nullptr}, out, r_);
      } else {
        for (index_t t = 0; t < n; ++t) std::copy(x + t * ldx, x + t * ldx + d_, out + t * r_);
      }
    }
    // out (n × d, stride d) = (or +=) cached·Uᵀ (latent) or cached, for n rows of r values.
    void from_cached(int layer, const float* cached, index_t n, float* out, bool accumulate) {
      const float* src = cached;
      if constexpr (InLatent) {
        const svd::Factors& f = basis_[static_cast<std::size_t>(layer)];
        float* dst = out;
        if (accumulate) {
          grow(tmp_, n * d_);
          dst = tmp_.data();
        }
        LA::gemm_nn(n, d_, r_, cached, r_, f.basis_t.data(), d_, dst, d_);
        if (!accumulate) return;
        src = dst;
      }
      if (accumulate) add_into(out, src, n * d_);
      else std::copy(src, src + n * d_, out);
    }
    static void add_into(float* out, const float* in, index_t n) {
      ::Eigen::Map<::Eigen::ArrayXf>(out, n) += ::Eigen::Map<const ::Eigen::ArrayXf>(in, n);
    }
    // out (+)= X̂ contribution of the stored rows [r0, r1) of `layer` (base value or delta).
    void add_stored(std::size_t seq, int layer, index_t r0, index_t r1, float* out, bool accumulate) {
      const index_t n = r1 - r0;
      if (n == 0) return;
      grow(scratch_, n * r_);
      visit(layer, [&](const auto& s) { s.dequantize(seq, r0, r1, scratch_.data(), r_); });
      from_cached(layer, scratch_.data(), n, out, accumulate);
    }

    // Appends n tokens of `layer` to the window, committing all but the newest `keep` of the
    // layer's tokens to its stream. Stores nothing if it throws.
    void commit(std::size_t seq, int layer, const float* x, index_t n, index_t ld, index_t keep) {
      Seq& q = seqs_[seq];
      const index_t len = q.length[layer], c0 = committed(seq, layer), total = len + n;
      const index_t c1 = std::max(c0, total - keep), m = c1 - c0;
      // The new tokens in the cached space; fp16 when they pass through a window.
      std::vector<float>& fresh = out_;
      grow(fresh, n * r_);
      if (n > 0) to_cached(layer, x, n, ld, fresh.data());
      if (window_ > 0) {
        codec::detail::require_fp16_range(fresh.data(), n * r_);
        round_floats_to_half(fresh.data(), static_cast<std::size_t>(n * r_));
      }
      if (m > 0) {
        const bool delta = layer >= b_;
        if (delta && !(q.chunk.layer == layer - 1 && q.chunk.begin == c0 && q.chunk.end == c1))
          throw Error(xquant::detail::concat(
              "XQuant-CL call order: layer ", layer, " of sequence ", seq, " commits tokens [", c0, ", ", c1,
              ") and needs layer ", layer - 1, "'s reconstruction of exactly those tokens, but the latest append held ",
              q.chunk.layer < 0 ? std::string("none")
                                : xquant::detail::concat("layer ", q.chunk.layer, ", tokens [", q.chunk.begin, ", ", q.chunk.end, ")"),
              "; append (and seal) layers 0..L-1 in order for every chunk"));
        grow(tmp_, m * r_);  // the rows to store, in the cached space
        float* rows = tmp_.data();
        for (index_t t = c0; t < c1; ++t) {
          float* dst = rows + (t - c0) * r_;
          if (t < len) {
            halves_to_floats(q.ring[layer].data() + (t % window_) * r_, dst, static_cast<std::size_t>(r_));
          } else {
            std::copy(fresh.data() + (t - len) * r_, fresh.data() + (t - len + 1) * r_, dst);
          }
        }
        if (delta) {  // rows −= X̂_{i−1}·U (or X̂_{i−1}) of the same tokens
          grow(scratch_, m * r_);
          to_cached(layer, q.chunk.rows.data(), m, d_, scratch_.data());
          ::Eigen::Map<::Eigen::ArrayXf>(rows, m * r_) -= ::Eigen::Map<const ::Eigen::ArrayXf>(scratch_.data(), m * r_);
        }
        visit(layer, [&](auto& s) { s.append(seq, rows, m, r_); });  // CapacityError leaves it unchanged
        if (layer >= b_ - 1) {  // X̂_i of the committed tokens, for layer i+1
          grow(q.chunk.rows, m * d_);
          add_stored(seq, layer, c0, c1, q.chunk.rows.data(), delta);
          q.chunk.layer = layer;
          q.chunk.begin = c0;
          q.chunk.end = c1;
        }
      }
      for (index_t t = std::max(len, c1); t < total; ++t) {
        floats_to_halves(fresh.data() + (t - len) * r_, q.ring[layer].data() + (t % window_) * r_,
                         static_cast<std::size_t>(r_));
      }
      q.length[layer] = total;
    }

    // Rows [r0, r1) of the run accumulator := X̂_layer, rebuilt from the base layer.
    void rebuild(std::size_t seq, int layer, index_t r0, index_t r1) {
      Seq& q = seqs_[seq];
      grow(q.run.rows, r1 * d_);
      float* out = q.run.rows.data() + r0 * d_;
      add_stored(seq, b_ - 1, r0, r1, out, false);
      for (int j = b_; j <= layer; ++j) add_stored(seq, j, r0, r1, out, true);
    }

    // Brings the run accumulator to X̂_layer over at least the committed tokens [0, need).
    void ensure_run(std::size_t seq, int layer, index_t need) {
      Acc& run = seqs_[seq].run;
      const index_t c = committed(seq, layer);
      if (run.layer == layer && run.end >= need) return;
      if (run.layer == layer - 1 && layer >= b_) {  // visited in order: one delta per layer
        const index_t m = std::min(run.end, c);
        add_stored(seq, layer, 0, m, run.rows.data(), true);
        run.layer = layer;
        run.end = m;
        if (m >= need) return;
      }
      const index_t from = run.layer == layer ? run.end : 0;
      rebuild(seq, layer, from, c);
      run.layer = layer;
      run.end = c;
    }

    // X̂ of tokens [begin, end) of `layer` as rows (valid until the next call).
    RowsView reconstruct(std::size_t seq, int layer, index_t begin, index_t end) {
      Seq& q = seqs_[seq];
      const index_t c = committed(seq, layer), qend = std::min(end, c);
      float* rows = nullptr;  // row t of X̂ (begin <= t < end) lives at rows + (t - begin)·d
      if (layer < b_ - 1) {   // plain layer below the seed: no accumulator involved
        grow(out_, (end - begin) * d_);
        rows = out_.data();
        add_stored(seq, layer, begin, std::max(begin, qend), rows, false);
      } else {
        ensure_run(seq, layer, qend);
        grow(q.run.rows, end * d_);  // rows past run.end are scratch for the window tokens
        rows = q.run.rows.data() + begin * d_;
      }
      const index_t w0 = std::max(begin, c);
      if (w0 < end) {  // window tokens: themselves, in fp16
        grow(scratch_, (end - w0) * r_);
        for (index_t t = w0; t < end; ++t)
          halves_to_floats(q.ring[layer].data() + (t % window_) * r_, scratch_.data() + (t - w0) * r_,
                           static_cast<std::size_t>(r_));
        from_cached(layer, scratch_.data(), end - w0, rows + (w0 - begin) * d_, false);
      }
      return RowsView{rows, end - begin, d_, d_};
    }

    CacheConfig config_;
    int L_, b_;
    index_t d_, r_ = 0, window_;
    std::vector<svd::Factors> basis_;
    std::vector<BaseStream> base_;
    std::vector<DeltaStream> delta_;
    std::vector<Seq> seqs_;
    std::vector<float> scratch_, tmp_, out_;
    std::string description_;
  };
};

/// XQuant-CL: layer i caches Q(X_i − X̂_{i−1}); the first `base_layers` (default 3) are cached
/// plainly with BaseQ (default 4-bit per token).
template <class DeltaQ, class BaseQ = quant::Uniform<4, Axis::Token>>
using CrossLayer = CrossLayerCodec<DeltaQ, BaseQ, false>;

/// GQA-CL: SVD of each layer's [Wk|Wv] (Ukv: d × r, r = min(d, 2·dkv)); layer i caches
/// Q((X_i − X̂_{i−1})·Ukv_i) (r wide); base layers cache Q(X_i·Ukv_i). Needs `weights`.
template <class DeltaQ, class BaseQ = quant::Uniform<4, Axis::Token>>
using LatentCrossLayer = CrossLayerCodec<DeltaQ, BaseQ, true>;

}  // namespace xquant::codec
