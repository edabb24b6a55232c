#pragma once
//! \file forward.hpp
//! One-token Llama forward pass (llama2.c run.c semantics) whose attention goes through a
//! pluggable KV cache, so a compressing cache can replace the dense baseline without touching
//! the model code.
//!
//! ## The `kv_cache` contract
//!
//! Shapes use the model's config: `head_dim = dim / n_heads`; query head h reads KV head
//! `h / (n_heads / n_kv_heads)`.
//!
//! - `cache.append(layer, pos, k, v)`: `k`, `v` are `std::span<const float>` of shape
//!   [n_kv_heads][head_dim]; `k` is post-RoPE. Called exactly once per layer per step, layers
//!   in order 0..n_layers-1, positions 0, 1, 2, ... in order within each layer. The spans are
//!   scratch reused by the next step: the cache copies what it keeps.
//! - `cache.attend(layer, q, out)`: called right after `append` for the same layer and step.
//!   `q` is `std::span<const float>` [n_heads][head_dim], post-RoPE and unscaled; the cache
//!   writes every element of `out`, `std::span<float>` [n_heads][head_dim], with
//!   out[h] = sum_t softmax_t(q[h] . k_t[g(h)] / sqrt(head_dim)) v_t[g(h)] over the tokens t it
//!   holds for `layer` (which include the one just appended), g(h) = h / (n_heads / n_kv_heads).
//!   A compressing cache may hold fewer tokens; that approximation is the point of it.
//!
//! A new sequence needs a fresh or cleared cache: the forward pass never resets it.

#include <cmath>
#include <concepts>
#include <cstddef>
#include <span>
#include <stdexcept>
#include <string>
#include <vector>

#include "checkpoint.hpp"
#include "math.hpp"

namespace llama {

//! Compile-time half of the contract above; the semantic half is in the file comment.
template <class C>
concept kv_cache = requires(C& cache, int layer, int pos, std::span<const float> in,
                            std::span<float> out) {
  cache.append(layer, pos, in, in);
  cache.attend(layer, in, out);
};

//! Scratch buffers of a forward step, allocated once and reused by every step and sequence.
struct run_state {
  explicit run_state(const config& c)
      : x(size(c.dim)),
        xb(size(c.dim)),
        xb2(size(c.dim)),
        hb(size(c.hidden_dim)),
        hb2(size(c.hidden_dim)),
        q(size(c.dim)),
        k(size(c.kv_dim())),
        v(size(c.kv_dim())),
        att(size(c.dim)),
        logits(size(c.vocab_size)),
        rope_freq(size(c.head_dim() / 2)),
        rope_cos(rope_freq.size()),
        rope_sin(rope_freq.size()) {
    // Computed in float exactly as run.c does, so positions rotate bit-for-bit alike.
    for (std::size_t i = 0; i < rope_freq.size(); ++i)
      rope_freq[i] =
          1.0f / std::pow(10000.0f, static_cast<float>(2 * i) / static_cast<float>(c.head_dim()));
  }

  std::vector<float> x;          // [dim] residual stream
  std::vector<float> xb;         // [dim] normalised input of the current block
  std::vector<float> xb2;        // [dim] attention block output before the residual add
  std::vector<float> hb;         // [hidden_dim] w1 x, then silu(w1 x) * w3 x
  std::vector<float> hb2;        // [hidden_dim] w3 x
  std::vector<float> q;          // [n_heads][head_dim] post-RoPE query of the latest layer
  std::vector<float> k;          // [n_kv_heads][head_dim] post-RoPE key of the latest layer
  std::vector<float> v;          // [n_kv_heads][head_dim] value of the latest layer
  std::vector<float> att;        // [n_heads][head_dim] attention output
  std::vector<float> logits;     // [vocab_size] output of the step
  std::vector<float> rope_freq;  // [head_dim / 2] 10000^(-2i / head_dim)
  std::vector<float> rope_cos;   // [head_dim / 2] cos(pos * rope_freq) for the current step
  std::vector<float> rope_sin;   // [head_dim / 2] sin(pos * rope_freq) for the current step

