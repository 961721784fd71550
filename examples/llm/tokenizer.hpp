// tokenizer.hpp — llama2.c's tokenizer (tokenizer.bin format, run.c encode()/decode()).
//
// File layout: uint32 max_token_length, then for each token: float32 score, int32 length, bytes.
// The file stores no token count: it is read to its end and the count must equal the model's
// vocab_size.
//
// encode() reproduces run.c exactly — optional BOS (id 1), a dummy-space token when the text is
// non-empty, UTF-8 codepoints looked up as tokens (bytes of unknown codepoints become id byte+3),
// then repeatedly merge the adjacent pair whose concatenation is a token with the highest score,
// the leftmost pair on ties — but in O(n log n) instead of run.c's O(n^2) rescans, using a heap of
// candidate pairs over a linked list. Ties are resolved by the original position of the left
// token, which is the same as "leftmost in the current sequence" because merging keeps order.
#pragma once

#include <cstdint>
#include <cstring>
#include <fstream>
#include <iterator>
#include <queue>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace llm {

class Tokenizer {
 public:
  static constexpr int kBos = 1;
  static constexpr int kEos = 2;

  // expected_vocab_size <= 0 accepts any count (e.g. for tokenize-only use without a model).
  explicit Tokenizer(const std::string& path, int expected_vocab_size = 0) {
    std::ifstream f(path, std::ios::binary);
    if (!f) fail(path, "cannot open file");
    const std::string buf((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    std::size_t off = 0;
    auto need = [&](std::size_t n, const std::string& what) {
      if (buf.size() - off < n)
        fail(path, "truncated: " + what + " needs " + std::to_string(n) + " bytes at offset " +
                       std::to_string(off) + " but the file is " + std::to_string(buf.size()) +
                       " bytes (token " + std::to_string(pieces_.size()) + ")");
    };
    need(4, "max_token_length");
    std::uint32_t mtl;
    std::memcpy(&mtl, buf.data(), 4);
    off = 4;
    if (mtl == 0 || mtl > 4096)
      fail(path, "max_token_length = " + std::to_string(mtl) + ", expected 1..4096");
    max_token_length_ = static_cast<int>(mtl);
    while (off < buf.size()) {
      if (pieces_.size() >= (1u << 20)) fail(path, "more than 2^20 tokens");
      need(8, "score and length");
      float score;
      std::int32_t len;
      std::memcpy(&score, buf.data() + off, 4);
      std::memcpy(&len, buf.data() + off + 4, 4);
      off += 8;
      if (len < 0 || len > max_token_length_)
        fail(path, "token " + std::to_string(pieces_.size()) + " has length " + std::to_string(len) +
                       ", expected 0..max_token_length = " + std::to_string(max_token_length_));
      need(static_cast<std::size_t>(len), "token bytes");
      pieces_.emplace_back(buf.data() + off, static_cast<std::size_t>(len));
      scores_.push_back(score);
      off += static_cast<std::size_t>(len);
    }
    if (expected_vocab_size > 0 && static_cast<int>(pieces_.size()) != expected_vocab_size)
      fail(path, "has " + std::to_string(pieces_.size()) + " tokens, expected the model's vocab_size = " +
                     std::to_string(expected_vocab_size));
    if (pieces_.size() < 3 + 256)
      fail(path, "has " + std::to_string(pieces_.size()) +
                     " tokens, expected at least 259 (<unk>, BOS, EOS and 256 byte tokens)");
    lookup_.reserve(pieces_.size() * 2);
    // On duplicate pieces the lowest id wins (run.c's bsearch would pick an unspecified one).
    for (std::size_t i = 0; i < pieces_.size(); ++i) lookup_.emplace(pieces_[i], static_cast<int>(i));
    auto it = lookup_.find(" ");
    if (it == lookup_.end()) fail(path, "has no token for \" \" (the dummy-space prefix)");
    space_id_ = it->second;
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  const std::string& piece(int id) const { return pieces_.at(static_cast<std::size_t>(id)); }
  float score(int id) const { return scores_.at(static_cast<std::size_t>(id)); }
  int space_id() const { return space_id_; }
  // -1 when the string is not a token.
  int lookup(const std::string& s) const {
    auto it = lookup_.find(s);
    return it == lookup_.end() ? -1 : it->second;
  }

  // run.c encode(text, bos, eos=0). The text is taken as raw bytes (run.c would stop at a NUL).
  std::vector<int> encode(const std::string& text, bool bos) const {
    std::vector<int> toks;
    toks.reserve(text.size() + 2);
    if (bos) toks.push_back(kBos);
    if (!text.empty()) toks.push_back(space_id_);
    // UTF-8 codepoints (at most 4 bytes; run.c's str_len < 4 rule), byte fallback otherwise.
    std::string cp;
    for (std::size_t i = 0; i < text.size(); ++i) {
      const unsigned char c = static_cast<unsigned char>(text[i]);
      if ((c & 0xC0) != 0x80) cp.clear();
      cp.push_back(static_cast<char>(c));
      const bool next_is_cont =
          i + 1 < text.size() && (static_cast<unsigned char>(text[i + 1]) & 0xC0) == 0x80;
      if (next_is_cont && cp.size() < 4) continue;
      const int id = lookup(cp);
      if (id != -1) {
        toks.push_back(id);
      } else {
        for (unsigned char b : cp) toks.push_back(static_cast<int>(b) + 3);
      }
      cp.clear();
    }
    // BOS is a control token and never merges with the text (run.c would merge it if the
    // vocabulary held such a concatenation; no real one does, and SentencePiece never does).
    if (bos) {
      std::vector<int> body(toks.begin() + 1, toks.end());
      merge(body);
      toks.resize(1);
      toks.insert(toks.end(), body.begin(), body.end());
    } else {
      merge(toks);
    }
    return toks;
  }

  // run.c decode(prev, token): strip the leading space after BOS, map "<0xHH>" to the raw byte.
  std::string decode(int prev, int token) const {
    std::string s = piece(token);
    if (prev == kBos && !s.empty() && s[0] == ' ') s.erase(0, 1);
    if (s.size() == 6 && s.compare(0, 3, "<0x") == 0 && s[5] == '>') {
      const int hi = hexval(s[3]), lo = hexval(s[4]);
      if (hi >= 0 && lo >= 0) return std::string(1, static_cast<char>(hi * 16 + lo));
    }
    return s;
  }

 private:
  [[noreturn]] static void fail(const std::string& path, const std::string& msg) {
    throw std::runtime_error("tokenizer " + path + ": " + msg);
  }
  static int hexval(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }

  // Greedy BPE merging, equivalent to run.c's loop: each round merges the pair with the highest
  // score (strict '>' against a running best that starts at -1e10f, scanning left to right).
  void merge(std::vector<int>& toks) const {
    const int n = static_cast<int>(toks.size());
    if (n < 2) return;
    std::vector<int> prev(n), next(n), ver(n, 0);
    for (int i = 0; i < n; ++i) { prev[i] = i - 1; next[i] = i + 1 < n ? i + 1 : -1; }
    struct Cand { float score; int left, right, vl, vr, id; };
    // Highest score first; on equal scores the smallest left position first.
    auto worse = [](const Cand& a, const Cand& b) {
      if (a.score != b.score) return a.score < b.score;
      return a.left > b.left;
    };
    std::priority_queue<Cand, std::vector<Cand>, decltype(worse)> heap(worse);
    std::string tmp;
    auto push = [&](int l) {
      const int r = next[l];
      if (l < 0 || r < 0) return;
      tmp = pieces_[static_cast<std::size_t>(toks[l])];
      tmp += pieces_[static_cast<std::size_t>(toks[r])];
      const int id = lookup(tmp);
      if (id == -1) return;
      const float sc = scores_[static_cast<std::size_t>(id)];
      if (!(sc > -1e10f)) return;  // run.c could never select it (also excludes NaN)
      heap.push(Cand{sc, l, r, ver[l], ver[r], id});
    };
    for (int i = 0; i + 1 < n; ++i) push(i);
    while (!heap.empty()) {
      const Cand c = heap.top();
      heap.pop();
      // Stale if either side changed (merged into something else) or they are no longer adjacent.
      if (ver[c.left] != c.vl || ver[c.right] != c.vr || next[c.left] != c.right) continue;
      toks[c.left] = c.id;
      ++ver[c.left];
      ver[c.right] = -1;  // removed
      next[c.left] = next[c.right];
      if (next[c.right] >= 0) prev[next[c.right]] = c.left;
      if (prev[c.left] >= 0) push(prev[c.left]);
      push(c.left);
    }
    std::vector<int> out;
    out.reserve(n);
    for (int i = 0; i >= 0; i = next[i]) out.push_back(toks[i]);
    toks.swap(out);
  }

  int max_token_length_ = 0;
  std::vector<std::string> pieces_;
  std::vector<float> scores_;
  std::unordered_map<std::string, int> lookup_;
  int space_id_ = -1;
};

}  // namespace llm
