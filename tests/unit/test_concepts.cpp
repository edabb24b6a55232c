// STATIC_REQUIRE tests for every concept in concepts.hpp (house style rule 10): the library's
// own parts model their concept and no other, and archetypes that miss one numbered
// requirement (the tag, a member, a return type) are rejected.
#include <catch2/catch.hpp>
#include <cstdint>
#include <span>

#include "kvtrim/kvtrim.hpp"

namespace {

using kvtrim::attention_shape;
using kvtrim::candidate_table;
using kvtrim::eviction_plan;
using kvtrim::layer_view;
using kvtrim::protected_set;
using kvtrim::status;

// ---- importance_metric archetypes (requirements M1-M8)

//! Everything a non-accumulating metric needs except the tag (M2-M7).
struct metric_members {
  static constexpr bool accumulates = false;
  static constexpr kvtrim::score_scope scope = kvtrim::score_scope::across_heads;
  [[nodiscard]] kvtrim::decode_accumulation decode() const { return kvtrim::decode_accumulation::none; }
  [[nodiscard]] status validate(const attention_shape&, const protected_set&) const { return status::success; }
  [[nodiscard]] int32_t stored_heads(const attention_shape& s) const { return s.kv_heads; }
  [[nodiscard]] status score(const layer_view&, const protected_set&, std::span<const std::span<float>>) const {
    return status::success;
  }
};
struct metric_archetype : metric_members {
  using kvc_concept = kvtrim::importance_metric_tag;
};
struct derived_metric_tag : kvtrim::importance_metric_tag {};
struct metric_with_derived_tag : metric_members {
  using kvc_concept = derived_metric_tag;
};
struct metric_without_tag : metric_members {};                        // M1
struct metric_with_wrong_tag : metric_members {                       // M1
  using kvc_concept = kvtrim::evictor_tag;
};
struct metric_with_bool_score : metric_archetype {                    // M7: wrong return type
  [[nodiscard]] bool score(const layer_view&, const protected_set&, std::span<const std::span<float>>) const {
    return true;
  }
};
struct metric_with_int_decode : metric_archetype {                    // M4: wrong return type
  [[nodiscard]] int decode() const { return 0; }
};
struct metric_without_score {                                         // M7: missing member
  using kvc_concept = kvtrim::importance_metric_tag;
  static constexpr bool accumulates = false;
  static constexpr kvtrim::score_scope scope = kvtrim::score_scope::within_head;
  [[nodiscard]] kvtrim::decode_accumulation decode() const { return kvtrim::decode_accumulation::none; }
  [[nodiscard]] status validate(const attention_shape&, const protected_set&) const { return status::success; }
  [[nodiscard]] int32_t stored_heads(const attention_shape& s) const { return s.kv_heads; }
};
struct metric_without_scope {                                         // M3: missing member
  using kvc_concept = kvtrim::importance_metric_tag;
  static constexpr bool accumulates = false;
  [[nodiscard]] kvtrim::decode_accumulation decode() const { return kvtrim::decode_accumulation::none; }
  [[nodiscard]] status validate(const attention_shape&, const protected_set&) const { return status::success; }
  [[nodiscard]] int32_t stored_heads(const attention_shape& s) const { return s.kv_heads; }
  [[nodiscard]] status score(const layer_view&, const protected_set&, std::span<const std::span<float>>) const {
    return status::success;
  }
};
struct accumulating_metric_without_rank : metric_archetype {          // M8: missing member
  static constexpr bool accumulates = true;
};
struct accumulating_metric : accumulating_metric_without_rank {
  [[nodiscard]] float rank_score(float metric, int32_t, int32_t) const { return metric; }
};
struct metric_not_copyable : metric_archetype {                       // copy_constructible
  metric_not_copyable() = default;
  metric_not_copyable(const metric_not_copyable&) = delete;
};

// ---- budget_allocator archetypes (B1-B5)

struct allocator_members {
  static constexpr kvtrim::allocation_scope scope = kvtrim::allocation_scope::per_layer;
  static constexpr bool needs_scores = false;
  [[nodiscard]] status validate(const attention_shape&, const protected_set&) const { return status::success; }
  [[nodiscard]] status allocate(const candidate_table&, const kvtrim::allocation_context&, std::span<int32_t>) const {
    return status::success;
  }
};
struct allocator_archetype : allocator_members {
  using kvc_concept = kvtrim::budget_allocator_tag;
};
struct allocator_without_tag : allocator_members {};                  // B1
struct allocator_with_int_allocate : allocator_archetype {            // B5: wrong return type
  [[nodiscard]] int allocate(const candidate_table&, const kvtrim::allocation_context&, std::span<int32_t>) const {
    return 0;
  }
};
struct allocator_without_allocate {                                   // B5: missing member
  using kvc_concept = kvtrim::budget_allocator_tag;
  static constexpr kvtrim::allocation_scope scope = kvtrim::allocation_scope::per_layer;
  static constexpr bool needs_scores = false;
  [[nodiscard]] status validate(const attention_shape&, const protected_set&) const { return status::success; }
};
struct allocator_without_needs_scores {                               // B3: missing member
  using kvc_concept = kvtrim::budget_allocator_tag;
  static constexpr kvtrim::allocation_scope scope = kvtrim::allocation_scope::per_layer;
  [[nodiscard]] status validate(const attention_shape&, const protected_set&) const { return status::success; }
  [[nodiscard]] status allocate(const candidate_table&, const kvtrim::allocation_context&, std::span<int32_t>) const {
    return status::success;
  }
};

// ---- evictor archetypes (E1-E4)

struct evictor_members {
  static constexpr kvtrim::eviction_granularity granularity = kvtrim::eviction_granularity::token;
  [[nodiscard]] status validate() const { return status::success; }
  [[nodiscard]] status plan(const candidate_table&, std::span<const int32_t>, eviction_plan&) const {
    return status::success;
  }
};
struct evictor_archetype : evictor_members {
  using kvc_concept = kvtrim::evictor_tag;
};
struct evictor_without_tag : evictor_members {};                      // E1
struct evictor_with_void_plan : evictor_archetype {                   // E4: wrong return type
  void plan(const candidate_table&, std::span<const int32_t>, eviction_plan&) const {}
};
struct evictor_without_granularity {                                  // E2: missing member
  using kvc_concept = kvtrim::evictor_tag;
  [[nodiscard]] status validate() const { return status::success; }
  [[nodiscard]] status plan(const candidate_table&, std::span<const int32_t>, eviction_plan&) const {
    return status::success;
  }
};

// ---- kv_store archetypes (S1-S8)

template <kvtrim::memory_space Memory>
struct store_members {
  static constexpr kvtrim::memory_space memory = Memory;
  [[nodiscard]] attention_shape shape() const { return {1, 1, 1, 8}; }
  [[nodiscard]] bool contains(int64_t) const { return true; }
  [[nodiscard]] int32_t head_length(int64_t, int32_t, int32_t) const { return 0; }
  [[nodiscard]] status read_head(int64_t, int32_t, int32_t, std::span<int32_t>, std::span<float>,
                                 std::span<float>) const {
    return status::success;
  }
  [[nodiscard]] status apply(int64_t, const eviction_plan&) { return status::success; }
  [[nodiscard]] status rewrite_head(int64_t, int32_t, int32_t, std::span<const int32_t>, std::span<const float>) {
    return status::success;
  }
};
struct host_store : store_members<kvtrim::memory_space::host> {
  using kvc_concept = kvtrim::kv_store_tag;
};
struct device_store : store_members<kvtrim::memory_space::device> {
  using kvc_concept = kvtrim::kv_store_tag;
};
struct store_without_tag : store_members<kvtrim::memory_space::host> {};  // S1
struct store_with_bool_apply : host_store {                              // S7: wrong return type
  [[nodiscard]] bool apply(int64_t, const eviction_plan&) { return true; }
};
struct store_with_wrong_shape_type : host_store {                             // S3: wrong return type
  struct not_a_shape {};
  [[nodiscard]] not_a_shape shape() const { return {}; }
};
struct store_without_rewrite {                                           // S8: missing member
  using kvc_concept = kvtrim::kv_store_tag;
  static constexpr kvtrim::memory_space memory = kvtrim::memory_space::host;
  [[nodiscard]] attention_shape shape() const { return {1, 1, 1, 8}; }
  [[nodiscard]] bool contains(int64_t) const { return true; }
  [[nodiscard]] int32_t head_length(int64_t, int32_t, int32_t) const { return 0; }
  [[nodiscard]] status read_head(int64_t, int32_t, int32_t, std::span<int32_t>, std::span<float>,
                                 std::span<float>) const {
    return status::success;
  }
  [[nodiscard]] status apply(int64_t, const eviction_plan&) { return status::success; }
};

// ---- backend archetypes (K1-K2)

struct backend_archetype {
  using kvc_concept = kvtrim::backend_tag;
  static constexpr kvtrim::memory_space memory = kvtrim::memory_space::device;
};
struct backend_without_tag {                                             // K1
  static constexpr kvtrim::memory_space memory = kvtrim::memory_space::host;
};
struct backend_without_memory {                                          // K2
  using kvc_concept = kvtrim::backend_tag;
};

// ---- compression_policy archetypes (P1-P3)

struct policy_without_tag {                                              // P1
  using metric_type = kvtrim::window_attention;
  using allocator_type = kvtrim::uniform_budget;
  using evictor_type = kvtrim::topk_evictor;
  metric_type metric;
  allocator_type allocator;
  evictor_type evictor;
  protected_set protect;
  [[nodiscard]] status validate(const attention_shape&) const { return status::success; }
};
struct policy_without_validate {                                         // P3: missing member
  using kvc_concept = kvtrim::policy_tag;
  using metric_type = kvtrim::window_attention;
  using allocator_type = kvtrim::uniform_budget;
  using evictor_type = kvtrim::topk_evictor;
  metric_type metric;
  allocator_type allocator;
  evictor_type evictor;
  protected_set protect;
};
struct policy_with_bad_metric : policy_without_tag {                     // P2
  using kvc_concept = kvtrim::policy_tag;
  using metric_type = metric_without_tag;
  metric_type metric;
};
struct policy_archetype : policy_without_tag {
  using kvc_concept = kvtrim::policy_tag;
};

}  // namespace

