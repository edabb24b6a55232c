#pragma once
// Shared by the CUDA parity tests: device buffers, and a host paged cache plus a device
// paged cache (cuda_mover) filled with the same tokens, so both hold the same physical slots.
#include <catch2/catch.hpp>
#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <random>
#include <utility>
#include <vector>

#include "kvtrim/cuda.cuh"

namespace kvtrim_test {

using kvtrim::status;

inline void require_ok(status s) { REQUIRE(kvtrim::to_string(s) == kvtrim::to_string(status::success)); }

//! KVTRIM_QUICK (scripts/gpu-check's sanitizer runs): 1 = one seed instead of two (memcheck,
//! initcheck); 2 = also only head dims 8 and 128, block size 16 and G 1 and 8 (racecheck, the
//! slowest tool), which still launches every kernel and both fast-path dispatches.
inline int quick_level() {
  const char* q = std::getenv("KVTRIM_QUICK");
  return q ? std::atoi(q) : 0;
}
inline bool quick() { return quick_level() >= 1; }
inline bool keep_shape(int32_t d, int32_t bs, int32_t group) {
  return quick_level() < 2 || (d != 64 && bs == 16 && (group == 1 || group == 8));
}

//! Owning device allocation (tests only: the library allocates nothing).
class device_memory {
 public:
  explicit device_memory(size_t bytes) : bytes_(bytes ? bytes : 1) { REQUIRE(cudaMalloc(&ptr_, bytes_) == cudaSuccess); }
  ~device_memory() { cudaFree(ptr_); }
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
  template <class U>
  U* as() const { return static_cast<U*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_;
};

template <class U>
void upload(const device_memory& d, const std::vector<U>& h) {
  REQUIRE(h.size() * sizeof(U) <= d.bytes());
  REQUIRE(cudaMemcpy(d.as<void>(), h.data(), h.size() * sizeof(U), cudaMemcpyHostToDevice) == cudaSuccess);
}
template <class U>
std::vector<U> download(const U* d, size_t n) {
  std::vector<U> h(n);
  REQUIRE(cudaMemcpy(h.data(), d, n * sizeof(U), cudaMemcpyDeviceToHost) == cudaSuccess);
  return h;
}

//! The same cache twice: host (CPU oracle) and device (CUDA backend).
template <kvtrim::kv_element T>
struct twin_caches {
  using device_cache = kvtrim::device_paged_cache<T, kvtrim::dynamic_head_dim, kvtrim::cuda::cuda_mover>;
  kvtrim::paged_cache_config config;
  kvtrim::paged_buffer_sizes sizes;
  device_memory keys, values, positions, metrics, tables, lengths, staging;
  kvtrim::paged_cache<T> host;
  device_cache device;

  explicit twin_caches(const kvtrim::paged_cache_config& c)
      : config(c), sizes(kvtrim::buffer_sizes<T>(c)), keys(sizes.keys), values(sizes.values),
        positions(sizes.positions), metrics(sizes.metrics), tables(sizes.block_tables), lengths(sizes.lengths),
        staging(kvtrim::cuda::cuda_mover::staging_bytes_for(c, c.max_tokens_per_head)) {
    require_ok(kvtrim::paged_cache<T>::create(c, host));
    kvtrim::device_buffers<T> b{{keys.as<T>(), values.as<T>(), positions.as<int32_t>(), metrics.as<float>(),
                                 tables.as<int32_t>(), lengths.as<int32_t>()},
                                sizes};
    kvtrim::cuda::cuda_mover mover{nullptr, staging.as<void>(), staging.bytes()};
    require_ok(device_cache::create(c, kvtrim::device_storage<T, kvtrim::cuda::cuda_mover>{b, mover}, device));
  }

  //! Appends `tokens` random tokens at positions [first, first + tokens) to every layer of `seq`.
  void append(int64_t seq, int32_t first, int32_t tokens, std::mt19937& rng) {
    const auto& s = config.shape;
    const size_t count = static_cast<size_t>(s.layers) * tokens * s.kv_heads * s.head_dim;
    std::normal_distribution<float> dist(0.f, 1.f);
    std::vector<float> k(count), v(count);
    for (auto& x : k) x = dist(rng);
    for (auto& x : v) x = dist(rng);
    std::vector<int32_t> pos(static_cast<size_t>(tokens));
    for (int32_t t = 0; t < tokens; ++t) pos[static_cast<size_t>(t)] = first + t;
    require_ok(host.append(seq, pos, k, v));
    std::vector<T> kt(count), vt(count);
    for (size_t i = 0; i < count; ++i) {
      kt[i] = kvtrim::from_float<T>(k[i]);
      vt[i] = kvtrim::from_float<T>(v[i]);
    }
    device_memory dk(count * sizeof(T)), dv(count * sizeof(T));
    upload(dk, kt);
    upload(dv, vt);
    require_ok(device.append(seq, pos, std::span<const T>(dk.as<T>(), count), std::span<const T>(dv.as<T>(), count)));
  }

  //! Tokens of head (seq, l, h) as (position, key row) pairs, ascending, from either cache:
  //! which of two slots holding one position was kept shows in the key.
  template <class Cache>
  static std::vector<std::pair<int32_t, std::vector<float>>> kept_tokens(const Cache& c, int64_t seq, int32_t l,
                                                                         int32_t h) {
    const int32_t n = c.head_length(seq, l, h), d = c.head_dim();
    std::vector<int32_t> pos(static_cast<size_t>(n));
    std::vector<float> keys(static_cast<size_t>(n) * d), metric(static_cast<size_t>(n));
    require_ok(c.read_head(seq, l, h, pos, keys, metric));
    std::vector<std::pair<int32_t, std::vector<float>>> tokens;
    for (int32_t j = 0; j < n; ++j)
      tokens.emplace_back(pos[static_cast<size_t>(j)],
                          std::vector<float>(keys.begin() + static_cast<ptrdiff_t>(j) * d,
                                             keys.begin() + static_cast<ptrdiff_t>(j + 1) * d));
    std::sort(tokens.begin(), tokens.end());
    return tokens;
  }

  //! Positions of head (seq, l, h), ascending, from either cache.
  template <class Cache>
  static std::vector<int32_t> kept_positions(const Cache& c, int64_t seq, int32_t l, int32_t h) {
    const int32_t n = c.head_length(seq, l, h);
    std::vector<int32_t> pos(static_cast<size_t>(n));
    std::vector<float> keys(static_cast<size_t>(n) * c.head_dim()), metric(static_cast<size_t>(n));
    require_ok(c.read_head(seq, l, h, pos, keys, metric));
    std::sort(pos.begin(), pos.end());
    return pos;
  }
};

}  // namespace kvtrim_test
