#pragma once
//! \file dense_view.hpp
//! A kv_store over an engine's own contiguous cache: per layer K and V [batch][H][capacity][d]
//! plus per-head lengths, the layout of engines without paging (Hugging Face, llama.cpp-like
//! loops). Every preset runs on it; eviction compacts each head in place with the same
//! MoveCache moves as the paged cache, so a head's freed tail is reusable at once, but the
//! memory stays the engine's. The view allocates nothing and owns nothing.

#include <algorithm>
#include <cstdint>
#include <span>
#include <vector>

#include "kvtrim/cache/paged_layout.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/plan/eviction_plan.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN

//! One layer of an engine's contiguous cache.
template <kv_element T>
struct dense_layer {
  std::span<T> keys;             //!< [batch][H][capacity][d]
  std::span<T> values;           //!< [batch][H][capacity][d]
  std::span<int32_t> positions;  //!< [batch][H][capacity] original position of each slot
  std::span<float> metrics;      //!< [batch][H][capacity] accumulated slot metric
  std::span<int32_t> lengths;    //!< [batch][H] tokens per head
};

template <kv_element T = float, int32_t HeadDim = dynamic_head_dim>
class dense_view {
 public:
  using kvc_concept = kv_store_tag;
  using element_type = T;
  static constexpr memory_space memory = memory_space::host;

  //! A view of nothing: contains() is false for every sequence.
  dense_view() = default;

  //! Checks the buffers of every layer against the shape (shape_mismatch), the batch and
  //! capacity (invalid_argument for < 1, or a stored length outside [0, capacity]).
  [[nodiscard]] static status create(attention_shape shape, int32_t batch, int32_t capacity,
                                     std::span<const dense_layer<T>> layers, dense_view& out) {
    if (const status s = shape.validate(); s != status::success) return s;
    if (batch < 1 || capacity < 1) return status::invalid_argument;
    if (HeadDim != dynamic_head_dim && shape.head_dim != HeadDim) return status::shape_mismatch;
    if (layers.size() != static_cast<size_t>(shape.layers)) return status::shape_mismatch;
    const size_t heads = static_cast<size_t>(batch) * static_cast<size_t>(shape.kv_heads);
    const size_t slots = heads * static_cast<size_t>(capacity);
    for (const dense_layer<T>& layer : layers) {
      if (layer.keys.size() != slots * static_cast<size_t>(shape.head_dim) || layer.values.size() != layer.keys.size() ||
          layer.positions.size() != slots || layer.metrics.size() != slots || layer.lengths.size() != heads)
        return status::shape_mismatch;
      for (const int32_t n : layer.lengths)
        if (n < 0 || n > capacity) return status::invalid_argument;
    }
    dense_view view;
    view.shape_ = shape;
    view.batch_ = batch;
    view.capacity_ = capacity;
    view.layers_.assign(layers.begin(), layers.end());
    out = std::move(view);
    return status::success;
  }

  [[nodiscard]] attention_shape shape() const noexcept { return shape_; }
  [[nodiscard]] int32_t batch() const noexcept { return batch_; }
  [[nodiscard]] int32_t capacity() const noexcept { return capacity_; }
  [[nodiscard]] int32_t head_dim() const noexcept {
    if constexpr (HeadDim != dynamic_head_dim) {
      return HeadDim;
    } else {
      return shape_.head_dim;
    }
  }
  //! Sequences are the batch rows 0 .. batch-1.
  [[nodiscard]] bool contains(int64_t seq) const noexcept { return seq >= 0 && seq < batch_; }
  [[nodiscard]] bool valid_head(int32_t l, int32_t h) const noexcept {
    return l >= 0 && l < shape_.layers && h >= 0 && h < shape_.kv_heads;
  }
  //! Tokens in head (seq, l, h); 0 for an unknown sequence or head.
  [[nodiscard]] int32_t head_length(int64_t seq, int32_t l, int32_t h) const noexcept {
    return contains(seq) && valid_head(l, h) ? layers_[static_cast<size_t>(l)].lengths[head_index(seq, h)] : 0;
  }

  //! Slot accessors of head (seq, l, h), for attention: keys/values [n][d], positions and
  //! metrics [n]. Require a known sequence and head.
  [[nodiscard]] std::span<const T> keys(int64_t seq, int32_t l, int32_t h) const noexcept { return rows(&dense_layer<T>::keys, seq, l, h, head_dim()); }
  [[nodiscard]] std::span<const T> values(int64_t seq, int32_t l, int32_t h) const noexcept { return rows(&dense_layer<T>::values, seq, l, h, head_dim()); }
  [[nodiscard]] std::span<const int32_t> positions(int64_t seq, int32_t l, int32_t h) const noexcept { return rows(&dense_layer<T>::positions, seq, l, h, 1); }
  [[nodiscard]] std::span<float> metrics(int64_t seq, int32_t l, int32_t h) noexcept { return rows(&dense_layer<T>::metrics, seq, l, h, 1); }

