#pragma once
//! \file presets.hpp
//! The six published methods as named compositions with their references' defaults
//! (docs/policies.md lists the paper, reference and composition of each). Every preset is
//! an ordinary `kvtrim::policy`: take it apart and recompose, e.g.
//! `policy<accumulated_attention, adaptive_budget<>, topk_evictor>` for Ada-KV budgets on
//! KV-Compress's squared metric.

#include <cstdint>

#include "kvtrim/config.hpp"
#include "kvtrim/policy/budget/adaptive.hpp"
#include "kvtrim/policy/budget/global_blocks.hpp"
#include "kvtrim/policy/budget/pyramid.hpp"
#include "kvtrim/policy/budget/uniform.hpp"
#include "kvtrim/policy/evict/topk_keep.hpp"
#include "kvtrim/policy/metric/accumulated_attention.hpp"
#include "kvtrim/policy/metric/positional.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"
#include "kvtrim/policy/policy.hpp"

KVTRIM_NAMESPACE_BEGIN

// ---- StreamingLLM: 4 sinks + the most recent tokens, every step (mit-han-lab/streaming-llm).
struct streaming_llm_options {
  token_budget budget = token_budget::of_tokens(2004);  //!< start_size 4 + recent_size 2000
  int32_t sinks = 4;
  bool per_query_head = false;  //!< compatibility: one selection per query head
};
using streaming_llm_policy = policy<positional, uniform_budget, topk_evictor>;
[[nodiscard]] inline streaming_llm_policy streaming_llm(const streaming_llm_options& o = {}) {
  streaming_llm_policy p;
  p.metric.per_query_head = o.per_query_head;
  p.allocator.budget = o.budget;
  p.protect = {.sinks = o.sinks, .recent = 0};
  p.schedule.when = compression_schedule::kind::every_step;
  return p;
}

// ---- H2O: accumulated attention, heavy hitters + recent window (KVCache-Factory runner:
// w = 8, capacity 512; FMInference/H2O real-drop evicts after every step).
struct h2o_options {
  token_budget budget = token_budget::of_tokens(512);  //!< heavy hitters + recent window
  int32_t recent = 8;
  gqa_reduce reduce = gqa_reduce::mean;
  accumulation_norm norm = accumulation_norm::sum;
};
using h2o_policy = policy<accumulated_attention, uniform_budget, topk_evictor>;
[[nodiscard]] inline h2o_policy h2o(const h2o_options& o = {}) {
  h2o_policy p;
  p.metric.observation.reduce = o.reduce;
  p.metric.norm = o.norm;
  p.allocator.budget = o.budget;
  p.protect = {.sinks = 0, .recent = o.recent};
  p.schedule.when = compression_schedule::kind::every_step;
  return p;
}

//! The SnapKV family's window score: window queries, sum, max pool k = 7 over the prefix.
[[nodiscard]] inline window_attention snapkv_window_score(query_aggregation aggregation, pooling pool,
                                                          int32_t kernel, gqa_reduce reduce) {
  return {.aggregation = aggregation, .squared = false, .pool = pool, .kernel = kernel, .reduce = reduce,
          .order = reduce_order::before_pool, .range = pool_range::evictable_prefix};
}

// ---- SnapKV: observation window w = 32, max pool k = 7, C = 2048 (paper LongBench configs).
struct snapkv_options {
  token_budget budget = token_budget::of_tokens(2048);  //!< C, window included
  int32_t window = 32;
  pooling pool = pooling::max;
  int32_t kernel = 7;
  gqa_reduce reduce = gqa_reduce::mean;
};
using snapkv_policy = policy<window_attention, uniform_budget, topk_evictor>;
[[nodiscard]] inline snapkv_policy snapkv(const snapkv_options& o = {}) {
  snapkv_policy p;
  p.metric = snapkv_window_score(query_aggregation::sum, o.pool, o.kernel, o.reduce);
  p.allocator.budget = o.budget;
  p.protect = {.sinks = 0, .recent = o.window};
  return p;
}

