#pragma once
// Small seeded inputs for the host tests: a dense cache filled with random post-RoPE keys,
// observation queries, and a snapshot to prove that a failed call changed nothing.
#include <cstdint>
#include <random>
#include <vector>

#include "kvtrim/kvtrim.hpp"

namespace fixtures {

struct filled_cache {
  kvtrim::attention_shape model;
  kvtrim::dense_cache cache;
  std::vector<float> queries;      // [L][rows][Hq][d]
  std::vector<int32_t> positions;  // [rows]

  [[nodiscard]] kvtrim::cpu::observation observation() const { return {queries, positions}; }
};

//! `n` tokens in sequence 0 of a dense cache with `stored` heads per layer (Hkv by default),
//! Gaussian keys/values, and the last `rows` positions as observed queries.
inline filled_cache make_cache(kvtrim::attention_shape model, int32_t n, int32_t rows, uint32_t seed = 1,
                               int32_t stored = 0, int32_t capacity = 0) {
  if (stored == 0) stored = model.kv_heads;
  filled_cache f{model, kvtrim::dense_cache({model.layers, model.q_heads, stored, model.head_dim}, 1,
                                            capacity ? capacity : n),
                 {}, {}};
  std::mt19937 rng(seed);
  std::normal_distribution<float> normal(0.f, 1.f);
  const auto width = static_cast<size_t>(stored) * model.head_dim;
  std::vector<float> k(width), v(width);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t t = 0; t < n; ++t) {
      for (auto& x : k) x = normal(rng);
      for (auto& x : v) x = normal(rng);
      kvtrim::throw_if_error(f.cache.append(0, l, t, k, v), "fixture append");
    }
  f.queries.resize(static_cast<size_t>(model.layers) * rows * model.q_heads * model.head_dim);
  for (auto& x : f.queries) x = 2.f * normal(rng);
  for (int32_t r = 0; r < rows; ++r) f.positions.push_back(n - rows + r);
  return f;
}

//! Everything observable of sequence 0: lengths, positions, keys, metrics of every head.
struct snapshot {
  std::vector<int32_t> lengths, positions;
  std::vector<float> keys, values, metrics;
  friend bool operator==(const snapshot&, const snapshot&) = default;
};

inline snapshot take_snapshot(const kvtrim::dense_cache& c, int64_t seq = 0) {
  snapshot s;
  const auto shape = c.shape();
  for (int32_t l = 0; l < shape.layers; ++l)
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      s.lengths.push_back(c.head_length(seq, l, h));
      const auto p = c.positions(seq, l, h);
      const auto k = c.keys(seq, l, h);
      const auto v = c.values(seq, l, h);
      const auto m = c.metrics(seq, l, h);
      s.positions.insert(s.positions.end(), p.begin(), p.end());
      s.keys.insert(s.keys.end(), k.begin(), k.end());
      s.values.insert(s.values.end(), v.begin(), v.end());
      s.metrics.insert(s.metrics.end(), m.begin(), m.end());
    }
  return s;
}

}  // namespace fixtures