  //! Appends tokens to every head of one layer: positions [t]; k, v [t][H][d] fp32. Fails,
  //! changing nothing, with invalid_argument if a head would pass the capacity.
  [[nodiscard]] status append_layer(int64_t seq, int32_t layer, std::span<const int32_t> positions,
                                    std::span<const float> k, std::span<const float> v) {
    if (!contains(seq)) return status::unknown_sequence;
    if (layer < 0 || layer >= shape_.layers) return status::invalid_argument;
    return append_layers(seq, layer, 1, positions, k, v);
  }
  //! Appends tokens to every layer: positions [t]; k, v [L][t][H][d] fp32.
  [[nodiscard]] status append(int64_t seq, std::span<const int32_t> positions, std::span<const float> k,
                              std::span<const float> v) {
    if (!contains(seq)) return status::unknown_sequence;
    return append_layers(seq, 0, shape_.layers, positions, k, v);
  }

  //! Empties every head of a sequence (the engine reuses its row).
  [[nodiscard]] status clear(int64_t seq) {
    if (!contains(seq)) return status::unknown_sequence;
    for (dense_layer<T>& layer : layers_)
      for (int32_t h = 0; h < shape_.kv_heads; ++h) layer.lengths[head_index(seq, h)] = 0;
    return status::success;
  }

  //! S6: positions [n], keys [n][d] fp32, metric [n] of head (seq, l, h) in slot order.
  [[nodiscard]] status read_head(int64_t seq, int32_t l, int32_t h, std::span<int32_t> positions,
                                 std::span<float> keys, std::span<float> metric) const {
    if (!contains(seq)) return status::unknown_sequence;
    if (!valid_head(l, h)) return status::invalid_argument;
    const size_t n = static_cast<size_t>(head_length(seq, l, h)), d = static_cast<size_t>(head_dim());
    if (positions.size() != n || keys.size() != n * d || metric.size() != n) return status::shape_mismatch;
    const auto p = this->positions(seq, l, h);
    const auto m = rows(&dense_layer<T>::metrics, seq, l, h, 1);
    const auto k = this->keys(seq, l, h);
    std::copy(p.begin(), p.end(), positions.begin());
    std::copy(m.begin(), m.end(), metric.begin());
    std::transform(k.begin(), k.end(), keys.begin(), [](T x) { return to_float(x); });
    return status::success;
  }

  //! Values [n][d] fp32 of head (seq, l, h) in slot order.
  [[nodiscard]] status read_values(int64_t seq, int32_t l, int32_t h, std::span<float> values) const {
    if (!contains(seq)) return status::unknown_sequence;
    if (!valid_head(l, h)) return status::invalid_argument;
    const auto v = this->values(seq, l, h);
    if (values.size() != v.size()) return status::shape_mismatch;
    std::transform(v.begin(), v.end(), values.begin(), [](T x) { return to_float(x); });
    return status::success;
  }

  //! S8: overwrites positions [n] and keys [n][d] (fp32, rounded to T) of head (seq, l, h).
  [[nodiscard]] status rewrite_head(int64_t seq, int32_t l, int32_t h, std::span<const int32_t> positions,
                                    std::span<const float> keys) {
    if (!contains(seq)) return status::unknown_sequence;
    if (!valid_head(l, h)) return status::invalid_argument;
    const size_t n = static_cast<size_t>(head_length(seq, l, h)), d = static_cast<size_t>(head_dim());
    if (positions.size() != n || keys.size() != n * d) return status::shape_mismatch;
    for (const int32_t p : positions)
      if (p < 0 || p > max_position) return status::invalid_argument;
    const auto p = rows(&dense_layer<T>::positions, seq, l, h, 1);
    const auto k = rows(&dense_layer<T>::keys, seq, l, h, head_dim());
    std::copy(positions.begin(), positions.end(), p.begin());
    std::transform(keys.begin(), keys.end(), k.begin(), [](float x) { return from_float<T>(x); });
    return status::success;
  }

