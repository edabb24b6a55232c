#pragma once
// Shared by the GPU benchmarks: device buffers, CUDA-event timing, the device-to-device copy
// bandwidth of this run, and a Llama-3-8B layer in a device paged cache.
#include <benchmark/benchmark.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

#include "kvtrim/cuda.cuh"

namespace kvtrim_bench {

inline bool have_device() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

struct device_memory {
  void* ptr = nullptr;
  size_t bytes = 0;
  explicit device_memory(size_t b) : bytes(b ? b : 1) {
    if (cudaMalloc(&ptr, bytes) != cudaSuccess) ptr = nullptr;
  }
  ~device_memory() { cudaFree(ptr); }
  device_memory(const device_memory&) = delete;
  device_memory& operator=(const device_memory&) = delete;
  template <class U>
  U* as() const { return static_cast<U*>(ptr); }
};

//! Fills `count` elements with values in [-1, 1) from a hash of the index and `seed`: never
//! time on constants, which tie every score and can run faster than real data.
template <class T>
__global__ void fill_random_kernel(T* out, size_t count, uint32_t seed) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint32_t h = static_cast<uint32_t>(i) * 0x9e3779b9u ^ static_cast<uint32_t>(i >> 32) ^ seed;
    h ^= h >> 16;
    h *= 0x85ebca6bu;
    h ^= h >> 13;
    h *= 0xc2b2ae35u;
    h ^= h >> 16;
    out[i] = kvtrim::from_float<T>(static_cast<float>(h >> 8) * (2.f / 16777216.f) - 1.f);
  }
}
template <class T>
void fill_random(T* out, size_t count, uint32_t seed) {
  fill_random_kernel<T><<<1024, 256>>>(out, count, seed);
}

//! Times `body` (launches on `stream`) with CUDA events, `state` iterations.
template <class F>
void time_iterations(benchmark::State& state, cudaStream_t stream, F&& body) {
  cudaEvent_t start, stop;
  cudaEventCreate(&start);
  cudaEventCreate(&stop);
  body();  // warm-up
  cudaStreamSynchronize(stream);
  for (auto _ : state) {
    cudaEventRecord(start, stream);
    body();
    cudaEventRecord(stop, stream);
    cudaEventSynchronize(stop);
    float ms = 0.f;
    cudaEventElapsedTime(&ms, start, stop);
    state.SetIterationTime(static_cast<double>(ms) / 1e3);
  }
  cudaEventDestroy(start);
  cudaEventDestroy(stop);
}

//! Times `launch(stream)`, which returns the kvtrim::status of its launches, on a stream of its
//! own; a failing status skips the benchmark with the status's name.
template <class F>
void time_launches(benchmark::State& state, F&& launch) {
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  kvtrim::status st = kvtrim::status::success;
  time_iterations(state, stream, [&] { st = launch(stream); });
  cudaStreamDestroy(stream);
  if (st != kvtrim::status::success) state.SkipWithError(std::string(kvtrim::to_string(st)).c_str());
}

//! `body` (launches on `stream`) captured in a CUDA graph; null if capture or instantiation
//! failed. The caller destroys it (cudaGraphExecDestroy).
template <class F>
cudaGraphExec_t capture_graph(cudaStream_t stream, F&& body) {
  cudaGraph_t graph = nullptr;
  cudaGraphExec_t exec = nullptr;
  if (cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) != cudaSuccess) return nullptr;
  const bool launched = body();
  const bool captured = cudaStreamEndCapture(stream, &graph) == cudaSuccess;
  if (!launched || !captured || cudaGraphInstantiate(&exec, graph, 0) != cudaSuccess) exec = nullptr;
  if (graph) cudaGraphDestroy(graph);
  return exec;
}

