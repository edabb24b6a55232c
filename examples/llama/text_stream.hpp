#pragma once
//! \file text_stream.hpp
//! The evaluation token stream of ../../shared/data/tinystories/README.md: paragraphs encoded
//! without BOS, each followed by a newline token, concatenated, then cut into fixed windows
//! that each start with BOS, so every window is a context the model could have seen in training.

#include <algorithm>
#include <cstddef>
#include <filesystem>
#include <stdexcept>
#include <string>
#include <string_view>
#include <vector>

#include "file_io.hpp"
#include "tokenizer.hpp"

namespace llama {

//! The whitespace Python's str.strip() removes from ASCII text, which the reference used.
inline bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

inline std::string_view strip(std::string_view s) {
  while (!s.empty() && is_space(s.front())) s.remove_prefix(1);
  while (!s.empty() && is_space(s.back())) s.remove_suffix(1);
  return s;
}

//! Non-empty stripped paragraphs of `text`. Paragraphs are separated by blank lines (empty or
//! whitespace-only) and by lines reading `<|endoftext|>`, the story break of
//! tinystories_sample.txt; single newlines inside a paragraph are kept.
inline std::vector<std::string_view> split_paragraphs(std::string_view text) {
  std::vector<std::string_view> paragraphs;
  std::size_t paragraph_start = 0;
  for (std::size_t line_start = 0; line_start <= text.size();) {
    const std::size_t line_end = std::min(text.find('\n', line_start), text.size());
    const std::string_view line = strip(text.substr(line_start, line_end - line_start));
    const bool is_break = line.empty() || line == "<|endoftext|>";
    if (is_break || line_end == text.size()) {
      const std::size_t stop = is_break ? line_start : line_end;
      const std::string_view paragraph =
          strip(text.substr(paragraph_start, stop - paragraph_start));
      if (!paragraph.empty()) paragraphs.push_back(paragraph);
      paragraph_start = line_end + 1;
    }
    line_start = line_end + 1;
  }
  return paragraphs;
}

//! Tokens of the whole text: each paragraph encoded without BOS, then the newline token.
inline std::vector<int> encode_paragraphs(std::string_view text, const tokenizer& tok) {
  std::vector<int> tokens;
  for (std::string_view paragraph : split_paragraphs(text)) {
    const std::vector<int> ids = tok.encode(paragraph, false);
    tokens.insert(tokens.end(), ids.begin(), ids.end());
    tokens.push_back(tokenizer::newline_id);
  }
  return tokens;
}

//! A text file turned into the evaluation stream, served as BOS-led windows of 512 tokens.
class text_stream {
 public:
  //! Tokens per window: BOS plus `stride` stream tokens, the model's trained context.
  static constexpr std::size_t window_tokens = 512;
  //! Stream tokens consumed per window; consecutive windows do not overlap.
  static constexpr std::size_t stride = window_tokens - 1;

  //! Throws std::runtime_error naming `path` when it cannot be read.
  text_stream(const std::filesystem::path& path, const tokenizer& tok)
      : origin_(path.string()), tokens_(encode_paragraphs(read_all(path, "text"), tok)) {}

  const std::vector<int>& tokens() const { return tokens_; }

  //! Number of complete windows the stream holds.
  std::size_t window_count() const { return tokens_.size() / stride; }

  //! [window_tokens]: BOS, then stream tokens [i * stride, (i + 1) * stride).
  std::vector<int> window(std::size_t i) const {
    if (i >= window_count())
      throw std::out_of_range("text '" + origin_ + "': stream too short for window " +
                              std::to_string(i) + ": it needs " + std::to_string((i + 1) * stride) +
                              " tokens but the stream has " + std::to_string(tokens_.size()));
    std::vector<int> ids;
    ids.reserve(window_tokens);
    ids.push_back(tokenizer::bos_id);
    const auto begin = tokens_.begin() + static_cast<std::ptrdiff_t>(i * stride);
    ids.insert(ids.end(), begin, begin + static_cast<std::ptrdiff_t>(stride));
    return ids;
  }

 private:
  std::string origin_;
  std::vector<int> tokens_;  // [stream length] the evaluation stream
};

}  // namespace llama
