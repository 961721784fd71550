// Writes the seed corpus of the fuzz targets: fuzz_make_corpus <dir> creates <dir>/<target>/...
// Deterministic, so the committed corpus can be regenerated (fuzz/corpus/ in the repo).
#include <xquant/xquant.hpp>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "snapshot_setup.hpp"

namespace xq = xquant;
using Bytes = std::vector<std::uint8_t>;

namespace {

void write(const std::string& path, const Bytes& b) {
  std::FILE* f = std::fopen(path.c_str(), "wb");
  if (!f || std::fwrite(b.data(), 1, b.size(), f) != b.size()) {
    std::fprintf(stderr, "cannot write %s\n", path.c_str());
    std::exit(1);
  }
  std::fclose(f);
}
void put32(Bytes& b, std::uint32_t v) {
  for (int i = 0; i < 4; ++i) b.push_back(static_cast<std::uint8_t>(v >> (8 * i)));
}
void putf(Bytes& b, float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, 4);
  put32(b, u);
}

template <class Codec>
void snapshots(const std::string& dir, int selector, const Codec& codec, std::mt19937& g) {
  std::normal_distribution<float> n(0.0f, 1.0f);
  const int lengths[][2] = {{0, 0}, {5, 3}, {19, 19}, {37, 12}};
  int k = 0;
  for (const auto& len : lengths)
    for (bool seal : {false, true}) {
      xq::Cache<Codec> c(fuzzsetup::snapshot_config(), codec);
      const auto s = c.add_sequence();
      for (int l = 0; l < 2; ++l) {
        std::vector<float> x(static_cast<std::size_t>(len[l] * c.config().width));
        for (float& v : x) v = n(g);
        c.append(s, l, x.data(), len[l]);
      }
      if (seal) c.seal(s, 0);
      const Bytes snap = c.snapshot(s);
      for (int fix : {0, 4}) {
        Bytes b{static_cast<std::uint8_t>(selector | fix)};
        b.insert(b.end(), snap.begin(), snap.end());
        write(dir + "/snapshot/seed_" + std::to_string(selector) + "_" + std::to_string(k++), b);
      }
    }
}

// A llama2.c checkpoint with the given header and small random weights.
Bytes checkpoint(int dim, int hidden, int layers, int heads, int kv_heads, int vocab, int seq_len, std::mt19937& g) {
  Bytes b;
  for (int v : {dim, hidden, layers, heads, kv_heads, vocab, seq_len}) put32(b, static_cast<std::uint32_t>(v));
  const long V = vocab < 0 ? -vocab : vocab, D = dim, H = hidden, L = layers, KV = kv_heads * (dim / heads),
             HS = dim / heads, S = seq_len;
  const long floats = V * D + L * D + L * D * D + 2 * L * KV * D + L * D * D + L * D + 3 * L * H * D + D +
                      S * HS + (vocab < 0 ? V * D : 0);
  std::normal_distribution<float> n(0.0f, 0.1f);
  for (long i = 0; i < floats; ++i) putf(b, n(g));
  return b;
}

// A llama2.c tokenizer: <unk>, <s>, </s>, the 256 byte tokens, then a few merges.
Bytes tokenizer() {
  std::vector<std::string> pieces{"<unk>", "\n<s>\n", "\n</s>\n"};
  for (int c = 0; c < 256; ++c) {
    char buf[8];
    std::snprintf(buf, sizeof buf, "<0x%02X>", c);
    pieces.push_back(buf);
  }
  for (const char* p : {" ", "a", "b", "e", "h", "t", "o", "n", "ce", "th", "the", " the", "on", " on", "ce ", "once",
                        " once", "\xc3\xa9"})
    pieces.push_back(p);
  Bytes b;
  put32(b, 8);
  for (std::size_t i = 0; i < pieces.size(); ++i) {
    putf(b, i < 259 ? 0.0f : -static_cast<float>(i % 7));
    put32(b, static_cast<std::uint32_t>(pieces[i].size()));
    b.insert(b.end(), pieces[i].begin(), pieces[i].end());
  }
  return b;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: fuzz_make_corpus <corpus dir with quantize/ snapshot/ checkpoint/ tokenizer/>\n");
    return 2;
  }
  const std::string dir = argv[1];
  std::mt19937 g(20250811);

  snapshots(dir, 0, fuzzsetup::token_codec(), g);
  snapshots(dir, 1, fuzzsetup::channel_codec(), g);
  snapshots(dir, 2, fuzzsetup::half_codec(), g);

  // fuzz_quantize reads its input as a stream of choices: any bytes are valid. One seed per
  // quantizer (first byte), with random bytes behind it.
  for (int q = 0; q < 13; ++q) {
    Bytes b{static_cast<std::uint8_t>(q)};
    std::uniform_int_distribution<int> byte(0, 255);
    for (int i = 0; i < 600; ++i) b.push_back(static_cast<std::uint8_t>(byte(g)));
    write(dir + "/quantize/seed_" + std::to_string(q), b);
  }

  write(dir + "/checkpoint/tied", checkpoint(8, 16, 2, 2, 1, 12, 4, g));
  write(dir + "/checkpoint/untied", checkpoint(8, 12, 1, 4, 4, -10, 3, g));
  Bytes cut = checkpoint(4, 8, 1, 2, 2, 6, 2, g);
  cut.resize(cut.size() - 6);
  write(dir + "/checkpoint/truncated", cut);

  // fuzz_tokenizer input: u16 text length, the text, then the tokenizer file.
  const Bytes tok = tokenizer();
  const char* texts[] = {"", "once the", "Once upon a time, the one", "caf\xc3\xa9 \xf0\x9f\x98\x80 \xff\xfe x"};
  int k = 0;
  for (const char* t : texts) {
    const std::size_t n = std::strlen(t);
    Bytes b{static_cast<std::uint8_t>(n), static_cast<std::uint8_t>(n >> 8)};
    b.insert(b.end(), t, t + n);
    b.insert(b.end(), tok.begin(), tok.end());
    write(dir + "/tokenizer/seed_" + std::to_string(k++), b);
  }
  return 0;
}
