#pragma once
// A minimal kv_store for the compile-fail tests: satisfies every structural requirement
// (S1-S8) and lives in the memory space given as the template argument.
#include <cstdint>
#include <span>

#include "kvtrim/kvtrim.hpp"

template <kvtrim::memory_space Memory>
struct fake_store {
  using kvc_concept = kvtrim::kv_store_tag;
  static constexpr kvtrim::memory_space memory = Memory;

  [[nodiscard]] kvtrim::attention_shape shape() const { return {1, 1, 1, 8}; }
  [[nodiscard]] bool contains(int64_t) const { return true; }
  [[nodiscard]] int32_t head_length(int64_t, int32_t, int32_t) const { return 0; }
  [[nodiscard]] kvtrim::status read_head(int64_t, int32_t, int32_t, std::span<int32_t>, std::span<float>,
                                         std::span<float>) const {
    return kvtrim::status::success;
  }
  [[nodiscard]] kvtrim::status apply(int64_t, const kvtrim::eviction_plan&) { return kvtrim::status::success; }
  [[nodiscard]] kvtrim::status rewrite_head(int64_t, int32_t, int32_t, std::span<const int32_t>,
                                            std::span<const float>) {
    return kvtrim::status::success;
  }
};
static_assert(kvtrim::kv_store<fake_store<kvtrim::memory_space::host>>);
static_assert(kvtrim::kv_store<fake_store<kvtrim::memory_space::device>>);