TEST_CASE("importance_metric accepts the library's metrics and rejects broken ones", "[cpu][concepts]") {
  STATIC_REQUIRE(kvtrim::importance_metric<kvtrim::positional>);
  STATIC_REQUIRE(kvtrim::importance_metric<kvtrim::window_attention>);
  STATIC_REQUIRE(kvtrim::importance_metric<kvtrim::accumulated_attention>);
  STATIC_REQUIRE(kvtrim::importance_metric<metric_archetype>);
  STATIC_REQUIRE(kvtrim::importance_metric<metric_with_derived_tag>);
  STATIC_REQUIRE(kvtrim::importance_metric<accumulating_metric>);

  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<int>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_without_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_with_wrong_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_with_bool_score>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_with_int_decode>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_without_score>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_without_scope>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<accumulating_metric_without_rank>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<metric_not_copyable>);
  // Other parts are not metrics.
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<kvtrim::uniform_budget>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<kvtrim::topk_evictor>);
  STATIC_REQUIRE_FALSE(kvtrim::importance_metric<kvtrim::snapkv_policy>);
}

TEST_CASE("budget_allocator accepts the library's allocators and rejects broken ones", "[cpu][concepts]") {
  STATIC_REQUIRE(kvtrim::budget_allocator<kvtrim::uniform_budget>);
  STATIC_REQUIRE(kvtrim::budget_allocator<kvtrim::pyramid_budget>);
  STATIC_REQUIRE(kvtrim::budget_allocator<kvtrim::adaptive_budget<>>);
  STATIC_REQUIRE(kvtrim::budget_allocator<kvtrim::adaptive_budget<kvtrim::pyramid_budget>>);
  STATIC_REQUIRE(kvtrim::budget_allocator<kvtrim::global_block_budget>);
  STATIC_REQUIRE(kvtrim::budget_allocator<allocator_archetype>);

  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<int>);
  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<allocator_without_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<allocator_with_int_allocate>);
  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<allocator_without_allocate>);
  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<allocator_without_needs_scores>);
  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<kvtrim::window_attention>);
  STATIC_REQUIRE_FALSE(kvtrim::budget_allocator<kvtrim::block_evictor>);
}

