#pragma once
//! \file generate.hpp
//! Greedy generation from a prompt with one method (the `generate` command). `Store` is the
//! kvtrim store the cache uses, as in eval.hpp.

#include <chrono>
#include <cstdint>
#include <span>
#include <utility>
#include <vector>

#include "checkpoint.hpp"
#include "engine.hpp"
#include "math.hpp"
#include "policies.hpp"
#include "tokenizer.hpp"

namespace llama {

struct generate_options {
  method meth = method::snapkv;
  int32_t budget = 36;  //!< tokens per (layer, KV head)
  protocol proto = protocol::streaming;
  std::vector<int> prompt;  //!< token ids, BOS first; shorter than the model's context
  int steps = 200;          //!< tokens to generate at most
};

struct generation {
  std::vector<int> tokens;                  //!< the prompt, then every generated token
  int compressions = 0;
  double seconds = 0.0;                     //!< wall time of every step
  std::int64_t kv_bytes = 0;                //!< K+V the cache holds at the end
  std::int64_t full_kv_bytes = 0;           //!< the same for the full cache of as many tokens
  std::vector<std::vector<int32_t>> kept;   //!< [L * Hkv] positions still cached, ascending
};

//! Runs the prompt, then appends the argmax token until `steps` tokens, BOS or EOS, or the
//! model's context.
template <kvtrim::kv_store Store = kvtrim::paged_cache<float>>
generation generate(const checkpoint& model, const generate_options& o) {
  const config& c = model.cfg();
  return with_policy(o.meth, o.budget, o.proto, [&](auto policy) {
    sequence_engine<decltype(policy), Store> engine(model, o.meth, o.budget, o.proto, std::move(policy), c.seq_len);
    generation g;
    const auto t0 = std::chrono::steady_clock::now();
    std::span<const float> logits;
    for (const int token : o.prompt) {
      logits = engine.step(token, static_cast<int>(g.tokens.size()));
      g.tokens.push_back(token);
    }
    engine.end_prompt();
    for (int generated = 0; generated < o.steps && static_cast<int>(g.tokens.size()) < c.seq_len; ++generated) {
      const int next = argmax(logits);
      if (next == tokenizer::bos_id || next == tokenizer::eos_id) break;
      logits = engine.step(next, static_cast<int>(g.tokens.size()));
      g.tokens.push_back(next);
    }
    g.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    g.compressions = engine.compressions();
    g.kv_bytes = engine.cache().kv_bytes();
    g.full_kv_bytes = engine.cache().full_kv_bytes(static_cast<int>(g.tokens.size()));
    g.kept = engine.cache().kept_positions();
    return g;
  }, c.seq_len);
}

}  // namespace llama