  //! S7: writes the plan's metrics, then compacts every head of `seq` to its kept slots with
  //! MoveCache moves. invalid_plan if the plan does not match the current heads.
  [[nodiscard]] status apply(int64_t seq, const eviction_plan& plan) {
    if (!contains(seq)) return status::unknown_sequence;
    if (plan.layers() != shape_.layers || plan.heads() != shape_.kv_heads) return status::invalid_plan;
    current_.resize(static_cast<size_t>(shape_.layers) * static_cast<size_t>(shape_.kv_heads));
    for (int32_t l = 0; l < shape_.layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h)
        current_[static_cast<size_t>(l) * shape_.kv_heads + h] = head_length(seq, l, h);
    if (const status s = plan.validate(current_); s != status::success) return s;
    compaction_moves(plan, moves_, move_offsets_);  // every allocation, before anything changes
    const auto d = static_cast<size_t>(head_dim());
    for (int32_t l = 0; l < shape_.layers; ++l) {
      dense_layer<T>& layer = layers_[static_cast<size_t>(l)];
      for (int32_t h = 0; h < shape_.kv_heads; ++h) {
        const size_t base = head_index(seq, h) * static_cast<size_t>(capacity_);
        if (!plan.metrics.empty()) {
          const auto m = plan.metrics.row(l, h);
          std::copy(m.begin(), m.end(), layer.metrics.begin() + static_cast<std::ptrdiff_t>(base));
        }
        const size_t i = static_cast<size_t>(l) * static_cast<size_t>(shape_.kv_heads) + static_cast<size_t>(h);
        for (size_t m = move_offsets_[i]; m < move_offsets_[i + 1]; ++m) {
          const slot_move& mv = moves_[m];
          const size_t dst = base + static_cast<size_t>(mv.dst), src = base + static_cast<size_t>(mv.src);
          std::copy_n(layer.keys.begin() + static_cast<std::ptrdiff_t>(src * d), d, layer.keys.begin() + static_cast<std::ptrdiff_t>(dst * d));
          std::copy_n(layer.values.begin() + static_cast<std::ptrdiff_t>(src * d), d, layer.values.begin() + static_cast<std::ptrdiff_t>(dst * d));
          layer.positions[dst] = layer.positions[src];
          layer.metrics[dst] = layer.metrics[src];
        }
        layer.lengths[head_index(seq, h)] = plan.kept_count(l, h);
      }
    }
    return status::success;
  }

 private:
  [[nodiscard]] size_t head_index(int64_t seq, int32_t h) const noexcept {
    return static_cast<size_t>(seq) * static_cast<size_t>(shape_.kv_heads) + static_cast<size_t>(h);
  }
  //! The first `length * width` elements of head (seq, l, h) in one of a layer's slot arrays.
  template <class E>
  [[nodiscard]] std::span<E> rows(std::span<E> dense_layer<T>::*member, int64_t seq, int32_t l, int32_t h,
                                  int32_t width) const noexcept {
    const dense_layer<T>& layer = layers_[static_cast<size_t>(l)];
    const size_t head = head_index(seq, h);
    const size_t stride = static_cast<size_t>(capacity_) * static_cast<size_t>(width);
    return (layer.*member).subspan(head * stride, static_cast<size_t>(layer.lengths[head]) * static_cast<size_t>(width));
  }

  [[nodiscard]] status append_layers(int64_t seq, int32_t first, int32_t layers, std::span<const int32_t> positions,
                                     std::span<const float> k, std::span<const float> v) {
    const auto tokens = static_cast<int32_t>(positions.size());
    if (tokens == 0) return status::invalid_argument;
    for (const int32_t p : positions)
      if (p < 0 || p > max_position) return status::invalid_argument;
    const size_t d = static_cast<size_t>(head_dim()), heads = static_cast<size_t>(shape_.kv_heads);
    if (k.size() != static_cast<size_t>(layers) * static_cast<size_t>(tokens) * heads * d || v.size() != k.size())
      return status::shape_mismatch;
    for (int32_t l = first; l < first + layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h)
        if (head_length(seq, l, h) > capacity_ - tokens) return status::invalid_argument;
    for (int32_t l = first; l < first + layers; ++l) {
      dense_layer<T>& layer = layers_[static_cast<size_t>(l)];
      for (int32_t h = 0; h < shape_.kv_heads; ++h) {
        const size_t head = head_index(seq, h);
        for (int32_t t = 0; t < tokens; ++t) {
          const size_t slot = head * static_cast<size_t>(capacity_) + static_cast<size_t>(layer.lengths[head] + t);
          const size_t row = ((static_cast<size_t>(l - first) * static_cast<size_t>(tokens) + static_cast<size_t>(t)) * heads +
                              static_cast<size_t>(h)) * d;
          for (size_t c = 0; c < d; ++c) {
            layer.keys[slot * d + c] = from_float<T>(k[row + c]);
            layer.values[slot * d + c] = from_float<T>(v[row + c]);
          }
          layer.positions[slot] = positions[static_cast<size_t>(t)];
          layer.metrics[slot] = 0.f;
        }
        layer.lengths[head] += tokens;
      }
    }
    return status::success;
  }

  attention_shape shape_{};
  int32_t batch_ = 0, capacity_ = 0;
  std::vector<dense_layer<T>> layers_;  // [L] the engine's buffers
  std::vector<int32_t> current_;        // scratch: [L][H] lengths of the sequence being compressed
  std::vector<slot_move> moves_;        // scratch: every head's compaction moves
  std::vector<size_t> move_offsets_;    // scratch: [L * H + 1] each head's first move
};
static_assert(kv_store<dense_view<float>>);
static_assert(kv_store<dense_view<bfloat16, 64>>);

KVTRIM_NAMESPACE_END
