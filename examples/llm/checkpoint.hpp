// checkpoint.hpp — load a llama2.c "legacy" (version 0) fp32 checkpoint into memory.
//
// File layout (all little-endian):
//   int32 dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, seq_len
//   (vocab_size < 0 means the classifier is NOT tied to the embedding: wcls is stored at the end)
//   fp32 token_embedding (vocab×dim), rms_att (L×dim), wq (L×dim×dim), wk (L×kv_dim×dim),
//        wv (L×kv_dim×dim), wo (L×dim×dim), rms_ffn (L×dim), w1 (L×hidden×dim),
//        w2 (L×dim×hidden), w3 (L×hidden×dim), rms_final (dim),
//        freq_cis_real (seq_len×head_size/2), freq_cis_imag (same), [wcls (vocab×dim) if untied]
// Every matrix is row-major out×in (the nn.Linear layout), so y = W x is a row-times-vector product.
//
// The whole file is read into one std::vector<float>; the tensors are raw pointers into it. The
// Eigen views live in model.hpp so that this header has no dependency besides the standard library.
// Everything that could make later code index out of bounds is validated here, with a message that
// names the offending field and what was expected, because these files come from the outside.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <string>
#include <vector>
#include <stdexcept>

namespace llm {

struct Config {
  int dim = 0;         // residual stream width
  int hidden_dim = 0;  // FFN width
  int n_layers = 0;
  int n_heads = 0;     // query heads
  int n_kv_heads = 0;  // key/value heads (GQA when < n_heads)
  int vocab_size = 0;  // always positive here; see shared_classifier
  int seq_len = 0;     // maximum context (and the ppl window length)
  bool shared_classifier = true;  // header vocab_size > 0: classifier == token embedding

  int head_size() const { return dim / n_heads; }
  int kv_dim() const { return n_kv_heads * head_size(); }
  int kv_mul() const { return n_heads / n_kv_heads; }  // query heads per KV head
};

// Raw pointers into Checkpoint::data for one transformer block.
struct LayerTensors {
  const float* rms_att;  // dim
  const float* wq;       // dim × dim
  const float* wk;       // kv_dim × dim
  const float* wv;       // kv_dim × dim
  const float* wo;       // dim × dim
  const float* rms_ffn;  // dim
  const float* w1;       // hidden × dim
  const float* w2;       // dim × hidden
  const float* w3;       // hidden × dim
};

struct Checkpoint {
  Config config;
  std::vector<float> data;  // every fp32 value of the file after the header
  const float* token_embedding = nullptr;  // vocab × dim
  std::vector<LayerTensors> layers;
  const float* rms_final = nullptr;        // dim
  const float* wcls = nullptr;             // vocab × dim (== token_embedding when shared)
  std::int64_t n_params = 0;               // parameters actually used (excludes freq_cis tables)