TEST_CASE("evictor accepts the library's evictors and rejects broken ones", "[cpu][concepts]") {
  STATIC_REQUIRE(kvtrim::evictor<kvtrim::topk_evictor>);
  STATIC_REQUIRE(kvtrim::evictor<kvtrim::block_evictor>);
  STATIC_REQUIRE(kvtrim::evictor<evictor_archetype>);

  STATIC_REQUIRE_FALSE(kvtrim::evictor<int>);
  STATIC_REQUIRE_FALSE(kvtrim::evictor<evictor_without_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::evictor<evictor_with_void_plan>);
  STATIC_REQUIRE_FALSE(kvtrim::evictor<evictor_without_granularity>);
  STATIC_REQUIRE_FALSE(kvtrim::evictor<kvtrim::uniform_budget>);
  STATIC_REQUIRE_FALSE(kvtrim::evictor<kvtrim::positional>);
}

TEST_CASE("kv_store accepts host and device stores and rejects broken ones", "[cpu][concepts]") {
  STATIC_REQUIRE(kvtrim::kv_store<kvtrim::dense_cache>);
  STATIC_REQUIRE(kvtrim::kv_store<host_store>);
  STATIC_REQUIRE(kvtrim::kv_store<device_store>);  // C3 is the backend's rule, not the concept's
  STATIC_REQUIRE(kvtrim::dense_cache::memory == kvtrim::memory_space::host);

  STATIC_REQUIRE_FALSE(kvtrim::kv_store<int>);
  STATIC_REQUIRE_FALSE(kvtrim::kv_store<store_without_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::kv_store<store_with_bool_apply>);
  STATIC_REQUIRE_FALSE(kvtrim::kv_store<store_with_wrong_shape_type>);
  STATIC_REQUIRE_FALSE(kvtrim::kv_store<store_without_rewrite>);
  STATIC_REQUIRE_FALSE(kvtrim::kv_store<kvtrim::cpu::backend>);
}

