#pragma once
//! \file attention.hpp
//! Decode attention on the CPU over one KV head's slots, optionally accumulating each key's
//! probability into its slot metric in the same pass (H2O sum, KV-Compress squared sum):
//! the scores that fused attention kernels of the references cannot give.

#include <algorithm>
#include <concepts>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kvtrim/cache/dense_cache.hpp"
#include "kvtrim/cache/slot_mover.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cpu {
namespace detail {

//! attend_head over the slots of `head` in pool arrays keys, values [slots][d] and metrics
//! [slots]: the G query heads `q` [G][d] -> `out` [G][d]; with `acc` != none, each slot's
//! metric += the group reduction of p or p^2. `scratch` holds [G][n] probabilities.
//! Requires a non-empty head and q, out of G * d (check_decode).
template <int32_t HeadDim, kv_element T>
void attend_slots(std::span<const float> q, int32_t group, int32_t head_dim, const head_slots& head,
                                  const T* keys, const T* values, float* metrics, std::span<float> out,
                                  decode_accumulation acc, gqa_reduce reduce, std::vector<float>& scratch) {
  const auto d = static_cast<size_t>(HeadDim != dynamic_head_dim ? HeadDim : head_dim);
  const auto n = static_cast<size_t>(head.length);
  const float sqrt_d = std::sqrt(static_cast<float>(d));
  scratch.assign(static_cast<size_t>(group) * n, 0.f);  // [G][n] probabilities
  for (int32_t g = 0; g < group; ++g) {
    const float* qg = q.data() + static_cast<size_t>(g) * d;
    float* p = scratch.data() + static_cast<size_t>(g) * n;
    float max_logit = -std::numeric_limits<float>::infinity();
    head.for_each([&](int32_t j, int64_t slot) {
      const T* k = keys + static_cast<size_t>(slot) * d;
      float dot = 0.f;
      for (size_t c = 0; c < d; ++c) dot += qg[c] * to_float(k[c]);
      p[j] = dot / sqrt_d;
      max_logit = std::max(max_logit, p[j]);
    });
    float denom = 0.f;
    for (size_t j = 0; j < n; ++j) {
      p[j] = std::exp(p[j] - max_logit);
      denom += p[j];
    }
    float* o = out.data() + static_cast<size_t>(g) * d;
    std::fill(o, o + d, 0.f);
    head.for_each([&](int32_t j, int64_t slot) {
      p[j] /= denom;
      const T* v = values + static_cast<size_t>(slot) * d;
      for (size_t c = 0; c < d; ++c) o[c] += p[j] * to_float(v[c]);
    });
  }
  if (acc == decode_accumulation::none) return;
  head.for_each([&](int32_t j, int64_t slot) {
    float v = 0.f;
    for (int32_t g = 0; g < group; ++g) {
      float x = scratch[static_cast<size_t>(g) * n + static_cast<size_t>(j)];
      if (acc == decode_accumulation::squared_sum) x *= x;
      v = (reduce == gqa_reduce::max) ? (g == 0 ? x : std::max(v, x)) : v + x;
    }
    if (reduce == gqa_reduce::mean) v /= static_cast<float>(group);
    metrics[slot] += v;
  });
}

//! Sizes `scratch` for the [G][n] probabilities of the layer's longest head, so that a layer's
//! only allocation comes before its first head changes a metric or an output: a failed
//! allocation (std::bad_alloc) then leaves the store as it was.
template <kv_store S>
void reserve_decode_scratch(const S& store, int64_t seq, int32_t layer, int32_t group, std::vector<float>& scratch) {
  size_t longest = 0;
  for (int32_t h = 0; h < store.shape().kv_heads; ++h)
    longest = std::max(longest, static_cast<size_t>(store.head_length(seq, layer, h)));
  scratch.reserve(static_cast<size_t>(group) * longest);
}

//! The checks decode_attention makes before touching any metric; `group` receives
//! Hq / stored heads. empty_sequence if any head of the layer is empty.
template <kv_store S>
[[nodiscard]] status check_decode(const S& store, int64_t seq, int32_t layer, int32_t q_heads,
                                  std::span<const float> q, std::span<const float> out, int32_t& group) {
  if (!store.contains(seq)) return status::unknown_sequence;
  const attention_shape shape = store.shape();
  if (layer < 0 || layer >= shape.layers) return status::invalid_argument;
  if (q_heads < shape.kv_heads || q_heads % shape.kv_heads != 0) return status::invalid_group;
  const size_t size = static_cast<size_t>(q_heads) * static_cast<size_t>(shape.head_dim);
  if (q.size() != size || out.size() != size) return status::shape_mismatch;
  for (int32_t h = 0; h < shape.kv_heads; ++h)
    if (store.head_length(seq, layer, h) == 0) return status::empty_sequence;
  group = q_heads / shape.kv_heads;
  return status::success;
}

}  // namespace detail

