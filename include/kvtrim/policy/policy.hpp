#pragma once
//! \file policy.hpp
//! A compression policy: a metric, a budget allocator and an evictor, plus what they share
//! (the protected tokens, the position mode, the schedule). The rules that cross parts are
//! checked here at compile time.

#include <cstdint>

#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/positions.hpp"

KVTRIM_NAMESPACE_BEGIN

//! When an engine should call compress (design.md, "schedule").
struct compression_schedule {
  enum class kind : uint8_t {
    after_prefill,  //!< once, when the prompt is in the cache (SnapKV family, KV-Compress compress_once)
    every_step,     //!< after every decode step (H2O, StreamingLLM)
    every_n_steps   //!< every `interval` decode steps (kvpress DecodingPress, KV-Compress interval)
  };
  kind when = kind::after_prefill;
  int32_t interval = 1;

  [[nodiscard]] status validate() const noexcept { return interval >= 1 ? status::success : status::invalid_argument; }
  //! Whether to compress after decode step `step` (1 = the first generated token).
  [[nodiscard]] constexpr bool after_decode_step(int64_t step) const noexcept {
    switch (when) {
      case kind::after_prefill: return false;
      case kind::every_step: return true;
      case kind::every_n_steps: return step % interval == 0;
    }
    return false;
  }
};

template <importance_metric Metric, budget_allocator Allocator, evictor Evictor>
struct policy {
  using kvc_concept = policy_tag;
  using metric_type = Metric;
  using allocator_type = Allocator;
  using evictor_type = Evictor;

  static_assert(!Allocator::needs_scores || Metric::scope == score_scope::across_heads,
                "kvtrim::policy rule C1: this budget allocator compares scores across heads "
                "(Ada-KV, KV-Compress), but the metric's scores only order tokens within a head. "
                "Fix: use window_attention or accumulated_attention, or a uniform/pyramid budget.");

  Metric metric{};
  Allocator allocator{};
  Evictor evictor{};
  protected_set protect{};
  position_mode positions = position_mode::keep_original;
  rope_config rope{};  //!< used only when positions == rerotate
  compression_schedule schedule{};

  [[nodiscard]] status validate(const attention_shape& shape) const noexcept {
    if (const status s = metric.validate(shape, protect); s != status::success) return s;
    if (const status s = allocator.validate(shape, protect); s != status::success) return s;
    if (const status s = evictor.validate(); s != status::success) return s;
    if (const status s = schedule.validate(); s != status::success) return s;
    if (positions == position_mode::rerotate) return rope.validate(shape.head_dim);
    return status::success;
  }
};

KVTRIM_NAMESPACE_END
