#pragma once
//! \file accumulated_attention.hpp
//! Attention mass accumulated in the slot metric over the life of a sequence: H2O's heavy
//! hitters (§2, sum or normalised sum of probabilities) and KV-Compress's squared-attention
//! metric (§6, L2-sum). An observation (the prompt's queries at prefill) adds its window
//! attention scores; each decode step adds what the decode attention saw.

#include <cstdint>
#include <span>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN

//! How the accumulated metric is ranked.
enum class accumulation_norm : uint8_t {
  sum,      //!< H2O: plain sum over every query that attended
  norm_sum  //!< divided by the number of queries that could see the key (next_position - position)
};

struct accumulated_attention {
  using kvc_concept = importance_metric_tag;
  static constexpr bool accumulates = true;
  static constexpr score_scope scope = score_scope::across_heads;

  //! How an observation (e.g. all prompt queries for H2O, the last 32 for KV-Compress) is
  //! scored before it is added to the slot metric.
  window_attention observation{.aggregation = query_aggregation::sum,
                               .squared = false,
                               .pool = pooling::none,
                               .kernel = 1,
                               .reduce = gqa_reduce::mean,
                               .order = reduce_order::before_pool,
                               .range = pool_range::all_keys};
  accumulation_norm norm = accumulation_norm::sum;

  //! Decode steps add p (H2O) or p^2 (KV-Compress), reduced over the group as the observation is.
  [[nodiscard]] decode_accumulation decode() const noexcept {
    return observation.squared ? decode_accumulation::squared_sum : decode_accumulation::sum;
  }
  [[nodiscard]] status validate(const attention_shape& shape, const protected_set& protect) const noexcept {
    return observation.validate(shape, protect);
  }
  [[nodiscard]] int32_t stored_heads(const attention_shape& shape) const noexcept {
    return observation.stored_heads(shape);
  }
  [[nodiscard]] status score(const layer_view& layer, const protected_set& protect,
                             std::span<const std::span<float>> out) const {
    return observation.score(layer, protect, out);
  }
  [[nodiscard]] KVTRIM_HOST_DEVICE float rank_score(float metric, int32_t position, int32_t next_position) const noexcept {
    if (norm == accumulation_norm::sum) return metric;
    const int32_t queries = next_position - position;
    return queries > 0 ? metric / static_cast<float>(queries) : metric;
  }
};
static_assert(importance_metric<accumulated_attention>);

KVTRIM_NAMESPACE_END
