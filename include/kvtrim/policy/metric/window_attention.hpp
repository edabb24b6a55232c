#pragma once
//! \file window_attention.hpp
//! Observation-window attention scores (SnapKV §3, PyramidKV §4, Ada-KV §5, KV-Compress §6
//! prefill, H2O §2 prefill; sections of docs/reference-algorithms.md).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <vector>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

//! How the observed queries' probabilities are combined per key.
enum class query_aggregation : uint8_t {
  sum,  //!< SnapKV, PyramidKV, H2O, KV-Compress
  mean  //!< Ada-KV (both references), kvpress
};

//! Smoothing along the key axis, stride 1, padding kernel/2, as torch's pool1d.
enum class pooling : uint8_t {
  none,
  max,  //!< pads with -inf: padding never wins
  avg   //!< count_include_pad: the divisor is always the kernel, edges are damped
};

//! How the G query heads of a KV head become one score row.
enum class gqa_reduce : uint8_t {
  mean,
  max,
  sum,
  //! Compatibility mode: no reduction, one row per QUERY head, as the references that run
  //! `repeat_kv` before compressing store G copies. The store must then hold Hq heads.
  per_query_head
};

//! Whether the group reduction happens before pooling (KVCache-Factory, AdaKV) or after
//! (kvpress; KV-Compress pools each query head, then sums).
enum class reduce_order : uint8_t { before_pool, after_pool };

//! Which keys are pooled together.
enum class pool_range : uint8_t {
  evictable_prefix,  //!< keys before the recent window only (SnapKV family: the window is cut off first)
  all_keys           //!< every key (KV-Compress pools the whole metric)
};

//! Window attention metric: softmax (fp32, over all keys, causal by position) of each
//! observed query against the head's keys, aggregated per key, GQA-reduced and pooled.
struct window_attention {
  using kvc_concept = importance_metric_tag;
  static constexpr bool accumulates = false;
  static constexpr score_scope scope = score_scope::across_heads;

  query_aggregation aggregation = query_aggregation::sum;
  bool squared = false;  //!< aggregate p^2 instead of p (KV-Compress L2)
  pooling pool = pooling::max;
  int32_t kernel = 7;
  gqa_reduce reduce = gqa_reduce::mean;
  reduce_order order = reduce_order::before_pool;
  pool_range range = pool_range::evictable_prefix;
  //! KV-Compress `metric_collection_buffer_size`: a key contributes to a query's score only
  //! if key_position <= query_position - buffer (the softmax still sees it).
  int32_t buffer = 0;

