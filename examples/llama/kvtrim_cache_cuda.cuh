#pragma once
//! \file kvtrim_cache_cuda.cuh
//! kvtrim_cache.hpp with the store on the GPU, as an engine integrates kvtrim's CUDA backend:
//! K/V live in a `kvtrim::device_paged_cache<float>` over device buffers the example allocates
//! (the library allocates nothing), whose data steps run on the CUDA mover; decode attention
//! (accumulating the slot metrics H2O and KV-Compress rank by, as the CPU path does) and
//! compression with the recent queries run on kvtrim's CUDA backend. Everything goes on one
//! stream per cache; the workspaces are sized by the library and allocated once.
//!
//! The rest of the forward pass stays on the CPU: each step copies its keys, values and queries
//! to the device and the attention output back. `kvtrim_cache<Policy, cuda_paged_cache>` serves
//! the same `kv_cache` contract as the host cache, so `sequence_engine<Policy,
//! cuda_paged_cache>` runs the demo's protocols unchanged.

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstddef>
#include <cstdint>
#include <span>
#include <stdexcept>
#include <string>
#include <utility>

#include "kvtrim/cuda.cuh"
#include "kvtrim_cache.hpp"

namespace llama {

//! Throws "<what>: <CUDA error name>: <description>" unless `e` is cudaSuccess.
inline void check_cuda(cudaError_t e, const std::string& what) {
  if (e != cudaSuccess)
    throw std::runtime_error(what + ": " + cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

//! check() for the CUDA backend's calls: a status::cuda_error also names the runtime's error.
inline void check_device(kvtrim::status s, const std::string& what) {
  if (s != kvtrim::status::cuda_error) return check(s, what);
  const kvtrim::cuda::error_record e = kvtrim::cuda::last_error();
  check(s, what + " (" + cudaGetErrorName(e.code) + ": " + e.message() + ")");
}

//! One cudaMalloc'd buffer (none for 0 bytes), freed with its owner.
class device_memory {
 public:
  device_memory() = default;
  explicit device_memory(std::size_t bytes) : bytes_(bytes) {
    if (bytes > 0) check_cuda(cudaMalloc(&ptr_, bytes), "cudaMalloc of " + std::to_string(bytes) + " bytes");
  }
  device_memory(device_memory&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  device_memory& operator=(device_memory&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  ~device_memory() { static_cast<void>(cudaFree(ptr_)); }  // a destructor cannot report; freeing null is a no-op

  template <class U>
  [[nodiscard]] U* as() const noexcept {
    return static_cast<U*>(ptr_);
  }
  [[nodiscard]] std::size_t bytes() const noexcept { return bytes_; }

 private:
  void* ptr_ = nullptr;
  std::size_t bytes_ = 0;
};

//! The stream every step of one cache runs on.
class cuda_stream {
 public:
  cuda_stream() { check_cuda(cudaStreamCreate(&stream_), "cudaStreamCreate"); }
  cuda_stream(const cuda_stream&) = delete;
  cuda_stream& operator=(const cuda_stream&) = delete;
  ~cuda_stream() { static_cast<void>(cudaStreamDestroy(stream_)); }
  [[nodiscard]] cudaStream_t get() const noexcept { return stream_; }

 private:
  cudaStream_t stream_ = nullptr;
};

//! The paged per-head cache in device memory, its data steps on the CUDA mover.
using cuda_paged_cache = kvtrim::device_paged_cache<float, kvtrim::dynamic_head_dim, kvtrim::cuda::cuda_mover>;

template <>
struct store_traits<cuda_paged_cache> : paged_store_reads<cuda_paged_cache> {
  using store = cuda_paged_cache;
  //! The pool and table mirror (sized by kvtrim::buffer_sizes), the mover's staging buffer
  //! and the stream.
  struct backing {
    cuda_stream stream;
    device_memory keys, values, positions, metrics, tables, lengths, staging;
  };
  static store make(backing& b, const kvtrim::attention_shape& shape, int capacity) {
    const kvtrim::paged_cache_config pc = paged_config(shape, capacity);
    const kvtrim::paged_buffer_sizes sizes = kvtrim::buffer_sizes<float>(pc);
    b.keys = device_memory(sizes.keys);
    b.values = device_memory(sizes.values);
    b.positions = device_memory(sizes.positions);
    b.metrics = device_memory(sizes.metrics);
    b.tables = device_memory(sizes.block_tables);
    b.lengths = device_memory(sizes.lengths);
    b.staging = device_memory(kvtrim::cuda::cuda_mover::staging_bytes_for(pc, 1));  // appends are one token
    const kvtrim::device_buffers<float> buffers{{b.keys.as<float>(), b.values.as<float>(), b.positions.as<int32_t>(),
                                                 b.metrics.as<float>(), b.tables.as<int32_t>(), b.lengths.as<int32_t>()},
                                                sizes};
    const kvtrim::cuda::cuda_mover mover{b.stream.get(), b.staging.as<void>(), b.staging.bytes()};
    store s;
    check_device(store::create(pc, kvtrim::device_storage<float, kvtrim::cuda::cuda_mover>{buffers, mover}, s),
                 "kvtrim::device_paged_cache::create");
    return s;
  }
};

//! The cache over the device store: kvtrim's CUDA backend, driven directly (the compression
//! session runs the CPU backend only).
template <kvtrim::compression_policy Policy>
class kvtrim_cache<Policy, cuda_paged_cache> : public kvtrim_cache_base<cuda_paged_cache> {
 public:
  //! As the host cache's: `capacity` tokens per head, `observed` queries per layer observed.
  kvtrim_cache(const config& c, Policy policy, int capacity, int observed)
      : kvtrim_cache_base(c, capacity, observed),
        policy_(std::move(policy)),
        k_(kv_width() * sizeof(float)),
        v_(kv_width() * sizeof(float)),
        q_(q_width() * sizeof(float)),
        out_(q_width() * sizeof(float)),
        obs_queries_(static_cast<std::size_t>(shape_.layers) * static_cast<std::size_t>(observed) * q_width() *
                     sizeof(float)),
        obs_positions_(static_cast<std::size_t>(observed) * sizeof(int32_t)),
        decode_workspace_(
            std::max(decode_bytes(kvtrim::decode_accumulation::none), decode_bytes(policy_.metric.decode()))),
        compress_workspace_(compress_bytes()) {
    // Every policy of the demo runs on the device (an engine's own allocator would be planned
    // with cpu::plan over this cache and applied with store_.apply: docs/cuda.md).
    check_device(kvtrim::cuda::supports<float>(policy_, shape_), "kvtrim::cuda::supports");
    check_device(store_.add_sequence(seq), "kvtrim::device_paged_cache::add_sequence");
  }

  // ---- the kv_cache contract (forward.hpp)
  void append(int layer, int pos, std::span<const float> k, std::span<const float> v) {
    upload(k_, k.data(), k.size_bytes(), "keys");
    upload(v_, v.data(), v.size_bytes(), "values");
    const int32_t position = pos;
    check_device(store_.append_layer(seq, layer, std::span<const int32_t>(&position, 1), device_span(k_, k.size()),
                                     device_span(v_, v.size())),
                 "kvtrim append at position " + std::to_string(pos));
    appended(layer, pos);
  }
  //! Decode attention on the device; with accumulation on, it adds the policy's metric (H2O p,
  //! KV-Compress p^2, group-reduced as the session reduces it) to the slot metrics. Off, it is
  //! the prompt attention that records nothing.
  void attend(int layer, std::span<const float> q, std::span<float> out) {
    upload(q_, q.data(), q.size_bytes(), "queries");
    const kvtrim::decode_accumulation acc = accumulate_ ? policy_.metric.decode() : kvtrim::decode_accumulation::none;
    check_device(kvtrim::cuda::decode_attention(store_, seqs(), layer, shape_.q_heads, q_.as<float>(), out_.as<float>(),
                                                acc, kvtrim::decode_reduce(policy_.metric), decode_workspace_.as<void>(),
                                                decode_workspace_.bytes(), stream()),
                 accumulate_ ? "kvtrim decode attention" : "kvtrim prompt attention");
    check_cuda(cudaMemcpyAsync(out.data(), out_.as<float>(), out.size_bytes(), cudaMemcpyDeviceToHost, stream()),
               "copy of the attention output to the host");
    check_cuda(cudaStreamSynchronize(stream()), "cudaStreamSynchronize after decode attention");
  }

  //! Runs the policy over every layer now, on the device; with `use_observation` the recent
  //! queries (copied to the device) are its observation window. Freed blocks return to the pool.
  void compress(bool use_observation) {
    const kvtrim::cpu::observation obs = observation(use_observation);
    upload(obs_queries_, obs.queries.data(), obs.queries.size_bytes(), "observation queries");
    upload(obs_positions_, obs.positions.data(), obs.positions.size_bytes(), "observation positions");
    const kvtrim::cuda::device_observation device_obs{obs_queries_.as<float>(), obs_positions_.as<int32_t>(),
                                                      obs.rows()};
    check_device(kvtrim::cuda::compress(policy_, store_, seqs(), shape_, device_obs, compress_workspace_.as<void>(),
                                        compress_workspace_.bytes(), stream()),
                 "kvtrim compression");
  }

  //! Frees the sequence (its blocks return to the pool) and starts a new one at position 0.
  void clear() {
    check_device(store_.free_sequence(seq), "kvtrim::device_paged_cache::free_sequence");
    check_device(store_.add_sequence(seq), "kvtrim::device_paged_cache::add_sequence");
    restart();
  }

 private:
  [[nodiscard]] std::span<const int64_t> seqs() const noexcept { return {&seq, 1}; }
  [[nodiscard]] cudaStream_t stream() const noexcept { return backing_.stream.get(); }
  [[nodiscard]] std::size_t kv_width() const noexcept {
    return static_cast<std::size_t>(shape_.kv_heads) * static_cast<std::size_t>(shape_.head_dim);
  }
  [[nodiscard]] static std::span<const float> device_span(const device_memory& m, std::size_t n) noexcept {
    return {m.as<const float>(), n};
  }
  //! Host -> device on the cache's stream. From pageable memory the runtime has copied the
  //! source when the call returns, so forward's scratch may change at once.
  void upload(const device_memory& dst, const void* src, std::size_t bytes, const char* what) const {
    if (bytes > 0)
      check_cuda(cudaMemcpyAsync(dst.as<void>(), src, bytes, cudaMemcpyHostToDevice, stream()),
                 std::string("copy of the step's ") + what + " to the device");
  }
  [[nodiscard]] std::size_t decode_bytes(kvtrim::decode_accumulation acc) const {
    return kvtrim::cuda::decode_workspace_size(store_, 1, shape_.q_heads, acc);
  }
  //! The most any compression needs (0 to `observed_` window rows).
  [[nodiscard]] std::size_t compress_bytes() const {
    std::size_t most = 0;
    for (int rows = 0; rows <= observed_; ++rows)
      most = std::max(most, kvtrim::cuda::compress_workspace_size(policy_, store_, shape_, 1, rows));
    return most;
  }

  Policy policy_;
  device_memory k_, v_;                          // [Hkv][d] the step's key and value of one layer
  device_memory q_, out_;                        // [Hq][d] the step's query and attention output
  device_memory obs_queries_, obs_positions_;    // [L][observed][Hq][d], [observed]
  device_memory decode_workspace_;
  device_memory compress_workspace_;
};

}  // namespace llama
