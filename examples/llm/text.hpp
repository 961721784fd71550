// text.hpp — the perplexity "stream convention" (DESIGN.md §5), the one llama2.c trains with:
//   1. split the text into documents: at "<|endoftext|>" if it occurs, else at blank lines "\n\n"
//      (or at an explicit separator);
//   2. strip surrounding whitespace of each document and drop the empty ones;
//   3. encode each as BOS + dummy space + text (Tokenizer::encode with bos=true);
//   4. concatenate everything into one token stream;
//   5. cut the stream into consecutive windows of seq_len tokens (the last one may be shorter),
//      positions restarting at 0 in each window;
//   6. score every token of a window except its first (it has no context in that window).
// So a stream of T tokens yields sum over windows of (window length - 1) scored tokens.
#pragma once

#include <algorithm>
#include <cstdint>
#include <fstream>
#include <iterator>
#include <stdexcept>
#include <string>
#include <vector>

#include "tokenizer.hpp"

namespace llm {

inline std::string read_text_file(const std::string& path) {
  std::ifstream f(path, std::ios::binary);
  if (!f) throw std::runtime_error("cannot open text file " + path);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

// How to split a text into documents.
struct SplitRule {
  enum Kind { Auto, EndOfText, BlankLine, None, Literal } kind = Auto;
  std::string literal;  // for Literal

  // "auto" | "eot" | "blank" | "none" | anything else = a literal separator with \n \t \r \\ escapes.
  static SplitRule parse(const std::string& s) {
    SplitRule r;
    if (s == "auto") r.kind = Auto;
    else if (s == "eot") r.kind = EndOfText;
    else if (s == "blank") r.kind = BlankLine;
    else if (s == "none") r.kind = None;
    else {
      r.kind = Literal;
      for (std::size_t i = 0; i < s.size(); ++i) {
        if (s[i] == '\\' && i + 1 < s.size()) {
          const char e = s[++i];
          r.literal += e == 'n' ? '\n' : e == 't' ? '\t' : e == 'r' ? '\r' : e;
        } else {
          r.literal += s[i];
        }
      }
      if (r.literal.empty()) throw std::runtime_error("--split: empty separator");
    }
    return r;
  }
};

inline const char* kEndOfText = "<|endoftext|>";

inline std::string strip_ascii_whitespace(const std::string& s) {
  const char* ws = " \t\n\r\v\f";
  const auto b = s.find_first_not_of(ws);
  if (b == std::string::npos) return std::string();
  const auto e = s.find_last_not_of(ws);
  return s.substr(b, e - b + 1);
}

// Documents, stripped, empty ones dropped.
inline std::vector<std::string> split_documents(const std::string& text, const SplitRule& rule) {
  std::string sep;
  switch (rule.kind) {
    case SplitRule::Auto:
      sep = text.find(kEndOfText) != std::string::npos ? kEndOfText : "\n\n";
      break;
    case SplitRule::EndOfText: sep = kEndOfText; break;
    case SplitRule::BlankLine: sep = "\n\n"; break;
    case SplitRule::None: break;
    case SplitRule::Literal: sep = rule.literal; break;
  }
  std::vector<std::string> docs;
  auto add = [&docs](const std::string& d) {
    std::string s = strip_ascii_whitespace(d);
    if (!s.empty()) docs.push_back(std::move(s));
  };
  if (sep.empty()) {
    add(text);
    return docs;
  }
  std::size_t start = 0;
  for (;;) {
    const std::size_t pos = text.find(sep, start);
    if (pos == std::string::npos) {
      add(text.substr(start));
      break;
    }
    add(text.substr(start, pos - start));
    start = pos + sep.size();
  }
  return docs;
}

// The concatenated token stream; stops early once it holds at least max_stream_tokens (> 0).
inline std::vector<int> encode_stream(const Tokenizer& tok, const std::vector<std::string>& docs,
                                      std::int64_t max_stream_tokens = 0) {
  std::vector<int> stream;
  for (const auto& d : docs) {
    const std::vector<int> t = tok.encode(d, /*bos=*/true);
    stream.insert(stream.end(), t.begin(), t.end());
    if (max_stream_tokens > 0 && static_cast<std::int64_t>(stream.size()) >= max_stream_tokens) break;
  }
  return stream;
}

// One evaluation window: stream[begin, begin+length), positions 0..length-1; its tokens 1..n_scored
// are scored (n_scored <= length-1; smaller only when --max-tokens cuts the last window, which is
// then also truncated to n_scored+1 tokens since later tokens cannot influence earlier ones).
struct Window {
  std::int64_t begin;
  int length;
  int n_scored;
};

// Windows of seq_len; max_scored > 0 stops after that many scored tokens.
inline std::vector<Window> make_windows(std::int64_t stream_size, int seq_len, std::int64_t max_scored = 0) {
  std::vector<Window> w;
  std::int64_t scored = 0;
  for (std::int64_t b = 0; b < stream_size; b += seq_len) {
    int len = static_cast<int>(std::min<std::int64_t>(seq_len, stream_size - b));
    if (len < 2) break;  // a 1-token window scores nothing
    int n = len - 1;
    if (max_scored > 0 && scored + n > max_scored) {
      n = static_cast<int>(max_scored - scored);
      len = n + 1;
    }
    if (n <= 0) break;
    w.push_back(Window{b, len, n});
    scored += n;
    if (max_scored > 0 && scored >= max_scored) break;
  }
  return w;
}

// Upper bound on the stream length needed for max_scored scored tokens (0 = all).
inline std::int64_t stream_tokens_needed(std::int64_t max_scored, int seq_len) {
  if (max_scored <= 0) return 0;
  const std::int64_t full = max_scored / (seq_len - 1) + 1;
  return full * seq_len + 1;
}

}  // namespace llm