// ---- PyramidKV: SnapKV's selection with per-layer budgets (KVCache-Factory: w 8, k 7,
// max pool, beta 20, capacity 512).
struct pyramidkv_options {
  token_budget budget = token_budget::of_tokens(512);  //!< mean C per head, window included
  int32_t window = 8;
  int32_t beta = 20;
  pyramid_form form = pyramid_form::integer;
  pooling pool = pooling::max;
  int32_t kernel = 7;
  gqa_reduce reduce = gqa_reduce::mean;
  int32_t context = 0;  //!< > 0: the pyramid of a prompt this long, frozen (pyramid_budget::context)
};
using pyramidkv_policy = policy<window_attention, pyramid_budget, topk_evictor>;
[[nodiscard]] inline pyramidkv_policy pyramidkv(const pyramidkv_options& o = {}) {
  pyramidkv_policy p;
  p.metric = snapkv_window_score(query_aggregation::sum, o.pool, o.kernel, o.reduce);
  p.allocator = {.budget = o.budget, .beta = o.beta, .form = o.form, .context = o.context};
  p.protect = {.sinks = 0, .recent = o.window};
  return p;
}

// ---- Ada-KV: adaptive per-head budgets inside each layer (FFY0/AdaKV: w 32, k 7, max pool,
// mean over window and group, floor alpha 0.2, normalize off, C = 1024).
struct ada_kv_options {
  token_budget budget = token_budget::of_tokens(1024);  //!< mean C per head, window included
  int32_t window = 32;
  float alpha = 0.2f;
  bool normalize = false;
  int32_t skip_layers = 0;
  pooling pool = pooling::max;
  int32_t kernel = 7;
  gqa_reduce reduce = gqa_reduce::mean;
};
using ada_snapkv_policy = policy<window_attention, adaptive_budget<uniform_budget>, topk_evictor>;
using ada_pyramidkv_policy = policy<window_attention, adaptive_budget<pyramid_budget>, topk_evictor>;

//! Ada-SnapKV.
[[nodiscard]] inline ada_snapkv_policy ada_kv(const ada_kv_options& o = {}) {
  ada_snapkv_policy p;
  p.metric = snapkv_window_score(query_aggregation::mean, o.pool, o.kernel, o.reduce);
  p.allocator.base.budget = o.budget;
  p.allocator.alpha = o.alpha;
  p.allocator.normalize = o.normalize;
  p.allocator.skip_layers = o.skip_layers;
  p.protect = {.sinks = 0, .recent = o.window};
  return p;
}

//! Ada-PyramidKV (AdaKV `pyram_mode`, beta 20).
[[nodiscard]] inline ada_pyramidkv_policy ada_pyramidkv(const ada_kv_options& o = {}, int32_t beta = 20) {
  ada_pyramidkv_policy p;
  p.metric = snapkv_window_score(query_aggregation::mean, o.pool, o.kernel, o.reduce);
  p.allocator.base = {.budget = o.budget, .beta = beta, .form = pyramid_form::integer};
  p.allocator.alpha = o.alpha;
  p.allocator.normalize = o.normalize;
  p.allocator.skip_layers = o.skip_layers;
  p.protect = {.sinks = 0, .recent = o.window};
  return p;
}

// ---- KV-Compress: squared attention accumulated from prefill and decode, one budget across
// all layers and heads in whole blocks (vllm-kvcompress: block 16, protected window 32,
// 32 observed queries, max pool 7 per query head, group sum).
struct kv_compress_options {
  //! `max_cache_tokens` (mean tokens per layer and head) or `target_compression_rate`.
  token_budget budget = token_budget::of_tokens(1024);
  int32_t block_size = 16;
  //! The reference's protected_window_size; it counts the pending (sampled, not yet cached)
  //! token, so `protected_window - 1` cached tokens are protected.
  int32_t protected_window = 32;
  int32_t sinks = 0;
  int32_t kernel = 7;  //!< max pool of the prefill metric; 1 disables (KVC-full)
  int32_t buffer = 0;  //!< metric_collection_buffer_size
};
using kv_compress_policy = policy<accumulated_attention, global_block_budget, block_evictor>;
[[nodiscard]] inline kv_compress_policy kv_compress(const kv_compress_options& o = {}) {
  kv_compress_policy p;
  p.metric.observation = {.aggregation = query_aggregation::sum, .squared = true,
                          .pool = o.kernel > 1 ? pooling::max : pooling::none, .kernel = o.kernel,
                          .reduce = gqa_reduce::sum, .order = reduce_order::after_pool,
                          .range = pool_range::all_keys, .buffer = o.buffer};
  p.allocator = {.budget = o.budget, .block_size = o.block_size, .pending_tokens = 1};
  p.evictor.block_size = o.block_size;
  p.protect = {.sinks = o.sinks, .recent = o.protected_window > 0 ? o.protected_window - 1 : 0};
  p.schedule.when = compression_schedule::kind::after_prefill;
  return p;
}

KVTRIM_NAMESPACE_END
