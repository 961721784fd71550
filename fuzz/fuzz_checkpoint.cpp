// Fuzz target: the llama2.c checkpoint loader (examples/llm/checkpoint.hpp) on arbitrary bytes.
// Oracle: a clear error (std::runtime_error) or a checkpoint whose tensors all lie inside its data
// and hold finite values.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>

#include "llm/checkpoint.hpp"
#include "temp_file.hpp"

namespace {
[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "fuzz_checkpoint: oracle violated: %s\n", what);
  std::abort();
}
#define XQ_CHECK(cond)      \
  do {                      \
    if (!(cond)) die(#cond); \
  } while (0)

void inside(const llm::Checkpoint& ck, const float* p, std::int64_t n) {
  XQ_CHECK(p != nullptr);
  XQ_CHECK(p >= ck.data.data() && p + n <= ck.data.data() + ck.data.size());
  for (std::int64_t i = 0; i < n; ++i) XQ_CHECK(std::isfinite(p[i]));
}
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  const std::string& path = fuzzsetup::temp_path("checkpoint");
  fuzzsetup::write_file(path, data, size);
  llm::Checkpoint ck;
  try {
    ck = llm::load_checkpoint(path);
  } catch (const std::runtime_error&) {
    return 0;
  }
  const llm::Config& c = ck.config;
  XQ_CHECK(c.dim > 0 && c.hidden_dim > 0 && c.n_layers > 0 && c.n_heads > 0 && c.n_kv_heads > 0);
  XQ_CHECK(c.vocab_size > 0 && c.seq_len > 0 && c.dim % c.n_heads == 0 && c.n_heads % c.n_kv_heads == 0);
  XQ_CHECK(static_cast<int>(ck.layers.size()) == c.n_layers);
  const std::int64_t D = c.dim, H = c.hidden_dim, KV = c.kv_dim();
  inside(ck, ck.token_embedding, c.vocab_size * D);
  inside(ck, ck.wcls, c.vocab_size * D);
  inside(ck, ck.rms_final, D);
  for (const auto& l : ck.layers) {
    inside(ck, l.rms_att, D);
    inside(ck, l.wq, D * D);
    inside(ck, l.wk, KV * D);
    inside(ck, l.wv, KV * D);
    inside(ck, l.wo, D * D);
    inside(ck, l.rms_ffn, D);
    inside(ck, l.w1, H * D);
    inside(ck, l.w2, D * H);
    inside(ck, l.w3, H * D);
  }
  return 0;
}
