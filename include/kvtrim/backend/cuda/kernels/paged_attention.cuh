#pragma once
//! \file paged_attention.cuh
//! Paged decode attention over per-(sequence, layer, KV head) block tables with per-head
//! lengths (KV-Compress's layout, §6; the CPU semantics are backend/cpu/paged_attention.hpp).
//! GQA: one pass over each KV head serves its G query heads; K/V are never repeated.
//! Flash-decoding split: each CTA reads `tokens_per_split` keys of one head for all G queries
//! and keeps an online softmax in fp32; a second kernel merges the splits. With accumulation
//! on, the split kernel also stores each key's logit and a third kernel adds every key's
//! probability (H2O sum) or squared probability (KV-Compress L2), reduced over the group, to
//! its slot metric: the scores fused attention kernels of the references cannot give.
//!
//! Limits: G <= attention_tuning::max_group (8), head dim <= 256. K/V fp32, fp16 or bf16;
//! queries and outputs fp32; accumulation fp32.

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>

#include "kvtrim/backend/cuda/dispatch.cuh"
#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/concepts.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

template <kv_element T>
struct decode_arguments {
  paged_view<T> pool;
  const int32_t* rows = nullptr;  //!< [batch] device: the mirror row (block_tables::sequence_slot) of each sequence
  int32_t batch = 0;
  int32_t layer = 0;
  int32_t q_heads = 0;            //!< Hq; G = Hq / H
  int32_t max_length = 0;         //!< >= every head length of the batch (sizes splits and workspace)
  const float* q = nullptr;       //!< [batch][Hq][d] device
  float* out = nullptr;           //!< [batch][Hq][d] device
  decode_accumulation accumulate = decode_accumulation::none;
  gqa_reduce reduce = gqa_reduce::mean;  //!< how the group's probabilities become one metric
};

inline constexpr int32_t max_attention_head_dim = 256;

template <kv_element T>
[[nodiscard]] status can_implement(const decode_arguments<T>& a) noexcept {
  if (const status s = a.pool.validate(); s != status::success) return s;
  if (a.batch < 0 || a.batch > 65535 || a.layer < 0 || a.layer >= a.pool.layers) return status::invalid_argument;
  if (a.q_heads < a.pool.heads || a.q_heads % a.pool.heads != 0) return status::invalid_group;
  if (a.q_heads / a.pool.heads > default_tuning.attention.max_group) return status::not_supported;
  if (a.pool.head_dim > max_attention_head_dim) return status::not_supported;
  if (a.max_length < 1) return status::invalid_argument;
  if (a.batch > 0 && (!a.rows || !a.q || !a.out)) return status::invalid_argument;
  if (a.accumulate != decode_accumulation::none && a.reduce == gqa_reduce::per_query_head) return status::not_supported;
  return status::success;
}

namespace detail {

struct decode_layout {
  int32_t group = 1;
  int32_t splits = 1;
  int64_t partial_acc = 0;    // [batch][H][splits][G][d]
  int64_t partial_stats = 0;  // [batch][H][splits][G][2]
  int64_t logits = 0;         // [batch][H][G][max_length] (accumulation only)
  int64_t stats = 0;          // [batch][H][G][2] (accumulation only)
};

template <kv_element T>
[[nodiscard]] decode_layout decode_layout_of(const decode_arguments<T>& a) noexcept {
  decode_layout l;
  l.group = a.pool.heads > 0 ? a.q_heads / a.pool.heads : 1;
  l.splits = static_cast<int32_t>(ceil_div(a.max_length, default_tuning.attention.tokens_per_split));
  const int64_t heads = static_cast<int64_t>(a.batch) * a.pool.heads;
  l.partial_acc = heads * l.splits * l.group * a.pool.head_dim;
  l.partial_stats = heads * l.splits * l.group * 2;
  if (a.accumulate != decode_accumulation::none) {
    l.logits = heads * l.group * a.max_length;
    l.stats = heads * l.group * 2;
  }
  return l;
}

}  // namespace detail

