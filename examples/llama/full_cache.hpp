#pragma once
//! \file full_cache.hpp
//! The uncompressed baseline of the `kv_cache` contract (see forward.hpp): every token's key
//! and value is kept, so its perplexity is the reference compressed caches are measured against.

#include <algorithm>
#include <cstddef>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "math.hpp"

namespace llama {

class dense_full_cache {
 public:
  //! Room for `capacity` tokens per layer, by default the model's context length.
  explicit dense_full_cache(const config& c) : dense_full_cache(c, c.seq_len) {}
  dense_full_cache(const config& c, int capacity)
      : n_heads_(static_cast<std::size_t>(c.n_heads)),
        n_kv_heads_(static_cast<std::size_t>(c.n_kv_heads)),
        head_dim_(static_cast<std::size_t>(c.head_dim())),
        kv_group_(static_cast<std::size_t>(c.kv_group())),
        capacity_(static_cast<std::size_t>(capacity)),
        keys_(static_cast<std::size_t>(c.n_layers) * n_kv_heads_ * capacity_ * head_dim_),
        values_(keys_.size()),
        lengths_(static_cast<std::size_t>(c.n_layers), 0),
        scores_(capacity_) {}

  //! Stores `k`, `v` [n_kv_heads][head_dim] of the token at `pos`, which must be the next
  //! position of `layer`: a dense cache has no holes, so an out-of-order append is a caller bug.
  void append(int layer, int pos, std::span<const float> k, std::span<const float> v) {
    std::size_t& length = lengths_[static_cast<std::size_t>(layer)];
    if (static_cast<std::size_t>(pos) != length)
      throw std::logic_error("dense_full_cache: layer " + std::to_string(layer) +
                             " expected position " + std::to_string(length) + " but got " +
                             std::to_string(pos));
    if (length == capacity_)
      throw std::length_error("dense_full_cache: capacity of " + std::to_string(capacity_) +
                              " tokens exceeded");
    for (std::size_t head = 0; head < n_kv_heads_; ++head) {
      float* k_row = row(keys_, layer, head, length);
      float* v_row = row(values_, layer, head, length);
      for (std::size_t d = 0; d < head_dim_; ++d) {
        k_row[d] = k[head * head_dim_ + d];
        v_row[d] = v[head * head_dim_ + d];
      }
    }
    ++length;
  }

  //! Exact attention of `q` [n_heads][head_dim] over every stored token of `layer`, into
  //! `out` [n_heads][head_dim].
  void attend(int layer, std::span<const float> q, std::span<float> out) {
    const std::size_t length = lengths_[static_cast<std::size_t>(layer)];
    for (std::size_t head = 0; head < n_heads_; ++head) {
      const std::size_t kv_head = head / kv_group_;
      attend_head(q.subspan(head * head_dim_, head_dim_), row(keys_, layer, kv_head, 0),
                  row(values_, layer, kv_head, 0), length, scores_,
                  out.subspan(head * head_dim_, head_dim_));
    }
  }

  //! Tokens stored for `layer`.
  std::size_t length(int layer) const { return lengths_[static_cast<std::size_t>(layer)]; }

  //! Forgets every token so the cache can serve a new sequence without reallocating.
  void clear() { std::fill(lengths_.begin(), lengths_.end(), 0); }

 private:
  float* row(std::vector<float>& store, int layer, std::size_t kv_head, std::size_t pos) {
    return store.data() +
           ((static_cast<std::size_t>(layer) * n_kv_heads_ + kv_head) * capacity_ + pos) *
               head_dim_;
  }

  std::size_t n_heads_, n_kv_heads_, head_dim_, kv_group_, capacity_;
  std::vector<float> keys_;           // [n_layers][n_kv_heads][capacity][head_dim]
  std::vector<float> values_;         // [n_layers][n_kv_heads][capacity][head_dim]
  std::vector<std::size_t> lengths_;  // [n_layers] tokens stored per layer
  std::vector<float> scores_;         // [capacity] attention scratch
};

}  // namespace llama