//! Device-to-device copy bandwidth in bytes/s (read + write counted), measured once per run.
inline double copy_bandwidth() {
  static double bw = [] {
    const size_t bytes = size_t{1} << 30;
    device_memory a(bytes), b(bytes);
    if (!a.ptr || !b.ptr) return 0.0;
    cudaEvent_t s, e;
    cudaEventCreate(&s);
    cudaEventCreate(&e);
    cudaMemcpy(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice);
    float best = 1e30f;
    for (int i = 0; i < 10; ++i) {
      cudaEventRecord(s);
      cudaMemcpy(b.ptr, a.ptr, bytes, cudaMemcpyDeviceToDevice);
      cudaEventRecord(e);
      cudaEventSynchronize(e);
      float ms = 0.f;
      cudaEventElapsedTime(&ms, s, e);
      best = ms < best ? ms : best;
    }
    cudaEventDestroy(s);
    cudaEventDestroy(e);
    return 2.0 * static_cast<double>(bytes) / (static_cast<double>(best) / 1e3);
  }();
  return bw;
}

//! Bytes processed, achieved TB/s and the fraction of the copy bandwidth.
inline void report_bandwidth(benchmark::State& state, double bytes_per_iteration) {
  state.SetBytesProcessed(static_cast<int64_t>(bytes_per_iteration * static_cast<double>(state.iterations())));
  state.counters["TB/s"] = benchmark::Counter(bytes_per_iteration / 1e12, benchmark::Counter::kIsIterationInvariantRate);
  const double copy = copy_bandwidth();
  state.counters["copy_TB/s"] = copy / 1e12;
  state.counters["bytes"] = bytes_per_iteration;
}

//! Llama-3-8B, one layer: 32 query heads, 8 KV heads, head dim 128, bf16, block size 16.
inline constexpr int32_t q_heads = 32, kv_heads = 8, head_dim = 128, block_size = 16;

using element = kvtrim::bfloat16;
using device_cache = kvtrim::device_paged_cache<element, kvtrim::dynamic_head_dim, kvtrim::cuda::cuda_mover>;

//! One layer's device cache holding `batch` sequences of `n` tokens each (random K/V).
struct layer_cache {
  kvtrim::paged_cache_config config;
  kvtrim::paged_buffer_sizes sizes;
  device_memory keys, values, positions, metrics, tables, lengths, staging;
  device_cache cache;
  std::vector<int64_t> seqs;
  bool ok = false;

  layer_cache(int32_t batch, int32_t n)
      : config{{1, q_heads, kv_heads, head_dim}, block_size,
               static_cast<int32_t>(static_cast<int64_t>(batch) * kv_heads * (n / block_size + 2)), batch, n + 64},
        sizes(kvtrim::buffer_sizes<element>(config)), keys(sizes.keys), values(sizes.values), positions(sizes.positions),
        metrics(sizes.metrics), tables(sizes.block_tables), lengths(sizes.lengths),
        staging(kvtrim::cuda::cuda_mover::staging_bytes_for(config, n)) {
    if (!keys.ptr || !values.ptr || !staging.ptr) return;
    kvtrim::device_buffers<element> b{{keys.as<element>(), values.as<element>(), positions.as<int32_t>(),
                                       metrics.as<float>(), tables.as<int32_t>(), lengths.as<int32_t>()},
                                      sizes};
    kvtrim::cuda::cuda_mover mover{nullptr, staging.ptr, staging.bytes};
    if (device_cache::create(config, kvtrim::device_storage<element, kvtrim::cuda::cuda_mover>{b, mover}, cache) !=
        kvtrim::status::success)
      return;
    const size_t rows = static_cast<size_t>(n) * kv_heads;
    device_memory k(rows * head_dim * sizeof(element)), v(rows * head_dim * sizeof(element));
    fill_random(k.as<element>(), rows * head_dim, 1);
    fill_random(v.as<element>(), rows * head_dim, 2);
    std::vector<int32_t> pos(static_cast<size_t>(n));
    for (int32_t i = 0; i < n; ++i) pos[static_cast<size_t>(i)] = i;
    for (int32_t s = 0; s < batch; ++s) {
      if (cache.add_sequence(s) != kvtrim::status::success) return;
      if (cache.append(s, pos, std::span<const element>(k.as<element>(), rows * head_dim),
                       std::span<const element>(v.as<element>(), rows * head_dim)) != kvtrim::status::success)
        return;
      seqs.push_back(s);
    }
    cudaDeviceSynchronize();
    ok = true;
  }
};

}  // namespace kvtrim_bench
