// Control: the good versions of the bad compositions beside it must compile, so a failing
// build there is the rule's doing, not the harness's.
#include <cstdint>
#include <span>
#include <vector>

#include "fake_store.hpp"
#include "kvtrim/kvtrim.hpp"

// C1 satisfied: adaptive budgets over an attention metric (Ada-KV).
kvtrim::policy<kvtrim::window_attention, kvtrim::adaptive_budget<>, kvtrim::topk_evictor> good_policy;

// C2 satisfied: a per-layer allocator runs layer by layer.
kvtrim::status compress_first_layer(kvtrim::dense_cache& cache, const kvtrim::attention_shape& model) {
  const std::vector<float> queries;
  const std::vector<int32_t> positions;
  return kvtrim::cpu::compress_layer(kvtrim::snapkv(), cache, 0, model, 0, queries, positions);
}

// C3 satisfied: a host store on the CPU backend.
kvtrim::status compress_host(fake_store<kvtrim::memory_space::host>& store, const kvtrim::attention_shape& model) {
  return kvtrim::cpu::compress(kvtrim::kv_compress(), store, 0, model, kvtrim::cpu::observation{});
}

// M1 satisfied: the same shape with the tag is a metric.
struct tagged_metric {
  using kvc_concept = kvtrim::importance_metric_tag;
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
kvtrim::policy<tagged_metric, kvtrim::uniform_budget, kvtrim::topk_evictor> good_custom_policy;
