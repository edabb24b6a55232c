#pragma once
//! \file dense_cache.hpp
//! A contiguous host cache, [batch][L][H][capacity][d] with a length per (sequence, layer,
//! head): the layout of engines without paging. Eviction compacts each head in place
//! (KV-Compress's move rule, plan/eviction_plan.hpp), so the freed tail of every head is
//! reusable at once; the memory itself stays allocated, as it must in a dense layout.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/plan/eviction_plan.hpp"

KVTRIM_NAMESPACE_BEGIN

class dense_cache {
 public:
  using kvc_concept = kv_store_tag;
  static constexpr memory_space memory = memory_space::host;

  //! `shape.kv_heads` is the number of stored heads (Hq in the query-head compatibility mode).
  dense_cache(attention_shape shape, int32_t batch, int32_t capacity)
      : shape_(shape), batch_(batch), capacity_(capacity),
        lengths_(static_cast<size_t>(batch) * shape.layers * shape.kv_heads, 0),
        positions_(heads_total() * static_cast<size_t>(capacity), 0),
        metrics_(heads_total() * static_cast<size_t>(capacity), 0.f),
        keys_(heads_total() * static_cast<size_t>(capacity) * shape.head_dim, 0.f),
        values_(keys_.size(), 0.f) {}

  [[nodiscard]] attention_shape shape() const noexcept { return shape_; }
  [[nodiscard]] int32_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] int32_t batch() const noexcept { return batch_; }
  [[nodiscard]] bool contains(int64_t seq) const noexcept { return seq >= 0 && seq < batch_; }
  [[nodiscard]] int32_t head_length(int64_t seq, int32_t l, int32_t h) const noexcept {
    return lengths_[head_index(seq, l, h)];
  }

  //! Appends one token to every head of one layer. k, v: [H][d]. Fails, changing nothing, if
  //! any head of the layer is full.
  [[nodiscard]] status append(int64_t seq, int32_t l, int32_t position, std::span<const float> k,
                              std::span<const float> v) {
    if (!contains(seq)) return status::unknown_sequence;
    if (l < 0 || l >= shape_.layers || position < 0 || position > max_position) return status::invalid_argument;
    const auto d = static_cast<size_t>(shape_.head_dim);
    if (k.size() != d * shape_.kv_heads || v.size() != k.size()) return status::shape_mismatch;
    for (int32_t h = 0; h < shape_.kv_heads; ++h)
      if (lengths_[head_index(seq, l, h)] >= capacity_) return status::pool_exhausted;
    for (int32_t h = 0; h < shape_.kv_heads; ++h) {
      const size_t head = head_index(seq, l, h);
      const size_t slot = head * capacity_ + static_cast<size_t>(lengths_[head]++);
      std::copy_n(k.begin() + static_cast<std::ptrdiff_t>(h * d), d, keys_.begin() + static_cast<std::ptrdiff_t>(slot * d));
      std::copy_n(v.begin() + static_cast<std::ptrdiff_t>(h * d), d, values_.begin() + static_cast<std::ptrdiff_t>(slot * d));
      positions_[slot] = position;
      metrics_[slot] = 0.f;
    }
    return status::success;
  }

  //! Empties a sequence's heads.
  [[nodiscard]] status clear(int64_t seq) {
    if (!contains(seq)) return status::unknown_sequence;
    for (int32_t l = 0; l < shape_.layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h) lengths_[head_index(seq, l, h)] = 0;
    return status::success;
  }

  [[nodiscard]] status read_head(int64_t seq, int32_t l, int32_t h, std::span<int32_t> positions,
                                 std::span<float> keys, std::span<float> metric) const {
    if (!contains(seq)) return status::unknown_sequence;
    if (l < 0 || l >= shape_.layers || h < 0 || h >= shape_.kv_heads) return status::invalid_argument;
    const size_t head = head_index(seq, l, h);
    const auto n = static_cast<size_t>(lengths_[head]);
    const auto d = static_cast<size_t>(shape_.head_dim);
    if (positions.size() != n || keys.size() != n * d || metric.size() != n) return status::shape_mismatch;
    const size_t base = head * capacity_;
    std::copy_n(positions_.begin() + static_cast<std::ptrdiff_t>(base), n, positions.begin());
    std::copy_n(metrics_.begin() + static_cast<std::ptrdiff_t>(base), n, metric.begin());
    std::copy_n(keys_.begin() + static_cast<std::ptrdiff_t>(base * d), n * d, keys.begin());
    return status::success;
  }

  [[nodiscard]] status rewrite_head(int64_t seq, int32_t l, int32_t h, std::span<const int32_t> positions,
                                    std::span<const float> keys) {
    if (!contains(seq)) return status::unknown_sequence;
    if (l < 0 || l >= shape_.layers || h < 0 || h >= shape_.kv_heads) return status::invalid_argument;
    const size_t head = head_index(seq, l, h);
    const auto n = static_cast<size_t>(lengths_[head]);
    const auto d = static_cast<size_t>(shape_.head_dim);
    if (positions.size() != n || keys.size() != n * d) return status::shape_mismatch;
    for (const int32_t p : positions)
      if (p < 0 || p > max_position) return status::invalid_argument;
    const size_t base = head * capacity_;
    std::copy(positions.begin(), positions.end(), positions_.begin() + static_cast<std::ptrdiff_t>(base));
    std::copy(keys.begin(), keys.end(), keys_.begin() + static_cast<std::ptrdiff_t>(base * d));
    return status::success;
  }

  //! Slot accessors of one head (host engines read attention inputs through these).
  [[nodiscard]] std::span<const float> keys(int64_t seq, int32_t l, int32_t h) const noexcept {
    return slots(keys_, seq, l, h, shape_.head_dim);
  }
  [[nodiscard]] std::span<float> keys(int64_t seq, int32_t l, int32_t h) noexcept {
    return slots(keys_, seq, l, h, shape_.head_dim);
  }
  [[nodiscard]] std::span<const float> values(int64_t seq, int32_t l, int32_t h) const noexcept {
    return slots(values_, seq, l, h, shape_.head_dim);
  }
  [[nodiscard]] std::span<const int32_t> positions(int64_t seq, int32_t l, int32_t h) const noexcept {
    return slots(positions_, seq, l, h, 1);
  }
  [[nodiscard]] std::span<int32_t> positions(int64_t seq, int32_t l, int32_t h) noexcept {
    return slots(positions_, seq, l, h, 1);
  }
  [[nodiscard]] std::span<float> metrics(int64_t seq, int32_t l, int32_t h) noexcept {
    return slots(metrics_, seq, l, h, 1);
  }
  [[nodiscard]] std::span<const float> metrics(int64_t seq, int32_t l, int32_t h) const noexcept {
    return slots(metrics_, seq, l, h, 1);
  }

  //! Applies a plan to every head of `seq`: metrics first, then compaction. Validated as a
  //! whole before anything is written.
  [[nodiscard]] status apply(int64_t seq, const eviction_plan& plan) {
    if (!contains(seq)) return status::unknown_sequence;
    if (plan.layers() != shape_.layers || plan.heads() != shape_.kv_heads) return status::invalid_plan;
    std::vector<int32_t> current(static_cast<size_t>(shape_.layers) * shape_.kv_heads);
    for (int32_t l = 0; l < shape_.layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h)
        current[static_cast<size_t>(l) * shape_.kv_heads + h] = head_length(seq, l, h);
    if (const status s = plan.validate(current); s != status::success) return s;
    std::vector<slot_move> moves;
    std::vector<size_t> offsets;
    compaction_moves(plan, moves, offsets);  // every allocation, before anything changes
    const auto d = static_cast<size_t>(shape_.head_dim);
    for (int32_t l = 0; l < shape_.layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h) {
        const size_t head = head_index(seq, l, h);
        const size_t base = head * capacity_;
        if (!plan.metrics.empty()) {
          const auto m = plan.metrics.row(l, h);
          std::copy(m.begin(), m.end(), metrics_.begin() + static_cast<std::ptrdiff_t>(base));
        }
        const size_t i = static_cast<size_t>(l) * static_cast<size_t>(shape_.kv_heads) + static_cast<size_t>(h);
        for (size_t m = offsets[i]; m < offsets[i + 1]; ++m) {
          const slot_move& mv = moves[m];
          const size_t dst = base + static_cast<size_t>(mv.dst), src = base + static_cast<size_t>(mv.src);
          std::copy_n(keys_.begin() + static_cast<std::ptrdiff_t>(src * d), d, keys_.begin() + static_cast<std::ptrdiff_t>(dst * d));
          std::copy_n(values_.begin() + static_cast<std::ptrdiff_t>(src * d), d, values_.begin() + static_cast<std::ptrdiff_t>(dst * d));
          positions_[dst] = positions_[src];
          metrics_[dst] = metrics_[src];
        }
        lengths_[head] = plan.kept_count(l, h);
      }
    return status::success;
  }

 private:
  [[nodiscard]] size_t heads_total() const noexcept {
    return static_cast<size_t>(batch_) * shape_.layers * shape_.kv_heads;
  }
  [[nodiscard]] size_t head_index(int64_t seq, int32_t l, int32_t h) const noexcept {
    return (static_cast<size_t>(seq) * shape_.layers + l) * shape_.kv_heads + h;
  }
  //! The first `length * width` elements of head (seq, l, h) in one of the slot arrays.
  template <class Vec>
  [[nodiscard]] auto slots(Vec& v, int64_t seq, int32_t l, int32_t h, int32_t width) const noexcept
      -> std::span<std::remove_reference_t<decltype(v[0])>> {
    const size_t head = head_index(seq, l, h);
    return {v.data() + head * capacity_ * width, static_cast<size_t>(lengths_[head]) * width};
  }

  attention_shape shape_;
  int32_t batch_, capacity_;
  std::vector<int32_t> lengths_;    // [batch][L][H]
  std::vector<int32_t> positions_;  // [batch][L][H][capacity]
  std::vector<float> metrics_;      // [batch][L][H][capacity]
  std::vector<float> keys_;         // [batch][L][H][capacity][d]
  std::vector<float> values_;       // [batch][L][H][capacity][d]
};
static_assert(kv_store<dense_cache>);

KVTRIM_NAMESPACE_END