  Checkpoint() = default;
  // The pointers point into `data`; a moved vector keeps its buffer, a copied one does not.
  Checkpoint(const Checkpoint&) = delete;
  Checkpoint& operator=(const Checkpoint&) = delete;
  Checkpoint(Checkpoint&&) = default;
  Checkpoint& operator=(Checkpoint&&) = default;
};

namespace detail {

[[noreturn]] inline void ckpt_fail(const std::string& path, const std::string& msg) {
  throw std::runtime_error("checkpoint " + path + ": " + msg);
}

// Header fields are capped so that every size computed below fits comfortably in 64 bits and a
// garbage header is rejected before any allocation.
inline void check_field(const std::string& path, const char* name, std::int64_t v, std::int64_t max) {
  if (v <= 0 || v > max)
    ckpt_fail(path, std::string("header field ") + name + " = " + std::to_string(v) +
                        ", expected 1.." + std::to_string(max));
}

}  // namespace detail

inline Checkpoint load_checkpoint(const std::string& path) {
  static_assert(sizeof(float) == 4, "fp32 checkpoints need 4-byte float");
  {
    const std::uint32_t one = 1;
    unsigned char b;
    std::memcpy(&b, &one, 1);
    if (b != 1) detail::ckpt_fail(path, "big-endian hosts are not supported");
  }
  std::ifstream f(path, std::ios::binary);
  if (!f) detail::ckpt_fail(path, "cannot open file");
  f.seekg(0, std::ios::end);
  const std::streamoff file_size = f.tellg();
  f.seekg(0, std::ios::beg);
  if (file_size < 0) detail::ckpt_fail(path, "cannot determine file size");

  constexpr std::int64_t kHeaderBytes = 7 * 4;
  if (file_size < kHeaderBytes)
    detail::ckpt_fail(path, "file is " + std::to_string(file_size) + " bytes, shorter than the " +
                                std::to_string(kHeaderBytes) + "-byte header");
  std::int32_t h[7];
  f.read(reinterpret_cast<char*>(h), sizeof h);
  if (f.gcount() != static_cast<std::streamsize>(sizeof h)) detail::ckpt_fail(path, "cannot read header");

  Checkpoint ck;
  Config& c = ck.config;
  c.dim = h[0];
  c.hidden_dim = h[1];
  c.n_layers = h[2];
  c.n_heads = h[3];
  c.n_kv_heads = h[4];
  c.shared_classifier = h[5] > 0;
  // |INT32_MIN| does not fit in int32; the cap below rejects it anyway.
  const std::int64_t vocab64 = h[5] < 0 ? -static_cast<std::int64_t>(h[5]) : h[5];
  c.seq_len = h[6];

  detail::check_field(path, "dim", c.dim, 65536);
  detail::check_field(path, "hidden_dim", c.hidden_dim, 1 << 20);
  detail::check_field(path, "n_layers", c.n_layers, 1024);
  detail::check_field(path, "n_heads", c.n_heads, 4096);
  detail::check_field(path, "n_kv_heads", c.n_kv_heads, 4096);
  detail::check_field(path, "|vocab_size|", vocab64, 1 << 20);
  detail::check_field(path, "seq_len", c.seq_len, 1 << 20);
  c.vocab_size = static_cast<int>(vocab64);
  if (c.dim % c.n_heads != 0)
    detail::ckpt_fail(path, "dim = " + std::to_string(c.dim) + " is not a multiple of n_heads = " +
                                std::to_string(c.n_heads));
  if (c.n_heads % c.n_kv_heads != 0)
    detail::ckpt_fail(path, "n_heads = " + std::to_string(c.n_heads) +
                                " is not a multiple of n_kv_heads = " + std::to_string(c.n_kv_heads));
  if (c.head_size() % 2 != 0)
    detail::ckpt_fail(path, "head_size = dim/n_heads = " + std::to_string(c.head_size()) +
                                ", expected an even number (RoPE rotates pairs)");

  // Expected tensor sizes, in floats, in file order. All products are < 2^50 given the caps.
  const std::int64_t D = c.dim, H = c.hidden_dim, L = c.n_layers, V = c.vocab_size;
  const std::int64_t KV = c.kv_dim(), S = c.seq_len, HS = c.head_size();
  struct Part { const char* name; std::int64_t n; };
  const Part parts[] = {
      {"token_embedding", V * D}, {"rms_att", L * D},      {"wq", L * D * D},
      {"wk", L * KV * D},         {"wv", L * KV * D},      {"wo", L * D * D},
      {"rms_ffn", L * D},         {"w1", L * H * D},       {"w2", L * D * H},
      {"w3", L * H * D},          {"rms_final", D},        {"freq_cis_real", S * HS / 2},
      {"freq_cis_imag", S * HS / 2}, {"wcls", c.shared_classifier ? 0 : V * D},
  };
  std::int64_t n_floats = 0;
  for (const Part& p : parts) n_floats += p.n;
  const std::int64_t expected_bytes = kHeaderBytes + 4 * n_floats;
  if (file_size != expected_bytes) {
    detail::ckpt_fail(path, std::string(file_size < expected_bytes ? "truncated" : "oversized") +
                                ": file is " + std::to_string(file_size) + " bytes, expected exactly " +
                                std::to_string(expected_bytes) + " (28-byte header + " +
                                std::to_string(n_floats) + " fp32 values for dim=" +
                                std::to_string(c.dim) + " hidden_dim=" + std::to_string(c.hidden_dim) +
                                " n_layers=" + std::to_string(c.n_layers) + " n_heads=" +
                                std::to_string(c.n_heads) + " n_kv_heads=" + std::to_string(c.n_kv_heads) +
                                " vocab_size=" + std::to_string(h[5]) + " seq_len=" +
                                std::to_string(c.seq_len) + ")");
  }

  ck.data.resize(static_cast<std::size_t>(n_floats));
  f.read(reinterpret_cast<char*>(ck.data.data()), static_cast<std::streamsize>(4 * n_floats));
  if (f.gcount() != static_cast<std::streamsize>(4 * n_floats))
    detail::ckpt_fail(path, "short read (" + std::to_string(f.gcount()) + " of " +
                                std::to_string(4 * n_floats) + " tensor bytes)");

  // Reject NaN/Inf anywhere (including the unused freq_cis tables: a file with them is damaged).
  {
    std::int64_t off = 0;
    for (const Part& p : parts) {
      for (std::int64_t i = 0; i < p.n; ++i)
        if (!std::isfinite(ck.data[static_cast<std::size_t>(off + i)]))
          detail::ckpt_fail(path, std::string("non-finite value (NaN/Inf) in tensor ") + p.name +
                                      " at element " + std::to_string(i));
      off += p.n;
    }
  }

  const float* p = ck.data.data();
  auto take = [&p](std::int64_t n) { const float* q = p; p += n; return q; };
  ck.token_embedding = take(V * D);
  ck.layers.resize(static_cast<std::size_t>(L));
  for (auto& l : ck.layers) l.rms_att = take(D);
  for (auto& l : ck.layers) l.wq = take(D * D);
  for (auto& l : ck.layers) l.wk = take(KV * D);
  for (auto& l : ck.layers) l.wv = take(KV * D);
  for (auto& l : ck.layers) l.wo = take(D * D);
  for (auto& l : ck.layers) l.rms_ffn = take(D);
  for (auto& l : ck.layers) l.w1 = take(H * D);
  for (auto& l : ck.layers) l.w2 = take(D * H);
  for (auto& l : ck.layers) l.w3 = take(H * D);
  ck.rms_final = take(D);
  take(S * HS / 2);  // freq_cis_real: RoPE is recomputed (xquant::Rope), as run.c does
  take(S * HS / 2);  // freq_cis_imag
  ck.wcls = c.shared_classifier ? ck.token_embedding : take(V * D);
  ck.n_params = n_floats - S * HS;
  return ck;
}

}  // namespace llm
