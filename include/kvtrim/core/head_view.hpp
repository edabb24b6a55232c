#pragma once
//! \file head_view.hpp
//! What a policy reads of one sequence: per (layer, stored head) the cached tokens in slot
//! order, as fp32. Slot order is not position order once a cache has been compacted, so every
//! part that needs neighbours (pooling) or recency (protection) reads `positions`.

#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/config.hpp"
#include "kvtrim/core/shape.hpp"

KVTRIM_NAMESPACE_BEGIN

//! One (layer, stored head).
struct head_view {
  std::span<const int32_t> positions;  //!< [n] original token position of each slot
  std::span<const float> keys;         //!< [n][d] post-RoPE keys (empty for score-free metrics)
  std::span<const float> metric;       //!< [n] accumulated slot metric (empty if none kept)

  [[nodiscard]] int32_t size() const noexcept { return static_cast<int32_t>(positions.size()); }
  //! One past the newest position: where the recent window ends.
  [[nodiscard]] int32_t next_position() const noexcept {
    int32_t last = -1;
    for (const int32_t p : positions) last = p > last ? p : last;
    return last + 1;
  }
};

//! The queries a metric observes for one layer: the last rows of the prompt (SnapKV family,
//! KV-Compress prefill) or all of them (H2O prefill).
struct query_view {
  std::span<const float> queries;      //!< [rows][Hq][d] post-RoPE
  std::span<const int32_t> positions;  //!< [rows] position of each query row

  [[nodiscard]] int32_t rows() const noexcept { return static_cast<int32_t>(positions.size()); }
};

//! One layer of one sequence as the policy sees it.
struct layer_view {
  int32_t layer = 0;
  attention_shape shape;        //!< shape of the model (Hq, Hkv, d)
  std::span<const head_view> heads;  //!< [H] stored heads: Hkv, or Hq in query-head mode
  query_view observation;
};

//! Ragged per-(layer, head) float rows, [L][H][n_lh]: scores, metrics, gathered keys.
class ragged_rows {
 public:
  ragged_rows() = default;
  //! `lengths` is [L][H] row lengths; `width` floats per entry (d for keys, 1 for scores).
  //! Rows without a length are empty; lengths past L * H are ignored.
  ragged_rows(int32_t layers, int32_t heads, std::span<const int32_t> lengths, int32_t width = 1)
      : layers_(layers), heads_(heads), width_(width), offsets_(static_cast<size_t>(layers) * heads + 1, 0) {
    for (size_t i = 0; i + 1 < offsets_.size(); ++i)
      offsets_[i + 1] = offsets_[i] + (i < lengths.size() ? static_cast<int64_t>(lengths[i]) * width : 0);
    data_.assign(static_cast<size_t>(offsets_.back()), 0.f);
  }
  [[nodiscard]] std::span<float> row(int32_t l, int32_t h) noexcept {
    const size_t i = static_cast<size_t>(l) * heads_ + h;
    return {data_.data() + offsets_[i], static_cast<size_t>(offsets_[i + 1] - offsets_[i])};
  }
  [[nodiscard]] std::span<const float> row(int32_t l, int32_t h) const noexcept {
    const size_t i = static_cast<size_t>(l) * heads_ + h;
    return {data_.data() + offsets_[i], static_cast<size_t>(offsets_[i + 1] - offsets_[i])};
  }
  [[nodiscard]] int32_t layers() const noexcept { return layers_; }
  [[nodiscard]] int32_t heads() const noexcept { return heads_; }
  [[nodiscard]] bool empty() const noexcept { return data_.empty(); }

 private:
  int32_t layers_ = 0, heads_ = 0, width_ = 1;
  std::vector<int64_t> offsets_;  // [L*H + 1] 64-bit: a long-context cache passes 2^31 floats
  std::vector<float> data_;
};

KVTRIM_NAMESPACE_END