TEST_CASE("backend accepts the CPU backend and rejects broken ones", "[cpu][concepts]") {
  STATIC_REQUIRE(kvtrim::backend<kvtrim::cpu::backend>);
  STATIC_REQUIRE(kvtrim::cpu::backend::memory == kvtrim::memory_space::host);
  STATIC_REQUIRE(kvtrim::backend<backend_archetype>);

  STATIC_REQUIRE_FALSE(kvtrim::backend<int>);
  STATIC_REQUIRE_FALSE(kvtrim::backend<backend_without_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::backend<backend_without_memory>);
  STATIC_REQUIRE_FALSE(kvtrim::backend<kvtrim::dense_cache>);
}

TEST_CASE("compression_policy accepts every preset and hand compositions", "[cpu][concepts]") {
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::streaming_llm_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::h2o_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::snapkv_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::pyramidkv_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::ada_snapkv_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::ada_pyramidkv_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::kv_compress_policy>);
  STATIC_REQUIRE(kvtrim::compression_policy<
                 kvtrim::policy<kvtrim::accumulated_attention, kvtrim::adaptive_budget<>, kvtrim::topk_evictor>>);
  STATIC_REQUIRE(kvtrim::compression_policy<kvtrim::policy<metric_archetype, allocator_archetype, evictor_archetype>>);
  STATIC_REQUIRE(kvtrim::compression_policy<policy_archetype>);

  STATIC_REQUIRE_FALSE(kvtrim::compression_policy<int>);
  STATIC_REQUIRE_FALSE(kvtrim::compression_policy<policy_without_tag>);
  STATIC_REQUIRE_FALSE(kvtrim::compression_policy<policy_without_validate>);
  STATIC_REQUIRE_FALSE(kvtrim::compression_policy<policy_with_bad_metric>);
  STATIC_REQUIRE_FALSE(kvtrim::compression_policy<kvtrim::window_attention>);
}
