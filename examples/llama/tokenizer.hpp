#pragma once
//! \file tokenizer.hpp
//! llama2.c's BPE tokenizer: the tok*.bin vocabulary format, its greedy best-score merge
//! encoder and its single-token decoder, reproduced rule for rule so token ids match the
//! reference values the model was published with.

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <string>
#include <string_view>
#include <unordered_map>
#include <vector>

#include "file_io.hpp"

namespace llama {

class tokenizer {
 public:
  static constexpr int bos_id = 1;
  static constexpr int eos_id = 2;
  //! Byte b is token b + 3, so '\n' is 13.
  static constexpr int byte_offset = 3;
  static constexpr int newline_id = '\n' + byte_offset;

  //! Reads `path`: int32 max_token_length, then records {float32 score, int32 len, len bytes}
  //! until the end of the file. The record count must equal `model_vocab_size`, because a
  //! tokenizer from another model would silently produce ids the model never trained on.
  tokenizer(const std::filesystem::path& path, int model_vocab_size) {
    const auto fail = [&](const std::string& problem) { fail_file("tokenizer", path, problem); };
    const std::string bytes = read_all(path, "tokenizer");

    std::size_t at = 0;
    const auto read_i32 = [&](const char* what) {
      if (bytes.size() - at < 4)
        fail("truncated while reading " + std::string(what) + " of token " +
             std::to_string(pieces_.size()));
      std::int32_t value;
      std::memcpy(&value, bytes.data() + at, 4);
      at += 4;
      return value;
    };
    if (bytes.size() < 4) fail("truncated: no max_token_length header");
    const std::int32_t max_token_length = read_i32("max_token_length");
    if (max_token_length <= 0)
      fail("bad header: max_token_length must be positive (got " +
           std::to_string(max_token_length) + ")");
    while (at < bytes.size()) {
      const std::int32_t raw_score = read_i32("the score");
      float score;
      std::memcpy(&score, &raw_score, 4);
      const std::int32_t len = read_i32("the length");
      if (len < 0 || len > max_token_length)
        fail("bad length " + std::to_string(len) + " for token " + std::to_string(pieces_.size()) +
             " (max_token_length is " + std::to_string(max_token_length) + ")");
      if (bytes.size() - at < static_cast<std::size_t>(len))
        fail("truncated inside the bytes of token " + std::to_string(pieces_.size()));
      pieces_.emplace_back(bytes.data() + at, static_cast<std::size_t>(len));
      scores_.push_back(score);
      at += static_cast<std::size_t>(len);
    }
    if (static_cast<int>(pieces_.size()) != model_vocab_size)
      fail("tokenizer mismatch: the file has " + std::to_string(pieces_.size()) +
           " tokens but the model's vocab_size is " + std::to_string(model_vocab_size));
    if (pieces_.size() < byte_offset + 256)
      fail("has " + std::to_string(pieces_.size()) +
           " tokens, fewer than the 3 specials plus 256 byte tokens byte fallback needs");
    for (std::size_t id = 0; id < pieces_.size(); ++id)
      ids_.emplace(pieces_[id], static_cast<int>(id));  // the first id wins on duplicates
  }

  int vocab_size() const { return static_cast<int>(pieces_.size()); }
  const std::string& piece(int id) const { return pieces_.at(static_cast<std::size_t>(id)); }

  //! llama2.c encoding: prefix a space (SentencePiece's dummy prefix) to non-empty text, map
  //! each UTF-8 character to its token or else to its byte tokens, then repeatedly merge the
  //! adjacent pair whose concatenation is the best-scoring token (leftmost on ties).
  std::vector<int> encode(std::string_view text, bool add_bos) const {
    std::vector<int> tokens;
    if (add_bos) tokens.push_back(bos_id);
    if (text.empty()) return tokens;
    const std::size_t first = tokens.size();

    const std::string spaced = " " + std::string(text);
    std::size_t start = 0;
    while (start < spaced.size()) {
      // A character is its lead byte plus up to 3 continuation bytes (10xxxxxx).
      std::size_t end = start + 1;
      while (end < spaced.size() && end - start < 4 && is_continuation(spaced[end])) ++end;
      const auto found = ids_.find(spaced.substr(start, end - start));
      if (found != ids_.end()) {
        tokens.push_back(found->second);
      } else {
        for (std::size_t i = start; i < end; ++i)
          tokens.push_back(static_cast<unsigned char>(spaced[i]) + byte_offset);
      }
      start = end;
    }

    // merges[i] is the token the pair (tokens[first + i], tokens[first + i + 1]) merges into,
    // or -1; kept per pair so a merge re-examines only its two new neighbours, not every pair.
    std::vector<int> merges;  // [tokens.size() - 1 - first]
    for (std::size_t i = first; i + 1 < tokens.size(); ++i)
      merges.push_back(merge_of(tokens[i], tokens[i + 1]));
    while (true) {
      std::size_t best = merges.size();
      for (std::size_t i = 0; i < merges.size(); ++i)
        if (merges[i] >= 0 && (best == merges.size() || score(merges[i]) > score(merges[best])))
          best = i;
      if (best == merges.size()) break;
      tokens[first + best] = merges[best];
      tokens.erase(tokens.begin() + static_cast<std::ptrdiff_t>(first + best + 1));
      merges.erase(merges.begin() + static_cast<std::ptrdiff_t>(best));
      if (best > 0) merges[best - 1] = merge_of(tokens[first + best - 1], tokens[first + best]);
      if (best < merges.size())
        merges[best] = merge_of(tokens[first + best], tokens[first + best + 1]);
    }
    return tokens;
  }

  //! Text of `token` following `prev_token`, by llama2.c's rules: the space SentencePiece put in
  //! front of the first word after BOS is dropped, and byte tokens "<0xXX>" become that raw byte.
  std::string decode(int prev_token, int token) const {
    std::string_view text = piece(token);
    if (prev_token == bos_id && !text.empty() && text.front() == ' ') text.remove_prefix(1);
    if (text.size() == 6 && text.starts_with("<0x") && text.back() == '>') {
      const int high = hex_value(text[3]);
      const int low = hex_value(text[4]);
      if (high >= 0 && low >= 0) return std::string(1, static_cast<char>(high * 16 + low));
    }
    return std::string(text);
  }

 private:
  static bool is_continuation(char c) { return (static_cast<unsigned char>(c) & 0xC0) == 0x80; }

  static int hex_value(char c) {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'A' && c <= 'F') return c - 'A' + 10;
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  }

  float score(int id) const { return scores_[static_cast<std::size_t>(id)]; }

  //! Token whose text is piece(left) + piece(right), or -1 if the vocabulary has none.
  int merge_of(int left, int right) const {
    const auto found = ids_.find(piece(left) + piece(right));
    return found == ids_.end() ? -1 : found->second;
  }

  std::vector<std::string> pieces_;  // [vocab_size] token text
  std::vector<float> scores_;        // [vocab_size] merge priority, higher merges first
  std::unordered_map<std::string, int> ids_;
};

}  // namespace llama
