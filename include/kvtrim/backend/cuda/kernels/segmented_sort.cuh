#pragma once
//! \file segmented_sort.cuh
//! The one CUB sort the backend instantiates: (uint64 key, int32 value) pairs, ascending,
//! stable, in independent segments [begin[i], end[i]) of one array (segments need not be
//! contiguous; items outside every segment are left alone). Every ranking of the backend is
//! encoded into a 64-bit key so that this single instantiation serves them all (nvcc time).

#include <cub/device/device_segmented_radix_sort.cuh>
#include <cuda_runtime_api.h>

#include <cstdint>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/config.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

struct segmented_sort_arguments {
  const uint64_t* keys_in = nullptr;   //!< [items] device
  uint64_t* keys_out = nullptr;        //!< [items] device
  const int32_t* values_in = nullptr;  //!< [items] device
  int32_t* values_out = nullptr;       //!< [items] device
  int64_t items = 0;                   //!< size of the arrays (every segment lies inside)
  int32_t segments = 0;
  const int64_t* begin = nullptr;      //!< [segments] device
  const int64_t* end = nullptr;        //!< [segments] device
};

[[nodiscard]] inline status can_implement(const segmented_sort_arguments& a) noexcept {
  if (a.items < 0 || a.segments < 0 || a.items > INT32_MAX) return status::not_supported;  // CUB's int offsets
  return status::success;
}

//! CUB's temporary storage for these sizes (no device data is read).
[[nodiscard]] inline size_t workspace_size(const segmented_sort_arguments& a) noexcept {
  size_t bytes = 0;
  if (a.items == 0 || a.segments == 0) return 0;
  if (cub::DeviceSegmentedRadixSort::SortPairs(nullptr, bytes, a.keys_in, a.keys_out, a.values_in, a.values_out,
                                               static_cast<int>(a.items), a.segments, a.begin, a.end) != cudaSuccess)
    return 0;
  return bytes;
}

//! Sorts on `stream`; `workspace` holds workspace_size(a) bytes.
[[nodiscard]] inline status segmented_sort(const segmented_sort_arguments& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.items == 0 || a.segments == 0) return status::success;
  size_t bytes = workspace_size(a);
  KVTRIM_CUDA_TRY(cub::DeviceSegmentedRadixSort::SortPairs(workspace, bytes, a.keys_in, a.keys_out, a.values_in,
                                                           a.values_out, static_cast<int>(a.items), a.segments,
                                                           a.begin, a.end, 0, 64, stream));
  return status::success;
}

namespace detail {

//! Order-preserving bits of a float: a < b  <=>  ordered(a) < ordered(b) (with -0 == +0).
[[nodiscard]] __host__ __device__ __forceinline__ uint32_t ordered_bits(float x) noexcept {
  if (x == 0.f) x = 0.f;  // -0 and +0 compare equal: one key
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}
//! Inverse of ordered_bits.
[[nodiscard]] __host__ __device__ __forceinline__ float from_ordered_bits(uint32_t o) noexcept {
  const uint32_t u = (o & 0x80000000u) ? (o & 0x7fffffffu) : ~o;
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

}  // namespace detail
}  // namespace cuda
KVTRIM_NAMESPACE_END
