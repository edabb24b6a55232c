#pragma once
// Helpers of the paged-cache tests: seeded K/V, caches made or thrown, host vectors that
// stand in for device memory, and a dump of everything a store holds to prove that a failed
// call changed nothing.
#include <cstdint>
#include <random>
#include <span>
#include <utility>
#include <vector>

#include "kvtrim/kvtrim.hpp"

namespace paged_fixtures {

//! What the store holds for an fp32 input: x rounded to T.
template <kvtrim::kv_element T>
float stored(float x) {
  return kvtrim::to_float(kvtrim::from_float<T>(x));
}

//! `count` Gaussian values, already rounded to T so that a test can compare exactly.
template <kvtrim::kv_element T = float, class Rng>
std::vector<float> gaussian(Rng& rng, size_t count, float scale = 1.f) {
  std::normal_distribution<float> normal(0.f, scale);
  std::vector<float> v(count);
  for (float& x : v) x = stored<T>(normal(rng));
  return v;
}

//! Positions first .. first + count - 1.
inline std::vector<int32_t> iota_positions(int32_t first, int32_t count) {
  std::vector<int32_t> p(static_cast<size_t>(count));
  for (int32_t i = 0; i < count; ++i) p[static_cast<size_t>(i)] = first + i;
  return p;
}

//! K and V of the first `n` tokens of sequence 0 of a dense cache as [L][n][H][d] rows, the
//! layout append() takes.
inline std::pair<std::vector<float>, std::vector<float>> dense_rows(const kvtrim::dense_cache& dense, int32_t n) {
  const kvtrim::attention_shape shape = dense.shape();
  const auto d = static_cast<std::ptrdiff_t>(shape.head_dim);
  std::vector<float> k, v;
  for (int32_t l = 0; l < shape.layers; ++l)
    for (int32_t t = 0; t < n; ++t)
      for (int32_t h = 0; h < shape.kv_heads; ++h) {
        const auto keys = dense.keys(0, l, h);
        const auto values = dense.values(0, l, h);
        k.insert(k.end(), keys.begin() + t * d, keys.begin() + (t + 1) * d);
        v.insert(v.end(), values.begin() + t * d, values.begin() + (t + 1) * d);
      }
  return {k, v};
}

template <class Cache>
Cache make_cache(const kvtrim::paged_cache_config& config) {
  Cache cache;
  kvtrim::throw_if_error(Cache::create(config, cache), "paged cache create");
  return cache;
}

//! Host vectors in the role of the caller's device buffers (the host mover can reach them).
template <kvtrim::kv_element T>
struct device_memory {
  explicit device_memory(const kvtrim::paged_cache_config& config) : sizes(kvtrim::buffer_sizes<T>(config)) {
    keys.resize(sizes.keys / sizeof(T));
    values.resize(sizes.values / sizeof(T));
    positions.resize(sizes.positions / sizeof(int32_t));
    metrics.resize(sizes.metrics / sizeof(float));
    tables.resize(sizes.block_tables / sizeof(int32_t), 12345);  // garbage until create() fills it
    lengths.resize(sizes.lengths / sizeof(int32_t), 12345);
  }
  [[nodiscard]] kvtrim::device_buffers<T> buffers() {
    return {{keys.data(), values.data(), positions.data(), metrics.data(), tables.data(), lengths.data()}, sizes};
  }
  kvtrim::paged_buffer_sizes sizes;
  std::vector<T> keys, values;
  std::vector<int32_t> positions, tables, lengths;
  std::vector<float> metrics;
};

//! The contiguous buffers an engine owns and a dense_view wraps: per layer
//! K/V [batch][H][capacity][d], positions and metrics [batch][H][capacity], lengths [batch][H].
template <kvtrim::kv_element T>
struct engine_buffers {
  engine_buffers(kvtrim::attention_shape shape, int32_t batch, int32_t capacity) {
    const size_t heads = static_cast<size_t>(batch) * shape.kv_heads, slots = heads * capacity;
    for (int32_t l = 0; l < shape.layers; ++l) {
      keys.emplace_back(slots * shape.head_dim);
      values.emplace_back(slots * shape.head_dim);
      positions.emplace_back(slots);
      metrics.emplace_back(slots);
      lengths.emplace_back(heads);
    }
  }
  [[nodiscard]] std::vector<kvtrim::dense_layer<T>> layers() {
    std::vector<kvtrim::dense_layer<T>> out;
    for (size_t l = 0; l < keys.size(); ++l) out.push_back({keys[l], values[l], positions[l], metrics[l], lengths[l]});
    return out;
  }
  std::vector<std::vector<T>> keys, values;
  std::vector<std::vector<int32_t>> positions, lengths;
  std::vector<std::vector<float>> metrics;
};

//! Appends K/V [L][t][H][d] of tokens at `positions` to a dense cache, token by token.
inline void append_dense(kvtrim::dense_cache& cache, int64_t seq, std::span<const int32_t> positions,
                         std::span<const float> k, std::span<const float> v) {
  const kvtrim::attention_shape shape = cache.shape();
  const size_t t = positions.size(), width = static_cast<size_t>(shape.kv_heads) * shape.head_dim;
  for (int32_t l = 0; l < shape.layers; ++l)
    for (size_t i = 0; i < t; ++i) {
      const size_t row = (static_cast<size_t>(l) * t + i) * width;
      kvtrim::throw_if_error(cache.append(seq, l, positions[i], k.subspan(row, width), v.subspan(row, width)),
                             "append_dense");
    }
}

//! Everything observable of the given sequences: lengths, then each head's positions, keys,
//! values and metrics in slot order.
struct dump {
  std::vector<int32_t> lengths, positions;
  std::vector<float> keys, values, metrics;
  friend bool operator==(const dump&, const dump&) = default;
};

template <class Store>
dump take_dump(const Store& store, std::span<const int64_t> sequences) {
  dump out;
  const kvtrim::attention_shape shape = store.shape();
  const auto d = static_cast<size_t>(shape.head_dim);
  for (const int64_t seq : sequences) {
    if (!store.contains(seq)) continue;
    for (int32_t l = 0; l < shape.layers; ++l)
      for (int32_t h = 0; h < shape.kv_heads; ++h) {
        const auto n = static_cast<size_t>(store.head_length(seq, l, h));
        std::vector<int32_t> p(n);
        std::vector<float> k(n * d), v(n * d), m(n);
        kvtrim::throw_if_error(store.read_head(seq, l, h, p, k, m), "dump read_head");
        kvtrim::throw_if_error(store.read_values(seq, l, h, v), "dump read_values");
        out.lengths.push_back(static_cast<int32_t>(n));
        out.positions.insert(out.positions.end(), p.begin(), p.end());
        out.keys.insert(out.keys.end(), k.begin(), k.end());
        out.values.insert(out.values.end(), v.begin(), v.end());
        out.metrics.insert(out.metrics.end(), m.begin(), m.end());
      }
  }
  return out;
}

}  // namespace paged_fixtures
