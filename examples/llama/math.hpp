#pragma once
//! \file math.hpp
//! The few dense kernels the forward pass and the caches share, written as plain loops so the
//! arithmetic is easy to audit against llama2.c's run.c.

#include <cmath>
#include <cstddef>
#include <span>

namespace llama {

//! Dot product over eight lanes of partial sums. A fixed-width lane array is the one shape
//! g++ -O2 turns into SIMD without -ffast-math (a single running sum must stay serial); this
//! made the whole forward pass ~1.7x faster. Differs from a sequential sum only by rounding.
inline float dot(const float* a, const float* b, std::size_t n) {
  float acc[8] = {};
  std::size_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (std::size_t j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

//! out = w · x for a row-major matrix, the layout of every checkpoint weight.
//! `w` is [rows][cols], `x` is [cols], `out` is [rows]; `out` must not alias `x`.
inline void matvec(std::span<float> out, std::span<const float> w, std::span<const float> x) {
  const std::size_t cols = x.size();
  for (std::size_t r = 0; r < out.size(); ++r) out[r] = dot(w.data() + r * cols, x.data(), cols);
}

//! out = x / rms(x) * weight with eps 1e-5, as in llama2.c; `out` may alias `x`.
//! `x`, `weight`, `out` are [n].
inline void rmsnorm(std::span<float> out, std::span<const float> x, std::span<const float> weight) {
  float ss = 0.0f;
  for (float v : x) ss += v * v;
  const float inv = 1.0f / std::sqrt(ss / static_cast<float>(x.size()) + 1e-5f);
  for (std::size_t i = 0; i < x.size(); ++i) out[i] = weight[i] * (x[i] * inv);
}

//! In-place numerically stable softmax over `x` [n].
inline void softmax(std::span<float> x) {
  float max_val = x[0];
  for (float v : x) max_val = v > max_val ? v : max_val;
  float sum = 0.0f;
  for (float& v : x) {
    v = std::exp(v - max_val);
    sum += v;
  }
  for (float& v : x) v /= sum;
}

//! Scaled dot-product attention of one query head over `n` cached tokens stored contiguously,
//! the building block any cache's `attend` can reuse whatever its eviction policy.
//! `q` [head_dim], `keys` and `values` [n][head_dim], `scores` [n] scratch (left holding the
//! attention probabilities, which eviction metrics may want), `out` [head_dim].
inline void attend_head(std::span<const float> q, const float* keys, const float* values,
                        std::size_t n, std::span<float> scores, std::span<float> out) {
  const std::size_t head_dim = q.size();
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
  for (std::size_t t = 0; t < n; ++t)
    scores[t] = dot(q.data(), keys + t * head_dim, head_dim) * scale;
  softmax(scores.first(n));
  // Eight output lanes at a time in a local array, which stays in (SIMD) registers, instead
  // of a load and store of out[d] per token; odd-sized heads finish lane by lane.
  std::size_t d0 = 0;
  for (; d0 + 8 <= head_dim; d0 += 8) {
    float acc[8] = {};
    for (std::size_t t = 0; t < n; ++t)
      for (std::size_t j = 0; j < 8; ++j) acc[j] += scores[t] * values[t * head_dim + d0 + j];
    for (std::size_t j = 0; j < 8; ++j) out[d0 + j] = acc[j];
  }
  for (std::size_t d = d0; d < head_dim; ++d) {
    float acc = 0.0f;
    for (std::size_t t = 0; t < n; ++t) acc += scores[t] * values[t * head_dim + d];
    out[d] = acc;
  }
}

//! Negative log-likelihood (nats) of `target` under the softmax of `logits` [vocab_size],
//! accumulated in double so thousands of tokens average without drift.
inline double token_nll(std::span<const float> logits, int target) {
  double max_val = logits[0];
  for (float v : logits) max_val = v > max_val ? v : max_val;
  double sum = 0.0;
  for (float v : logits) sum += std::exp(static_cast<double>(v) - max_val);
  return std::log(sum) + max_val - static_cast<double>(logits[static_cast<std::size_t>(target)]);
}

//! Index of the largest logit (the first on ties), i.e. greedy decoding.
inline int argmax(std::span<const float> logits) {
  std::size_t best = 0;
  for (std::size_t i = 1; i < logits.size(); ++i)
    if (logits[i] > logits[best]) best = i;
  return static_cast<int>(best);
}

}  // namespace llama
