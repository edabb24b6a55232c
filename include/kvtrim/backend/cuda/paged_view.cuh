#pragma once
//! \file paged_view.cuh
//! What every kernel reads of a paged per-head cache (cache/paged_layout.hpp): raw device
//! pointers to the pool and to the mirror of the block tables and lengths, plus the sizes.
//! A plain aggregate, passed inside each kernel's params by value.

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/cache/paged_layout.hpp"
#include "kvtrim/cache/slot_mover.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

template <kv_element T>
struct paged_view {
  T* keys = nullptr;                    //!< [num_blocks][block_size][head_dim]
  T* values = nullptr;                  //!< [num_blocks][block_size][head_dim]
  int32_t* positions = nullptr;         //!< [num_blocks][block_size]
  float* metrics = nullptr;             //!< [num_blocks][block_size]
  const int32_t* block_tables = nullptr;//!< [max_sequences][L][H][max_blocks_per_head]
  const int32_t* lengths = nullptr;     //!< [max_sequences][L][H] tokens
  int32_t layers = 0;                   //!< L
  int32_t heads = 0;                    //!< H stored heads per layer
  int32_t head_dim = 0;                 //!< d
  int32_t block_size = 1;               //!< tokens per block (runtime, house style rule 4)
  int32_t max_blocks_per_head = 0;

  //! Flat index of head (row, l, h) into lengths [S][L][H].
  [[nodiscard]] __host__ __device__ int64_t head_index(int32_t row, int32_t l, int32_t h) const noexcept {
    return (static_cast<int64_t>(row) * layers + l) * heads + h;
  }
  //! Physical slot of slot j of flat head `head`.
  [[nodiscard]] __device__ int64_t physical(int64_t head, int32_t j) const noexcept {
    // A power-of-two block size (the usual 16) divides by a shift: an int division is about
    // twenty instructions, on every key of every kernel.
    int32_t b;
    if ((block_size & (block_size - 1)) == 0) {
      b = j >> (__ffs(block_size) - 1);
    } else {
      b = j / block_size;
    }
    return static_cast<int64_t>(block_tables[head * max_blocks_per_head + b]) * block_size + (j - b * block_size);
  }

  //! invalid_argument for a null pointer or a non-positive size.
  [[nodiscard]] status validate() const noexcept {
    if (!keys || !values || !positions || !metrics || !block_tables || !lengths) return status::invalid_argument;
    if (layers < 1 || heads < 1 || head_dim < 1 || block_size < 1 || max_blocks_per_head < 1)
      return status::invalid_argument;
    return status::success;
  }
};

//! The view of a cache's device buffers (device_paged_cache: `make_view(cache.buffers(), cache.config())`).
template <kv_element T>
[[nodiscard]] paged_view<T> make_view(const paged_buffers<T>& b, const paged_cache_config& c) noexcept {
  return {b.keys,          b.values,           b.positions,        b.metrics,   b.block_tables,
          b.lengths,       c.shape.layers,     c.shape.kv_heads,   c.shape.head_dim,
          c.block_size,    c.max_blocks_per_head()};
}

namespace detail {

[[nodiscard]] constexpr int64_t ceil_div(int64_t a, int64_t b) noexcept { return (a + b - 1) / b; }

//! log2(e) / sqrt(d): q . k times it is the attention logit in base 2. The attention kernels
//! scale each query once by it, so a probability is one exp2 instead of a division and an exp.
[[nodiscard]] inline float base2_logit_scale(int32_t head_dim) noexcept {
  return 1.4426950408889634f / std::sqrt(static_cast<float>(head_dim));
}

//! Bytes rounded up to 256 so every carved workspace buffer is aligned for vector loads.
[[nodiscard]] constexpr size_t align_up(size_t bytes) noexcept { return (bytes + 255u) & ~size_t{255}; }

//! Carves typed buffers out of one caller-provided workspace; with a null base it only counts.
class workspace_carver {
 public:
  explicit workspace_carver(void* base) noexcept : base_(static_cast<char*>(base)) {}
  template <class U>
  U* take(int64_t count) noexcept {
    U* p = base_ ? reinterpret_cast<U*>(base_ + used_) : nullptr;
    used_ += align_up(static_cast<size_t>(count < 0 ? 0 : count) * sizeof(U));
    return p;
  }
  [[nodiscard]] size_t used() const noexcept { return used_; }

 private:
  char* base_;
  size_t used_ = 0;
};

//! fp32 value of a stored element (device side of core/numeric.hpp, bit-identical).
template <kv_element T>
[[nodiscard]] __device__ __forceinline__ float load(const T& x) noexcept {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else if constexpr (std::is_same_v<T, bfloat16>) {
    return __uint_as_float(static_cast<uint32_t>(x.bits) << 16);
  } else {
    return to_float(x);
  }
}

//! Mirror index of head `hi` of a batch's workspace arrays, laid out [batch][layer_count][H]:
//! entry b is the sequence in mirror row rows[b]; `layer` receives the head's layer.
template <kv_element T>
[[nodiscard]] __device__ __forceinline__ int64_t batch_head(const paged_view<T>& pool, const int32_t* rows,
                                                            int32_t first_layer, int32_t layer_count, int64_t hi,
                                                            int32_t& layer) {
  const int64_t per_b = static_cast<int64_t>(layer_count) * pool.heads;
  const auto b = static_cast<int32_t>(hi / per_b);
  const auto rest = static_cast<int32_t>(hi - b * per_b);
  layer = first_layer + rest / pool.heads;
  return pool.head_index(rows[b], layer, rest % pool.heads);
}

//! Flat index of (batch entry b, head h) in per-batch workspace arrays.
[[nodiscard]] __host__ __device__ __forceinline__ int64_t head_slot(int32_t b, int32_t h, int32_t heads) noexcept {
  return static_cast<int64_t>(b) * heads + h;
}

//! Sets a kernel's dynamic shared memory limit where it needs more than the default 48 KiB.
template <class Kernel>
[[nodiscard]] status allow_smem(Kernel* kernel, size_t bytes) {
  if (bytes > 48 * 1024)
    KVTRIM_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  return status::success;
}

//! Grid-stride loop bound for 1-D element kernels.
[[nodiscard]] inline unsigned grid_for(int64_t items, int32_t threads, int64_t cap = 65535LL * 32) noexcept {
  const int64_t blocks = ceil_div(items > 0 ? items : 1, threads);
  return static_cast<unsigned>(blocks < cap ? blocks : cap);
}

}  // namespace detail
}  // namespace cuda
KVTRIM_NAMESPACE_END
