// A type shaped like a metric but without `using kvc_concept = kvtrim::importance_metric_tag;`
// (requirement M1) is not taken as a Metric.
// expected-diagnostic: importance_metric<Metric>.*\[with Metric = untagged_metric\]|untagged_metric.? does not satisfy .?importance_metric
#include <cstdint>
#include <span>

#include "kvtrim/kvtrim.hpp"

struct untagged_metric {
  static constexpr bool accumulates = false;
  static constexpr kvtrim::score_scope scope = kvtrim::score_scope::across_heads;
  [[nodiscard]] kvtrim::decode_accumulation decode() const { return kvtrim::decode_accumulation::none; }
  [[nodiscard]] kvtrim::status validate(const kvtrim::attention_shape&, const kvtrim::protected_set&) const {
    return kvtrim::status::success;
  }
  [[nodiscard]] int32_t stored_heads(const kvtrim::attention_shape& s) const { return s.kv_heads; }
  [[nodiscard]] kvtrim::status score(const kvtrim::layer_view&, const kvtrim::protected_set&,
                                     std::span<const std::span<float>>) const {
    return kvtrim::status::success;
  }
};

kvtrim::policy<untagged_metric, kvtrim::uniform_budget, kvtrim::topk_evictor> bad_policy;