//! Attention of the G query heads `q` [G][d] that share one KV head over its n slots
//! `keys`, `values` [n][d] (any slot order), written to `out` [G][d], scaled by 1/sqrt(d).
//! With `acc` != none, `metric` [n] += the group reduction (`reduce`) of p or p^2.
//! `scratch` is reused between calls to avoid allocation.
[[nodiscard]] inline status attend_head(std::span<const float> q, int32_t group, int32_t head_dim,
                                        std::span<const float> keys, std::span<const float> values,
                                        std::span<float> out, decode_accumulation acc, gqa_reduce reduce,
                                        std::span<float> metric, std::vector<float>& scratch) {
  const auto d = static_cast<size_t>(head_dim);
  const size_t n = keys.size() / (d == 0 ? 1 : d);
  if (group < 1 || head_dim < 1 || q.size() != static_cast<size_t>(group) * d || out.size() != q.size() ||
      keys.size() != n * d || values.size() != keys.size() ||
      (acc != decode_accumulation::none && metric.size() != n))
    return status::shape_mismatch;
  if (n == 0) return status::empty_sequence;
  const int32_t whole_head = 0;  // the n slots are one contiguous "block"
  const head_slots head{{&whole_head, 1}, static_cast<int32_t>(n), static_cast<int32_t>(n)};
  detail::attend_slots<dynamic_head_dim>(q, group, head_dim, head, keys.data(), values.data(), metric.data(), out,
                                         acc, reduce, scratch);
  return status::success;
}

//! Decode attention of one layer of `seq` in a dense cache: q [Hq][d] -> out [Hq][d].
//! Query head i reads stored head i / (Hq / stored heads), so the query-head compatibility
//! mode (stored heads = Hq) works unchanged. Everything is checked before any metric changes.
[[nodiscard]] inline status decode_attention(dense_cache& cache, int64_t seq, int32_t layer, int32_t q_heads,
                                             std::span<const float> q, std::span<float> out,
                                             decode_accumulation acc, gqa_reduce reduce,
                                             std::vector<float>& scratch) {
  int32_t group = 0;
  if (const status s = detail::check_decode(cache, seq, layer, q_heads, q, out, group); s != status::success) return s;
  detail::reserve_decode_scratch(cache, seq, layer, group, scratch);
  const attention_shape shape = cache.shape();
  const auto width = static_cast<size_t>(group) * static_cast<size_t>(shape.head_dim);
  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    const size_t off = static_cast<size_t>(h) * width;
    const status s = attend_head(q.subspan(off, width), group, shape.head_dim, cache.keys(seq, layer, h),
                                 cache.values(seq, layer, h), out.subspan(off, width), acc, reduce,
                                 cache.metrics(seq, layer, h), scratch);
    if (s != status::success) return s;
  }
  return status::success;
}

}  // namespace cpu
KVTRIM_NAMESPACE_END