 private:
  static std::size_t size(int n) { return static_cast<std::size_t>(n); }
};

//! Default query hook: the dense baseline needs no queries.
struct ignore_queries {
  void operator()(int /*layer*/, int /*pos*/, std::span<const float> /*q*/) const {}
};

//! Rotates each adjacent pair (x[2i], x[2i+1]) of every head by pos * rope_freq[i].
//! `x` is [n_heads][head_dim] for whatever head count it holds.
inline void apply_rope(std::span<float> x, const run_state& s) {
  const std::size_t pairs = s.rope_freq.size();
  for (std::size_t head = 0; head < x.size() / (2 * pairs); ++head) {
    float* h = x.data() + head * 2 * pairs;
    for (std::size_t i = 0; i < pairs; ++i) {
      const float a = h[2 * i];
      const float b = h[2 * i + 1];
      h[2 * i] = a * s.rope_cos[i] - b * s.rope_sin[i];
      h[2 * i + 1] = a * s.rope_sin[i] + b * s.rope_cos[i];
    }
  }
}

//! Runs `token` at position `pos` through the model, storing its keys and values in `cache`,
//! and returns the next-token logits [vocab_size] (a view of `s.logits`, valid until the next
//! call). After each layer's RoPE, `on_query(layer, pos, q)` receives that layer's post-RoPE
//! query [n_heads][head_dim], for policies that score cached tokens by recent queries; the span
//! is only valid during the call.
template <kv_cache Cache, class QueryHook = ignore_queries>
std::span<const float> forward(const checkpoint& model, run_state& s, Cache& cache, int token,
                               int pos, QueryHook&& on_query = {}) {
  const config& c = model.cfg();
  if (token < 0 || token >= c.vocab_size)
    throw std::out_of_range("forward: token " + std::to_string(token) + " outside vocabulary of " +
                            std::to_string(c.vocab_size));
  if (pos < 0) throw std::out_of_range("forward: negative position " + std::to_string(pos));

  const std::span<const float> embedding = model.token_embedding();
  const std::size_t dim = s.x.size();
  for (std::size_t i = 0; i < dim; ++i)
    s.x[i] = embedding[static_cast<std::size_t>(token) * dim + i];
  for (std::size_t i = 0; i < s.rope_freq.size(); ++i) {
    const float angle = static_cast<float>(pos) * s.rope_freq[i];
    s.rope_cos[i] = std::cos(angle);
    s.rope_sin[i] = std::sin(angle);
  }

  for (int layer = 0; layer < c.n_layers; ++layer) {
    // Attention block: x += wo · attention(rmsnorm(x)).
    rmsnorm(s.xb, s.x, model.rms_att(layer));
    matvec(s.q, model.wq(layer), s.xb);
    matvec(s.k, model.wk(layer), s.xb);
    matvec(s.v, model.wv(layer), s.xb);
    apply_rope(s.q, s);
    apply_rope(s.k, s);
    on_query(layer, pos, std::span<const float>(s.q));
    cache.append(layer, pos, std::span<const float>(s.k), std::span<const float>(s.v));
    cache.attend(layer, std::span<const float>(s.q), std::span<float>(s.att));
    matvec(s.xb2, model.wo(layer), s.att);
    for (std::size_t i = 0; i < dim; ++i) s.x[i] += s.xb2[i];

    // Feed-forward block: x += w2 · (silu(w1 · h) * (w3 · h)), h = rmsnorm(x).
    rmsnorm(s.xb, s.x, model.rms_ffn(layer));
    matvec(s.hb, model.w1(layer), s.xb);
    matvec(s.hb2, model.w3(layer), s.xb);
    for (std::size_t i = 0; i < s.hb.size(); ++i) {
      const float gate = s.hb[i];
      s.hb[i] = gate / (1.0f + std::exp(-gate)) * s.hb2[i];
    }
    matvec(s.xb, model.w2(layer), s.hb);
    for (std::size_t i = 0; i < dim; ++i) s.x[i] += s.xb[i];
  }

  rmsnorm(s.x, s.x, model.rms_final());
  matvec(s.logits, embedding, s.x);
  return s.logits;
}

}  // namespace llama
