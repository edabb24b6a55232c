#pragma once
//! \file engine.hpp
//! The engine loop of kvtrim's design (append -> compress after the prompt -> decode with
//! scheduled eviction -> free) for one sequence of the llama model, under the two protocols
//! of policies.hpp. Everything kvtrim-specific an engine does is here and in kvtrim_cache.hpp
//! (kvtrim_cache_cuda.cuh for `Store` = `cuda_paged_cache`, the cache on the GPU).

#include <cstdint>
#include <functional>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>

#include "checkpoint.hpp"
#include "forward.hpp"
#include "kvtrim_cache.hpp"
#include "policies.hpp"

namespace llama {

template <kvtrim::compression_policy Policy, kvtrim::kv_store Store = kvtrim::paged_cache<float>>
class sequence_engine {
 public:
  //! `budget`: tokens per (layer, KV head), protected tokens and the current token included;
  //! the mean over heads for the methods whose heads differ (streaming_limits). `capacity`:
  //! the most tokens a head may hold (the model's context).
  sequence_engine(const checkpoint& model, method m, int32_t budget, protocol p, Policy policy, int capacity)
      : model_(model),
        method_(m),
        traits_(traits_of(m)),
        budget_(budget),
        limits_(limits_of(m, budget, attention_shape_of(model.cfg()), model.cfg().seq_len)),
        protocol_(p),
        state_(model.cfg()),
        cache_(model.cfg(), std::move(policy), capacity, traits_of(m).observed) {
    start();
  }

  //! Starts a new sequence at position 0 (frees every token of the previous one).
  void start() {
    cache_.clear();
    // Streaming: every step is a decode step, so accumulating metrics see every query.
    // Prefill: H2O accumulates over the prompt; KV-Compress scores it from the observed window.
    cache_.set_accumulation(protocol_ == protocol::streaming || traits_.accumulate_in_prefill);
    prompt_done_ = false;
    compressions_ = 0;
  }

  //! Runs `token` at `pos` and returns the next-token logits (valid until the next step).
  //! Under the streaming protocol the cache is first compressed if the new token would put it
  //! over its budget.
  std::span<const float> step(int token, int pos) {
    if (protocol_ == protocol::streaming && method_ != method::full && over_budget_with_new_token()) {
      cache_.compress(traits_.observe_in_streaming);
      ++compressions_;
      if (over_budget_with_new_token())
        throw std::logic_error(std::string(to_string(method_)) + " left the cache over its budget of " +
                               std::to_string(budget_) + " tokens per head at position " + std::to_string(pos));
    }
    return forward(model_.get(), state_, cache_, token, pos, cache_.query_hook());
  }

  //! The prompt is in the cache: compress it once (prefill protocol), then let decode
  //! attention accumulate metrics (KV-Compress's decode metric).
  void end_prompt() {
    if (prompt_done_) return;
    prompt_done_ = true;
    if (protocol_ == protocol::prefill && method_ != method::full) {
      cache_.compress(traits_.observed > 0);
      ++compressions_;
    }
    cache_.set_accumulation(true);
  }

  [[nodiscard]] const kvtrim_cache<Policy, Store>& cache() const noexcept { return cache_; }
  [[nodiscard]] int compressions() const noexcept { return compressions_; }
  [[nodiscard]] const streaming_limits& limits() const noexcept { return limits_; }

 private:
  //! Whether appending one token to every head would put any head, layer or the sequence
  //! over its streaming limit.
  [[nodiscard]] bool over_budget_with_new_token() const {
    const kvtrim::attention_shape& s = cache_.shape();
    for (int l = 0; l < s.layers; ++l) {
      const int32_t head_limit = limits_.head[static_cast<std::size_t>(l)];
      const std::int64_t layer_limit = limits_.layer[static_cast<std::size_t>(l)];
      if (head_limit > 0)
        for (int h = 0; h < s.kv_heads; ++h)
          if (cache_.head_length(l, h) + 1 > head_limit) return true;
      if (layer_limit > 0 && cache_.layer_tokens(l) + s.kv_heads > layer_limit) return true;
    }
    const std::int64_t heads = static_cast<std::int64_t>(s.layers) * s.kv_heads;
    return limits_.total > 0 && cache_.total_tokens() + heads > limits_.total;
  }

  std::reference_wrapper<const checkpoint> model_;
  method method_;
  method_traits traits_;
  int32_t budget_;
  streaming_limits limits_;
  protocol protocol_;
  run_state state_;
  kvtrim_cache<Policy, Store> cache_;
  bool prompt_done_ = false;
  int compressions_ = 0;
};

}  // namespace llama
