#pragma once
//! \file kvtrim_cache_cuda.cuh
//! kvtrim_cache.hpp with the store on the GPU, as an engine integrates kvtrim's CUDA backend:
//! K/V live in a `kvtrim::device_paged_cache<float>` over device buffers the example allocates
//! (the library allocates nothing), whose data steps run on the CUDA mover, and one
//! `kvtrim::cuda::compression_session` runs kvtrim's loop on the device as the host cache's
//! session does on the CPU: append, decode attention (accumulating the slot metrics H2O and
//! KV-Compress rank by) and compression with the recent queries. Everything goes on one
//! stream per cache; the workspaces are sized by the library and allocated once.
//!
//! The rest of the forward pass stays on the CPU: each step copies its keys, values and queries
//! to the device and the attention output back. `kvtrim_cache<Policy, cuda_paged_cache>` serves
//! the same `kv_cache` contract as the host cache, so `sequence_engine<Policy,
//! cuda_paged_cache>` runs the demo's protocols unchanged.

#include <cuda_runtime_api.h>

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

//! The cache over the device store: kvtrim's CUDA backend, through one device compression
//! session.
template <kvtrim::compression_policy Policy>
class kvtrim_cache<Policy, cuda_paged_cache> : public kvtrim_cache_base<cuda_paged_cache> {
  using session_type = kvtrim::cuda::compression_session<Policy, float, kvtrim::dynamic_head_dim>;

 public:
  //! As the host cache's: `capacity` tokens per head, `observed` queries per layer observed.
  kvtrim_cache(const config& c, Policy policy, int capacity, int observed)
      : kvtrim_cache_base(c, capacity, observed),
        k_(kv_width() * sizeof(float)),
        v_(kv_width() * sizeof(float)),
        q_(q_width() * sizeof(float)),
        out_(q_width() * sizeof(float)),
        obs_queries_(static_cast<std::size_t>(shape_.layers) * static_cast<std::size_t>(observed) * q_width() *
                     sizeof(float)),
        obs_positions_(static_cast<std::size_t>(observed) * sizeof(int32_t)),
        prompt_workspace_(kvtrim::cuda::decode_workspace_size(store_, 1, shape_.q_heads, kvtrim::decode_accumulation::none)),
        session_workspace_(session_type::workspace_size(policy, store_, shape_, 1, observed)) {
    // Every policy of the demo runs on the device: create checks it (cuda::supports) first. An
    // engine's own allocator would be planned with cpu::plan over this cache and applied with
    // store_.apply (docs/cuda.md).
    check_device(session_type::create(store_, shape_, std::move(policy), 1, observed, session_workspace_.as<void>(),
                                      session_workspace_.bytes(), stream(), session_),
                 "kvtrim::cuda::compression_session::create");
    check_device(session_.add_sequence(seq), "kvtrim::cuda::compression_session::add_sequence");
  }

  // ---- the kv_cache contract (forward.hpp)
  void append(int layer, int pos, std::span<const float> k, std::span<const float> v) {
    upload(k_, k.data(), k.size_bytes(), "keys");
    upload(v_, v.data(), v.size_bytes(), "values");
    const int32_t position = pos;
    check_device(session_.append(seq, layer, std::span<const int32_t>(&position, 1), device_span(k_, k.size()),
                                 device_span(v_, v.size())),
                 "kvtrim append at position " + std::to_string(pos));
    appended(layer, pos);
  }
  //! Decode attention on the device; with accumulation on, the session adds the policy's metric
  //! (H2O p, KV-Compress p^2, group-reduced) to the slot metrics. Off, it is the prompt
  //! attention that records nothing, as an engine's prefill kernel would.
  void attend(int layer, std::span<const float> q, std::span<float> out) {
    upload(q_, q.data(), q.size_bytes(), "queries");
    if (accumulate_) {
      check_device(session_.attend(seqs(), layer, q_.as<float>(), out_.as<float>()), "kvtrim decode attention");
    } else {
      check_device(kvtrim::cuda::decode_attention(store_, seqs(), layer, shape_.q_heads, q_.as<float>(),
                                                  out_.as<float>(), kvtrim::decode_accumulation::none,
                                                  kvtrim::decode_reduce(session_.policy().metric),
                                                  prompt_workspace_.as<void>(), prompt_workspace_.bytes(), stream()),
                   "kvtrim prompt attention");
    }
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
    check_device(session_.compress(seqs(), device_obs), "kvtrim compression");
  }

  //! Frees the sequence (its blocks return to the pool) and starts a new one at position 0.
  void clear() {
    check_device(session_.free_sequence(seq), "kvtrim::cuda::compression_session::free_sequence");
    check_device(session_.add_sequence(seq), "kvtrim::cuda::compression_session::add_sequence");
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

  device_memory k_, v_;                        // [Hkv][d] the step's key and value of one layer
  device_memory q_, out_;                      // [Hq][d] the step's query and attention output
  device_memory obs_queries_, obs_positions_;  // [L][observed][Hq][d], [observed]
  device_memory prompt_workspace_;             // the prompt attention's (no accumulation)
  device_memory session_workspace_;            // the session's: decode and compression steps
  session_type session_;
};

}  // namespace llama
