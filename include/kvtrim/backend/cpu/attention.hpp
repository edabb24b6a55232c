#pragma once
//! \file attention.hpp
//! Decode attention on the CPU over one KV head's slots, optionally accumulating each key's
//! probability into its slot metric in the same pass (H2O sum, KV-Compress squared sum):
//! the scores that fused attention kernels of the references cannot give.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <vector>

#include "kvtrim/cache/dense_cache.hpp"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cpu {

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
  const float sqrt_d = std::sqrt(static_cast<float>(head_dim));
  scratch.assign(static_cast<size_t>(group) * n, 0.f);  // [G][n] probabilities
  for (int32_t g = 0; g < group; ++g) {
    const float* qg = q.data() + static_cast<size_t>(g) * d;
    float* p = scratch.data() + static_cast<size_t>(g) * n;
    float max_logit = -std::numeric_limits<float>::infinity();
    for (size_t j = 0; j < n; ++j) {
      float dot = 0.f;
      for (size_t c = 0; c < d; ++c) dot += qg[c] * keys[j * d + c];
      p[j] = dot / sqrt_d;
      max_logit = std::max(max_logit, p[j]);
    }
    float denom = 0.f;
    for (size_t j = 0; j < n; ++j) {
      p[j] = std::exp(p[j] - max_logit);
      denom += p[j];
    }
    float* o = out.data() + static_cast<size_t>(g) * d;
    std::fill(o, o + d, 0.f);
    for (size_t j = 0; j < n; ++j) {
      p[j] /= denom;
      for (size_t c = 0; c < d; ++c) o[c] += p[j] * values[j * d + c];
    }
  }
  if (acc == decode_accumulation::none) return status::success;
  for (size_t j = 0; j < n; ++j) {
    float v = 0.f;
    for (int32_t g = 0; g < group; ++g) {
      float x = scratch[static_cast<size_t>(g) * n + j];
      if (acc == decode_accumulation::squared_sum) x *= x;
      v = (reduce == gqa_reduce::max) ? (g == 0 ? x : std::max(v, x)) : v + x;
    }
    if (reduce == gqa_reduce::mean) v /= static_cast<float>(group);
    metric[j] += v;
  }
  return status::success;
}

//! Decode attention of one layer of `seq` in a dense cache: q [Hq][d] -> out [Hq][d].
//! Query head i reads stored head i / (Hq / stored heads), so the query-head compatibility
//! mode (stored heads = Hq) works unchanged.
[[nodiscard]] inline status decode_attention(dense_cache& cache, int64_t seq, int32_t layer, int32_t q_heads,
                                             std::span<const float> q, std::span<float> out,
                                             decode_accumulation acc, gqa_reduce reduce,
                                             std::vector<float>& scratch) {
  const attention_shape shape = cache.shape();
  if (!cache.contains(seq)) return status::unknown_sequence;
  if (layer < 0 || layer >= shape.layers) return status::invalid_argument;
  if (q_heads < shape.kv_heads || q_heads % shape.kv_heads != 0) return status::invalid_group;
  const auto d = static_cast<size_t>(shape.head_dim);
  if (q.size() != static_cast<size_t>(q_heads) * d || out.size() != q.size()) return status::shape_mismatch;
  const int32_t group = q_heads / shape.kv_heads;
  // Every head is checked before any metric is touched, so a failed call changes nothing.
  for (int32_t h = 0; h < shape.kv_heads; ++h)
    if (cache.head_length(seq, layer, h) == 0) return status::empty_sequence;
  for (int32_t h = 0; h < shape.kv_heads; ++h) {
    const size_t off = static_cast<size_t>(h) * group * d;
    const status s = attend_head(q.subspan(off, group * d), group, shape.head_dim, cache.keys(seq, layer, h),
                                 cache.values(seq, layer, h), out.subspan(off, group * d), acc, reduce,
                                 cache.metrics(seq, layer, h), scratch);
    if (s != status::success) return s;
  }
  return status::success;
}

}  // namespace cpu
KVTRIM_NAMESPACE_END
