#pragma once
//! \file policies.hpp
//! The six kvtrim presets as the demo configures them for stories260K, whose context is 512
//! tokens and whose budgets are 36..132 tokens per (layer, KV head): the references' windows
//! (32) would leave almost nothing to select at budget 36, so the observation windows are 8, as
//! KVCache-Factory's runner sets them (docs/llama-demo.md lists every setting).
//!
//! Two protocols (docs/llama-demo.md):
//! - streaming: before each step, if appending the new token would put the cache over its
//!   budget, the policy compresses it so that the step's attention sees at most `budget` tokens
//!   per head, the new one included;
//! - prefill: the prompt is compressed once to `budget`, then the cache grows.

#include <algorithm>
#include <array>
#include <cstdint>
#include <optional>
#include <stdexcept>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "kvtrim/kvtrim.hpp"

namespace llama {

enum class protocol { streaming, prefill };

[[nodiscard]] inline std::string_view to_string(protocol p) {
  return p == protocol::streaming ? "streaming" : "prefill";
}

enum class method { full, streaming_llm, h2o, snapkv, pyramidkv, ada_kv, kv_compress };

//! CLI names, in the order of the table.
inline constexpr std::array<std::string_view, 7> method_names = {"full",      "streaming_llm", "h2o",        "snapkv",
                                                                 "pyramidkv", "ada_kv",        "kv_compress"};

[[nodiscard]] inline std::string_view to_string(method m) { return method_names[static_cast<std::size_t>(m)]; }

[[nodiscard]] inline std::optional<method> parse_method(std::string_view name) {
  for (std::size_t i = 0; i < method_names.size(); ++i)
    if (method_names[i] == name) return static_cast<method>(i);
  return std::nullopt;
}

// ---- The demo's settings (one place; docs/llama-demo.md reproduces this table).
inline constexpr int32_t sink_tokens = 4;         //!< StreamingLLM sinks (reference: 4)
inline constexpr int32_t recent_window = 8;       //!< SnapKV/PyramidKV/Ada-KV observation window w
//! H2O: heavy hitters and recent tokens share the budget equally, as in the paper's runs
//! (heavy_ratio = recent_ratio); the recent half is protected.
[[nodiscard]] constexpr int32_t h2o_recent(int32_t budget) { return budget / 2; }
inline constexpr int32_t pool_kernel = 7;         //!< max pool of the SnapKV family and KV-Compress
inline constexpr int32_t kvc_block_size = 4;      //!< KV-Compress block (tokens of one head)
inline constexpr int32_t kvc_protected_window = 8;  //!< KV-Compress protected window (7 cached + pending)
inline constexpr int32_t kvc_observed_queries = 8;  //!< KV-Compress prefill queries (paper's KVC-w: 8)

//! What the engine needs to know about a configured method besides its policy.
struct method_traits {
  int32_t observed = 0;                 //!< query rows the compression observes (0: none)
  bool observe_in_streaming = false;    //!< streaming compressions pass the recent queries
  bool accumulate_in_prefill = false;   //!< decode attention accumulates during the prompt
  //! Tokens per (layer, KV head) the streaming protocol compresses to, below the budget, so
  //! the steps until the next compression fit: 1 (the new token), 2 for Ada-KV's rounding, or
  //! a KV-Compress block.
  int32_t streaming_headroom = 1;
  int32_t protected_tokens = 0;         //!< sinks + recent window the budget must exceed
};

[[nodiscard]] inline method_traits traits_of(method m) {
  switch (m) {
    case method::full: return {};
    case method::streaming_llm:
      return {.protected_tokens = sink_tokens};
    case method::h2o:
      // The accumulated attention of every query (prompt included) ranks the heavy hitters.
      return {.accumulate_in_prefill = true, .protected_tokens = 1};  // h2o_recent(budget) >= 1
    case method::snapkv:
    case method::pyramidkv:
      return {.observed = recent_window, .observe_in_streaming = true, .protected_tokens = recent_window};
    case method::ada_kv:
      // Ada-KV's safeguard rounds each head's share to the nearest token, which can put a layer
      // up to Hkv / 2 tokens over its total: a second token of headroom per head absorbs that.
      return {.observed = recent_window, .observe_in_streaming = true, .streaming_headroom = 2,
              .protected_tokens = recent_window};
    case method::kv_compress:
      // Prefill metric from the last 8 queries (pooled p^2); decode steps then add p^2.
      return {.observed = kvc_observed_queries, .observe_in_streaming = false,
              .accumulate_in_prefill = false, .streaming_headroom = kvc_block_size,
              .protected_tokens = kvc_protected_window - 1};
  }
  return {};
}

//! The budget (tokens per (layer, KV head), protected included) the policy is built with: the
//! user's budget for the prefill protocol, less the streaming headroom for the streaming one.
//! KV-Compress rounds its budget up to whole blocks, so it gets the budget rounded down to one.
[[nodiscard]] inline int32_t policy_budget(method m, int32_t budget, protocol p) {
  if (p == protocol::streaming) return budget - traits_of(m).streaming_headroom;
  return m == method::kv_compress ? budget / kvc_block_size * kvc_block_size : budget;
}

//! Smallest budget a method accepts under a protocol: its protected tokens plus the new token.
[[nodiscard]] inline int32_t minimum_budget(method m, protocol p) {
  const method_traits t = traits_of(m);
  if (m == method::full) return 1;
  // KV-Compress keeps whole blocks: at least the protected window rounded up to a block.
  const int32_t floor = m == method::kv_compress
                            ? (t.protected_tokens + kvc_block_size - 1) / kvc_block_size * kvc_block_size
                            : t.protected_tokens;
  return floor + (p == protocol::streaming ? t.streaming_headroom : 0);
}

//! Calls `f(policy)` with the kvtrim preset of `m` built for `budget` under protocol `p`.
//! `full` is served by a StreamingLLM policy that is never run.
//! `context`: the model's context, which PyramidKV's streaming pyramid is computed for.
template <class F>
decltype(auto) with_policy(method m, int32_t budget, protocol p, F&& f, int32_t context = 512) {
  const kvtrim::token_budget b = kvtrim::token_budget::of_tokens(std::max(1, policy_budget(m, budget, p)));
  switch (m) {
    case method::full: return f(kvtrim::streaming_llm({.budget = kvtrim::token_budget::of_tokens(1 << 30)}));
    case method::streaming_llm: return f(kvtrim::streaming_llm({.budget = b, .sinks = sink_tokens}));
    case method::h2o: return f(kvtrim::h2o({.budget = b, .recent = h2o_recent(budget)}));
    case method::snapkv:
      return f(kvtrim::snapkv({.budget = b, .window = recent_window, .pool = kvtrim::pooling::max, .kernel = pool_kernel}));
    case method::pyramidkv:
      // Streaming freezes the pyramid of a full-context prompt: sized from the cache's current
      // length, as the references do at prefill, it would stay SnapKV's uniform budget, since a
      // head holds fewer than 2 (C - w) tokens.
      return f(kvtrim::pyramidkv({.budget = b,
                                  .window = recent_window,
                                  .kernel = pool_kernel,
                                  .context = p == protocol::streaming ? context : 0}));
    case method::ada_kv: return f(kvtrim::ada_kv({.budget = b, .window = recent_window, .kernel = pool_kernel}));
    case method::kv_compress:
      return f(kvtrim::kv_compress({.budget = b,
                                    .block_size = kvc_block_size,
                                    .protected_window = kvc_protected_window,
                                    .kernel = pool_kernel}));
  }
  throw std::logic_error("with_policy: unknown method");
}

//! What the streaming protocol keeps each step's attention within: tokens per head of each
//! layer, tokens per layer, tokens of the sequence (0: no limit at that scope). Every method
//! holds budget x L x Hkv tokens in all (PyramidKV a few more: its floored step, as in the
//! reference); StreamingLLM, H2O and SnapKV hold `budget` in every head, PyramidKV a fixed
//! budget per layer, Ada-KV a fixed total per layer, KV-Compress a total per sequence.
struct streaming_limits {
  std::vector<int32_t> head;   //!< [L] tokens in one head of the layer
  std::vector<int64_t> layer;  //!< [L] tokens in all heads of the layer
  int64_t total = 0;           //!< tokens in the whole sequence
};

[[nodiscard]] inline streaming_limits limits_of(method m, int32_t budget, const kvtrim::attention_shape& s,
                                                int32_t context) {
  streaming_limits lim{std::vector<int32_t>(static_cast<std::size_t>(s.layers), 0),
                       std::vector<int64_t>(static_cast<std::size_t>(s.layers), 0), 0};
  switch (m) {
    case method::full: break;
    case method::streaming_llm:
    case method::h2o:
    case method::snapkv:
      for (auto& h : lim.head) h = budget;
      break;
    case method::pyramidkv:
      with_policy(m, budget, protocol::streaming, [&](const auto& policy) {
        // A head as long as the context gets its layer's whole share; the +1 is the new token.
        if constexpr (std::is_same_v<std::decay_t<decltype(policy)>, kvtrim::pyramidkv_policy>) {
          const int32_t w = policy.protect.recent;
          for (int32_t l = 0; l < s.layers; ++l)
            lim.head[static_cast<std::size_t>(l)] = policy.allocator.nominal_select(l, s.layers, context, w) + w + 1;
        }
      }, context);
      break;
    case method::ada_kv:
      for (auto& l : lim.layer) l = static_cast<int64_t>(budget) * s.kv_heads;
      break;
    case method::kv_compress: lim.total = static_cast<int64_t>(budget) * s.layers * s.kv_heads; break;
  }
  return lim;
}

//! Checks that `budget` suits method `m` under protocol `p` on a model of context `seq_len`;
//! returns an empty string or a message for the user.
[[nodiscard]] inline std::string check_budget(method m, int32_t budget, protocol p, const kvtrim::attention_shape& shape,
                                              int32_t seq_len) {
  if (m == method::full) return {};
  const std::string who = "budget " + std::to_string(budget) + " for " + std::string(to_string(m)) + " (" +
                          std::string(to_string(p)) + " protocol)";
  if (budget > seq_len)
    return who + " is larger than the model's context (seq_len " + std::to_string(seq_len) +
           "): a budget counts tokens per (layer, KV head) and must be at most seq_len";
  const int32_t least = minimum_budget(m, p);
  if (budget < least) {
    const method_traits t = traits_of(m);
    std::string keeps = std::to_string(t.protected_tokens) + " protected token" +
                        (t.protected_tokens == 1 ? "" : "s") + " per head";
    if (m == method::kv_compress) keeps += " in whole " + std::to_string(kvc_block_size) + "-token blocks";
    if (p == protocol::streaming) {
      if (m == method::kv_compress)
        keeps += ", plus a block of room for the next tokens";
      else if (t.streaming_headroom > 1)
        keeps += ", plus room for the new token and " + std::to_string(t.streaming_headroom - 1) +
                 " for its safeguard's rounding";
      else
        keeps += ", plus room for the new token";
    }
    return who + " is below the protected set: the method always keeps " + keeps +
           ", so the budget must be at least " + std::to_string(least) + " (kvtrim: " +
           std::string(kvtrim::to_string(kvtrim::status::budget_below_protected)) + ")";
  }
  // kvtrim's own check of the configured policy (its token-budget allocators report
  // budget_below_protected too; the message above says why in the example's terms first).
  const kvtrim::status s =
      with_policy(m, budget, p, [&](const auto& policy) { return policy.validate(shape); }, seq_len);
  if (s != kvtrim::status::success) return who + ": kvtrim: " + std::string(kvtrim::to_string(s));
  return {};
}

}  // namespace llama
