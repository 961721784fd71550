// Fuzz target: the llama2.c tokenizer loader and encoder (examples/llm/tokenizer.hpp). Input: u16
// text length (little-endian), the text, then the tokenizer file's bytes.
// Oracle: a clear error (std::runtime_error) or a tokenizer whose encoding of the text has every id
// in range, starts with BOS, and decodes token by token without fault.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>

#include "llm/tokenizer.hpp"
#include "temp_file.hpp"

namespace {
[[noreturn]] void die(const char* what) {
  std::fprintf(stderr, "fuzz_tokenizer: oracle violated: %s\n", what);
  std::abort();
}
#define XQ_CHECK(cond)      \
  do {                      \
    if (!(cond)) die(#cond); \
  } while (0)
}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const std::uint8_t* data, std::size_t size) {
  if (size < 2) return 0;
  std::size_t n = data[0] | static_cast<std::size_t>(data[1]) << 8;
  n = n < size - 2 ? n : size - 2;
  const std::string text(reinterpret_cast<const char*>(data + 2), n);
  const std::string& path = fuzzsetup::temp_path("tokenizer");
  fuzzsetup::write_file(path, data + 2 + n, size - 2 - n);
  try {
    const llm::Tokenizer tok(path);
    const auto ids = tok.encode(text, true);
    XQ_CHECK(!ids.empty() && ids[0] == llm::Tokenizer::kBos);
    XQ_CHECK(ids.size() <= text.size() + 2);
    int prev = llm::Tokenizer::kBos;
    for (int id : ids) {
      XQ_CHECK(id >= 0 && id < tok.vocab_size());
      (void)tok.decode(prev, id);
      prev = id;
    }
  } catch (const std::runtime_error&) {
  }
  return 0;
}