  [[nodiscard]] decode_accumulation decode() const noexcept { return decode_accumulation::none; }

  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    if (const status s = shape.validate(); s != status::success) return s;
    if (const status s = protect.validate(); s != status::success) return s;
    if (pool != pooling::none && (kernel < 1 || kernel % 2 == 0)) return status::invalid_pool_kernel;
    if (buffer < 0) return status::invalid_argument;
    return status::success;
  }

  [[nodiscard]] int32_t stored_heads(const attention_shape& shape) const noexcept {
    return reduce == gqa_reduce::per_query_head ? shape.q_heads : shape.kv_heads;
  }

  [[nodiscard]] status score(const layer_view& layer, const protected_set& protect,
                             std::span<const std::span<float>> out) const {
    const attention_shape& shape = layer.shape;
    const int32_t heads = stored_heads(shape);
    if (static_cast<int32_t>(layer.heads.size()) != heads || static_cast<int32_t>(out.size()) != heads)
      return status::shape_mismatch;
    const int32_t rows = layer.observation.rows();
    const auto d = static_cast<size_t>(shape.head_dim);
    if (layer.observation.queries.size() != static_cast<size_t>(rows) * shape.q_heads * d)
      return status::shape_mismatch;
    for (int32_t h = 0; h < heads; ++h) {
      const head_view& head = layer.heads[static_cast<size_t>(h)];
      if (head.keys.size() != static_cast<size_t>(head.size()) * d || out[static_cast<size_t>(h)].size() != static_cast<size_t>(head.size()))
        return status::shape_mismatch;
      if (head.size() == 0) return status::empty_sequence;
      if (rows > head.size()) return status::window_too_large;
    }
    if (rows == 0) return status::window_too_large;
    for (const float q : layer.observation.queries)
      if (!std::isfinite(q)) return status::non_finite_input;

    const int32_t group = shape.group();
    const int32_t per_row = reduce == gqa_reduce::per_query_head ? 1 : group;
    std::vector<float> per_query;  // [per_row][n] aggregated probabilities of each query head
    std::vector<float> pooled;
    for (int32_t h = 0; h < heads; ++h) {
      const head_view& head = layer.heads[static_cast<size_t>(h)];
      const auto n = static_cast<size_t>(head.size());
      for (const float k : head.keys)
        if (!std::isfinite(k)) return status::non_finite_input;
      const std::vector<int32_t> by_position = position_order(head.positions);
      const size_t pooled_len = range == pool_range::all_keys ? n : prefix_length(head, protect, by_position);
      per_query.assign(static_cast<size_t>(per_row) * n, 0.f);
      for (int32_t g = 0; g < per_row; ++g) {
        const int32_t q_head = reduce == gqa_reduce::per_query_head ? h : h * group + g;
        aggregate_query_head(layer.observation, q_head, shape, head, {per_query.data() + g * n, n});
      }
      std::span<float> result = out[static_cast<size_t>(h)];
      if (order_is_before_pool()) {
        reduce_group(per_query, per_row, n, result);
        pool_in_place(result, by_position, pooled_len, pooled);
      } else {
        for (int32_t g = 0; g < per_row; ++g) pool_in_place({per_query.data() + g * n, n}, by_position, pooled_len, pooled);
        reduce_group(per_query, per_row, n, result);
      }
    }
    return status::success;
  }

 private:
  [[nodiscard]] bool order_is_before_pool() const noexcept {
    return order == reduce_order::before_pool || reduce == gqa_reduce::per_query_head;
  }

  //! Slots sorted by position: pooling neighbours are position neighbours.
  [[nodiscard]] static std::vector<int32_t> position_order(std::span<const int32_t> positions) {
    std::vector<int32_t> order(positions.size());
    std::iota(order.begin(), order.end(), 0);
    if (!std::is_sorted(positions.begin(), positions.end()))
      std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return positions[a] < positions[b]; });
    return order;
  }

  //! Number of keys (in position order) before the recent window.
  [[nodiscard]] static size_t prefix_length(const head_view& head, const protected_set& protect,
                                            std::span<const int32_t> by_position) {
    const int32_t next = head.next_position();
    size_t m = 0;
    while (m < by_position.size() && head.positions[static_cast<size_t>(by_position[m])] < next - protect.recent) ++m;
    return m;
  }

  //! acc[j] = aggregate over observed rows of p(row -> key j) (or p^2), causal by position.
  void aggregate_query_head(const query_view& obs, int32_t q_head, const attention_shape& shape,
                            const head_view& head, std::span<float> acc) const {
    const auto d = static_cast<size_t>(shape.head_dim);
    const size_t n = acc.size();
    const float sqrt_d = std::sqrt(static_cast<float>(shape.head_dim));
    std::vector<float> logits(n);
    const int32_t rows = obs.rows();
    for (int32_t r = 0; r < rows; ++r) {
      const float* q = obs.queries.data() + (static_cast<size_t>(r) * shape.q_heads + q_head) * d;
      const int32_t q_pos = obs.positions[static_cast<size_t>(r)];
      float max_logit = -std::numeric_limits<float>::infinity();
      for (size_t j = 0; j < n; ++j) {
        if (head.positions[j] > q_pos) continue;
        const float* k = head.keys.data() + j * d;
        float dot = 0.f;
        for (size_t c = 0; c < d; ++c) dot += q[c] * k[c];
        logits[j] = dot / sqrt_d;  // the HF references divide by sqrt(d)
        max_logit = std::max(max_logit, logits[j]);
      }
      if (max_logit == -std::numeric_limits<float>::infinity()) continue;  // sees no key
      float denom = 0.f;
      for (size_t j = 0; j < n; ++j) {
        if (head.positions[j] > q_pos) continue;
        logits[j] = std::exp(logits[j] - max_logit);
        denom += logits[j];
      }
      for (size_t j = 0; j < n; ++j) {
        if (static_cast<int64_t>(head.positions[j]) > static_cast<int64_t>(q_pos) - buffer) continue;  // no overflow
        const float p = logits[j] / denom;
        acc[j] += squared ? p * p : p;
      }
    }
    if (aggregation == query_aggregation::mean)
      for (float& a : acc) a /= static_cast<float>(rows);
  }

  void reduce_group(std::span<const float> per_query, int32_t per_row, size_t n, std::span<float> result) const {
    for (size_t j = 0; j < n; ++j) {
      float v = per_query[j];
      for (int32_t g = 1; g < per_row; ++g) {
        const float x = per_query[g * n + j];
        v = reduce == gqa_reduce::max ? std::max(v, x) : v + x;
      }
      if (reduce == gqa_reduce::mean) v /= static_cast<float>(per_row);
      result[j] = v;
    }
  }

  //! Pools the first `len` keys in position order; the rest keep their raw value.
  void pool_in_place(std::span<float> values, std::span<const int32_t> by_position, size_t len,
                     std::vector<float>& scratch) const {
    if (pool == pooling::none || kernel == 1 || len == 0) return;
    scratch.resize(len);
    const auto half = static_cast<std::ptrdiff_t>(kernel / 2);
    const auto m = static_cast<std::ptrdiff_t>(len);
    for (std::ptrdiff_t i = 0; i < m; ++i) {
      float v = pool == pooling::max ? -std::numeric_limits<float>::infinity() : 0.f;
      for (std::ptrdiff_t t = std::max<std::ptrdiff_t>(0, i - half); t <= std::min(m - 1, i + half); ++t) {
        const float x = values[static_cast<size_t>(by_position[static_cast<size_t>(t)])];
        v = pool == pooling::max ? std::max(v, x) : v + x;
      }
      scratch[static_cast<size_t>(i)] = pool == pooling::avg ? v / static_cast<float>(kernel) : v;
    }
    for (size_t i = 0; i < len; ++i) values[static_cast<size_t>(by_position[i])] = scratch[i];
  }
};
static_assert(importance_metric<window_attention>);

KVTRIM_NAMESPACE_END