//! fp32 partial results of the splits (and, with accumulation, every key's logit).
template <kv_element T>
[[nodiscard]] size_t workspace_size(const decode_arguments<T>& a) noexcept {
  const detail::decode_layout l = detail::decode_layout_of(a);
  detail::workspace_carver w(nullptr);
  w.take<float>(l.partial_acc);
  w.take<float>(l.partial_stats);
  w.take<float>(l.logits);
  w.take<float>(l.stats);
  return w.used();
}

namespace detail {

template <kv_element T>
struct decode_params {
  decode_arguments<T> args;
  int32_t group;
  int32_t splits;
  int32_t split_tokens;
  float sqrt_d;
  float* partial_acc;
  float* partial_stats;
  float* logits;
  float* stats;
};

//! Lanes that share one key: the head dim is split into 8-element pieces for the fast paths;
//! the generic kernel gives the whole warp to one key and strides over d.
template <int32_t HeadDim>
inline constexpr int32_t lanes_per_key = HeadDim == dynamic_head_dim ? 32 : (HeadDim / 8 < 1 ? 1 : (HeadDim / 8 > 32 ? 32 : HeadDim / 8));
template <int32_t HeadDim>
inline constexpr int32_t elements_per_lane =
    HeadDim == dynamic_head_dim ? max_attention_head_dim / 32 : (HeadDim + lanes_per_key<HeadDim> - 1) / lanes_per_key<HeadDim>;

//! Element e of sub-lane `sub`: contiguous pieces for the fast paths, strided for the generic one.
template <int32_t HeadDim>
__device__ __forceinline__ int32_t element_of(int32_t sub, int32_t e) {
  if constexpr (HeadDim == dynamic_head_dim) {
    return sub + 32 * e;
  } else {
    return sub * elements_per_lane<HeadDim> + e;
  }
}

template <kv_element T, int32_t HeadDim, int32_t Threads, int32_t MaxGroup>
__global__ void __launch_bounds__(Threads) decode_split_kernel(const __grid_constant__ decode_params<T> p) {
  constexpr int32_t lpk = lanes_per_key<HeadDim>;
  constexpr int32_t epl = elements_per_lane<HeadDim>;
  constexpr int32_t keys_per_warp = 32 / lpk;
  constexpr int32_t warps = Threads / 32;
  constexpr int32_t subgroups = warps * keys_per_warp;
  extern __shared__ float smem[];  // [subgroups][G][d] acc, then [subgroups][G] max and sum

  const auto& a = p.args;
  const int32_t d = head_dim_of<HeadDim>(a.pool.head_dim);
  const int32_t G = p.group;
  const int32_t h = blockIdx.y, b = blockIdx.z, split = blockIdx.x;
  const int64_t head = a.pool.head_index(a.rows[b], a.layer, h);
  const int32_t length = a.pool.lengths[head];
  const int32_t begin = split * p.split_tokens;
  const int32_t end = min(length, begin + p.split_tokens);

  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t sub = lane % lpk;
  const int32_t subgroup = warp * keys_per_warp + lane / lpk;

  float q[MaxGroup][epl];
  float acc[MaxGroup][epl];
  float m[MaxGroup], s[MaxGroup];
  const float* qb = a.q + (static_cast<int64_t>(b) * a.q_heads + static_cast<int64_t>(h) * G) * d;
#pragma unroll
  for (int32_t g = 0; g < MaxGroup; ++g) {
    m[g] = -INFINITY;
    s[g] = 0.f;
#pragma unroll
    for (int32_t e = 0; e < epl; ++e) {
      const int32_t c = element_of<HeadDim>(sub, e);
      q[g][e] = (g < G && c < d) ? qb[static_cast<int64_t>(g) * d + c] : 0.f;
      acc[g][e] = 0.f;
    }
  }

  // Every lane of a warp runs the same number of iterations (the shuffles need them all).
  for (int32_t base = begin; base < end; base += subgroups) {
    const int32_t j = base + subgroup;
    const bool valid = j < end;
    const int64_t slot = valid ? a.pool.physical(head, j) : 0;
    float kv[epl];
#pragma unroll
    for (int32_t e = 0; e < epl; ++e) {
      const int32_t c = element_of<HeadDim>(sub, e);
      kv[e] = (valid && c < d) ? load(a.pool.keys[slot * d + c]) : 0.f;
    }
    float logit[MaxGroup];
#pragma unroll
    for (int32_t g = 0; g < MaxGroup; ++g) {
      float dot = 0.f;
#pragma unroll
      for (int32_t e = 0; e < epl; ++e) dot += q[g][e] * kv[e];
#pragma unroll
      for (int32_t offset = lpk / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
      logit[g] = dot / p.sqrt_d;
    }
#pragma unroll
    for (int32_t e = 0; e < epl; ++e) {
      const int32_t c = element_of<HeadDim>(sub, e);
      kv[e] = (valid && c < d) ? load(a.pool.values[slot * d + c]) : 0.f;
    }
    if (valid) {
#pragma unroll
      for (int32_t g = 0; g < MaxGroup; ++g) {
        if (g >= G) break;
        const float m_new = fmaxf(m[g], logit[g]);
        const float scale = expf(m[g] - m_new);
        const float w = expf(logit[g] - m_new);
        s[g] = s[g] * scale + w;
#pragma unroll
        for (int32_t e = 0; e < epl; ++e) acc[g][e] = acc[g][e] * scale + w * kv[e];
        m[g] = m_new;
        if (p.logits && sub == 0) p.logits[(head_slot(b, h, a.pool.heads) * G + g) * a.max_length + j] = logit[g];
      }
    }
  }

  // Merge the subgroups of the CTA in shared memory, then write this split's partial result.
  float* sacc = smem;                                              // [subgroups][G][d]
  float* smax = smem + static_cast<int64_t>(subgroups) * G * d;    // [subgroups][G]
  float* ssum = smax + subgroups * G;                              // [subgroups][G]
#pragma unroll
  for (int32_t g = 0; g < MaxGroup; ++g) {
    if (g >= G) break;
    if (sub == 0) {
      smax[subgroup * G + g] = m[g];
      ssum[subgroup * G + g] = s[g];
    }
#pragma unroll
    for (int32_t e = 0; e < epl; ++e) {
      const int32_t c = element_of<HeadDim>(sub, e);
      if (c < d) sacc[(static_cast<int64_t>(subgroup) * G + g) * d + c] = acc[g][e];
    }
  }
  __syncthreads();
  const int64_t part = (head_slot(b, h, a.pool.heads) * p.splits + split) * G;
  for (int32_t i = threadIdx.x; i < G * d; i += Threads) {
    const int32_t g = i / d, c = i - g * d;
    float mx = -INFINITY;
    for (int32_t t = 0; t < subgroups; ++t) mx = fmaxf(mx, smax[t * G + g]);
    float sum = 0.f, out = 0.f;
    if (mx != -INFINITY) {
      for (int32_t t = 0; t < subgroups; ++t) {
        const float f = expf(smax[t * G + g] - mx);
        sum += ssum[t * G + g] * f;
        out += sacc[(static_cast<int64_t>(t) * G + g) * d + c] * f;
      }
    }
    p.partial_acc[(part + g) * d + c] = out;
    if (c == 0) {
      p.partial_stats[(part + g) * 2] = mx;
      p.partial_stats[(part + g) * 2 + 1] = sum;
    }
  }
}

template <kv_element T>
__global__ void decode_combine_kernel(const __grid_constant__ decode_params<T> p) {
  const auto& a = p.args;
  const int32_t d = a.pool.head_dim, G = p.group;
  const int32_t h = blockIdx.x, b = blockIdx.y;
  const int64_t hs = head_slot(b, h, a.pool.heads);
  for (int32_t i = threadIdx.x; i < G * d; i += blockDim.x) {
    const int32_t g = i / d, c = i - g * d;
    float mx = -INFINITY;
    for (int32_t t = 0; t < p.splits; ++t) mx = fmaxf(mx, p.partial_stats[((hs * p.splits + t) * G + g) * 2]);
    float sum = 0.f, out = 0.f;
    for (int32_t t = 0; t < p.splits; ++t) {
      const int64_t part = (hs * p.splits + t) * G + g;
      const float pm = p.partial_stats[part * 2];
      if (pm == -INFINITY) continue;
      const float f = expf(pm - mx);
      sum += p.partial_stats[part * 2 + 1] * f;
      out += p.partial_acc[part * d + c] * f;
    }
    a.out[(static_cast<int64_t>(b) * a.q_heads + static_cast<int64_t>(h) * G + g) * d + c] = sum > 0.f ? out / sum : 0.f;
    if (p.stats && c == 0) {
      p.stats[(hs * G + g) * 2] = mx;
      p.stats[(hs * G + g) * 2 + 1] = sum;
    }
  }
}

//! slot metric += the group reduction of p (sum) or p^2 (squared_sum), p = exp(logit - M) / S.
template <kv_element T>
__global__ void decode_metric_kernel(const __grid_constant__ decode_params<T> p) {
  const auto& a = p.args;
  const int32_t G = p.group;
  const int32_t h = blockIdx.y, b = blockIdx.z;
  const int64_t hs = head_slot(b, h, a.pool.heads);
  const int64_t head = a.pool.head_index(a.rows[b], a.layer, h);
  const int32_t length = a.pool.lengths[head];
  for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < length; j += gridDim.x * blockDim.x) {
    float v = 0.f;
    for (int32_t g = 0; g < G; ++g) {
      const float mx = p.stats[(hs * G + g) * 2], sum = p.stats[(hs * G + g) * 2 + 1];
      float x = expf(p.logits[(hs * G + g) * a.max_length + j] - mx) / sum;
      if (a.accumulate == decode_accumulation::squared_sum) x *= x;
      v = a.reduce == gqa_reduce::max ? (g == 0 ? x : fmaxf(v, x)) : v + x;
    }
    if (a.reduce == gqa_reduce::mean) v /= static_cast<float>(G);
    a.pool.metrics[a.pool.physical(head, j)] += v;
  }
}

template <kv_element T, int32_t HeadDim>
[[nodiscard]] status launch_decode(const decode_params<T>& p, cudaStream_t stream) {
  constexpr int32_t threads = default_tuning.attention.threads;
  constexpr int32_t max_group = default_tuning.attention.max_group;
  constexpr int32_t subgroups = (threads / 32) * (32 / lanes_per_key<HeadDim>);
  const auto& a = p.args;
  const size_t smem = static_cast<size_t>(subgroups) * p.group * (a.pool.head_dim + 2) * sizeof(float);
  auto kernel = decode_split_kernel<T, HeadDim, threads, max_group>;
  if (smem > 48 * 1024) KVTRIM_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(a.pool.heads), static_cast<unsigned>(a.batch));
  kernel<<<grid, threads, smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  decode_combine_kernel<T><<<dim3(a.pool.heads, a.batch), 128, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  if (p.logits) {
    const int32_t t = default_tuning.elementwise.threads;
    const dim3 g(static_cast<unsigned>(ceil_div(a.max_length, t)), static_cast<unsigned>(a.pool.heads),
                 static_cast<unsigned>(a.batch));
    decode_metric_kernel<T><<<g, t, 0, stream>>>(p);
    KVTRIM_CUDA_TRY(cudaGetLastError());
  }
  return status::success;
}

}  // namespace detail

//! Decode attention of one layer for a batch of sequences on `stream`; `workspace` holds
//! workspace_size(a) bytes. No allocation, no synchronisation (graph-capturable).
template <kv_element T>
[[nodiscard]] status decode_attention(const decode_arguments<T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  const detail::decode_layout l = detail::decode_layout_of(a);
  detail::workspace_carver w(workspace);
  detail::decode_params<T> p{a, l.group, l.splits, default_tuning.attention.tokens_per_split,
                             std::sqrt(static_cast<float>(a.pool.head_dim)), nullptr, nullptr, nullptr, nullptr};
  p.partial_acc = w.take<float>(l.partial_acc);
  p.partial_stats = w.take<float>(l.partial_stats);
  if (a.accumulate != decode_accumulation::none) {
    p.logits = w.take<float>(l.logits);
    p.stats = w.take<float>(l.stats);
  }
  return dispatch_head_dim(a.pool.head_dim, [&](auto dim) { return detail::launch_decode<T, decltype(dim)::value>(p, stream); });
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
