#pragma once
//! \file paged_attention.cuh
//! Paged decode attention over per-(sequence, layer, KV head) block tables with per-head
//! lengths (KV-Compress's layout, §6; the CPU semantics are backend/cpu/paged_attention.hpp).
//! GQA: one pass over each KV head serves its G query heads; K/V are never repeated.
//! Flash-decoding split: each CTA reads `tokens_per_split` keys of one head for all G queries
//! and keeps an online softmax in fp32; a second kernel merges the splits. Logits are kept in
//! base 2 (the query is scaled once by log2(e) / sqrt(d)), so each probability is one exp2
//! rather than a division and an exp per key and query head. With accumulation
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
  int32_t split_tokens = 1;
  int32_t splits = 1;
  int64_t partial_acc = 0;    // [batch][H][splits][G][d]
  int64_t partial_stats = 0;  // [batch][H][splits][G][2]
  int64_t logits = 0;         // [batch][H][G][max_length] (accumulation only)
  int64_t stats = 0;          // [batch][H][G][2] (accumulation only)
};

//! Keys per CTA. The splits of every head fill `slots` resident CTAs in one wave where they
//! can: as many splits per head as fit, rounded down, so no partial wave trails (ceil-div
//! sizing left 1.1 waves at some shapes). Within [min_split_tokens, max_split_tokens], a
//! multiple of 32. Fewer slots never give more splits, so a workspace sized for
//! attention_tuning::max_ctas holds any device's.
template <kv_element T>
[[nodiscard]] int32_t split_tokens_for(const decode_arguments<T>& a, int64_t slots) noexcept {
  constexpr attention_tuning t = default_tuning.attention;
  const int64_t heads = static_cast<int64_t>(a.batch) * a.pool.heads;
  const int64_t per_head = heads > 0 && slots > heads ? slots / heads : 1;
  int64_t split = ceil_div(a.max_length, per_head);
  split = split < t.min_split_tokens ? t.min_split_tokens : (split > t.max_split_tokens ? t.max_split_tokens : split);
  return static_cast<int32_t>(ceil_div(split, 32) * 32);
}

template <kv_element T>
[[nodiscard]] decode_layout decode_layout_of(const decode_arguments<T>& a, int64_t slots) noexcept {
  decode_layout l;
  l.group = a.pool.heads > 0 ? a.q_heads / a.pool.heads : 1;
  l.split_tokens = split_tokens_for(a, slots);
  l.splits = static_cast<int32_t>(ceil_div(a.max_length, l.split_tokens));
  const int64_t heads = static_cast<int64_t>(a.batch) * a.pool.heads;
  l.partial_acc = heads * l.splits * l.group * a.pool.head_dim;
  l.partial_stats = heads * l.splits * l.group * 2;
  if (a.accumulate != decode_accumulation::none) {
    l.logits = heads * l.group * a.max_length;
    l.stats = heads * l.group * 2;
  }
  return l;
}

//! Split CTAs the current device holds at once, at most attention_tuning::max_ctas (also when
//! the query fails: the launch reports that error).
[[nodiscard]] inline int64_t resident_decode_ctas() noexcept {
  constexpr attention_tuning t = default_tuning.attention;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1)
    return t.max_ctas;
  const int64_t slots = static_cast<int64_t>(sms) * t.ctas_per_sm;
  return slots < t.max_ctas ? slots : t.max_ctas;
}

}  // namespace detail

//! fp32 partial results of the splits (and, with accumulation, every key's logit). The same
//! on every device: sized for attention_tuning::max_ctas splits.
template <kv_element T>
[[nodiscard]] size_t workspace_size(const decode_arguments<T>& a) noexcept {
  const detail::decode_layout l = detail::decode_layout_of(a, default_tuning.attention.max_ctas);
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
  float logit_scale;  // base2_logit_scale(d)
  float* partial_acc;
  float* partial_stats;
  float* logits;
  float* stats;
};

//! Elements of one 16-byte load.
template <kv_element T>
inline constexpr int32_t vector_elements = static_cast<int32_t>(16 / sizeof(T));

//! Lanes that share one key. Fast paths (static head dim): each lane holds one 16-byte vector
//! of the row, so a warp reads whole rows with 16-byte loads. The generic kernel gives the
//! whole warp to one key and strides over d one element at a time.
template <kv_element T, int32_t HeadDim>
inline constexpr int32_t lanes_per_key = HeadDim == dynamic_head_dim ? 32 : HeadDim / vector_elements<T>;
template <kv_element T, int32_t HeadDim>
inline constexpr int32_t elements_per_lane =
    HeadDim == dynamic_head_dim ? max_attention_head_dim / 32 : vector_elements<T>;
//! Keys each subgroup loads before it uses the first: the loads in flight that hide latency.
template <int32_t HeadDim>
inline constexpr int32_t keys_in_flight = HeadDim == dynamic_head_dim ? 2 : 4;

//! What one lane holds of one stored row: fast paths one aligned vector, the generic kernel
//! the elements sub, sub + 32, ... (unloaded elements stay unread and count as zero).
template <kv_element T, int32_t HeadDim>
struct row_piece {
  alignas(16) T raw[elements_per_lane<T, HeadDim>];

  __device__ __forceinline__ void load_from(const T* row, int32_t sub, int32_t d, bool valid) {
    if constexpr (HeadDim != dynamic_head_dim) {
      static_assert(lanes_per_key<T, HeadDim> >= 1 && lanes_per_key<T, HeadDim> <= 32 &&
                    (lanes_per_key<T, HeadDim> & (lanes_per_key<T, HeadDim> - 1)) == 0);
      if (valid) *reinterpret_cast<uint4*>(raw) = *reinterpret_cast<const uint4*>(row + sub * vector_elements<T>);
    } else {
#pragma unroll
      for (int32_t e = 0; e < elements_per_lane<T, HeadDim>; ++e) {
        const int32_t c = sub + 32 * e;
        if (valid && c < d) raw[e] = row[c];
      }
    }
  }
  //! Element e as fp32; zero where nothing was loaded.
  __device__ __forceinline__ float at(int32_t e, int32_t sub, int32_t d, bool valid) const {
    if constexpr (HeadDim != dynamic_head_dim) {
      return valid ? load(raw[e]) : 0.f;
    } else {
      return (valid && sub + 32 * e < d) ? load(raw[e]) : 0.f;
    }
  }
};

//! Column of element e of sub-lane `sub`.
template <kv_element T, int32_t HeadDim>
__device__ __forceinline__ int32_t element_of(int32_t sub, int32_t e) {
  if constexpr (HeadDim == dynamic_head_dim) {
    return sub + 32 * e;
  } else {
    return sub * vector_elements<T> + e;
  }
}

//! One CTA reads keys [split * split_tokens, ...) of one (sequence, KV head) for its G query
//! heads. Each subgroup of lanes_per_key lanes owns one key at a time and issues the K and V
//! loads of keys_in_flight keys before using the first; an online softmax in fp32 per query
//! head. `Group` is G when it is a compile-time constant, 0 for a run-time G <= MaxGroup.
template <kv_element T, int32_t HeadDim, int32_t Group, int32_t Threads, int32_t MaxGroup>
__global__ void __launch_bounds__(Threads) decode_split_kernel(const __grid_constant__ decode_params<T> p) {
  constexpr int32_t lpk = lanes_per_key<T, HeadDim>;
  constexpr int32_t epl = elements_per_lane<T, HeadDim>;
  constexpr int32_t unroll = keys_in_flight<HeadDim>;
  constexpr int32_t keys_per_warp = 32 / lpk;
  constexpr int32_t warps = Threads / 32;
  constexpr int32_t subgroups = warps * keys_per_warp;
  constexpr int32_t group_regs = Group == 0 ? MaxGroup : Group;
  extern __shared__ float smem[];  // [subgroups][G][d] acc, then [subgroups][G] max and sum

  const auto& a = p.args;
  const int32_t d = head_dim_of<HeadDim>(a.pool.head_dim);
  const int32_t G = Group == 0 ? p.group : Group;
  const int32_t h = blockIdx.y, b = blockIdx.z, split = blockIdx.x;
  const int64_t head = a.pool.head_index(a.rows[b], a.layer, h);
  const int32_t length = a.pool.lengths[head];
  const int32_t begin = split * p.split_tokens;
  const int32_t end = min(length, begin + p.split_tokens);

  const int32_t warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int32_t sub = lane % lpk;
  const int32_t subgroup = warp * keys_per_warp + lane / lpk;

  float q[group_regs][epl];
  float acc[group_regs][epl];
  float m[group_regs], s[group_regs];
  const float* qb = a.q + (static_cast<int64_t>(b) * a.q_heads + static_cast<int64_t>(h) * G) * d;
#pragma unroll
  for (int32_t g = 0; g < group_regs; ++g) {
    m[g] = -INFINITY;
    s[g] = 0.f;
#pragma unroll
    for (int32_t e = 0; e < epl; ++e) {
      const int32_t c = element_of<T, HeadDim>(sub, e);
      q[g][e] = (g < G && c < d) ? qb[static_cast<int64_t>(g) * d + c] * p.logit_scale : 0.f;
      acc[g][e] = 0.f;
    }
  }

  // Every lane of a warp runs the same number of iterations (the shuffles need them all).
  for (int32_t base = begin; base < end; base += subgroups * unroll) {
    row_piece<T, HeadDim> k[unroll], v[unroll];
    bool valid[unroll];
#pragma unroll
    for (int32_t u = 0; u < unroll; ++u) {
      const int32_t j = base + u * subgroups + subgroup;
      valid[u] = j < end;
      const int64_t slot = valid[u] ? a.pool.physical(head, j) : 0;
      k[u].load_from(a.pool.keys + slot * d, sub, d, valid[u]);
      v[u].load_from(a.pool.values + slot * d, sub, d, valid[u]);
    }
    float logit[unroll][group_regs];
#pragma unroll
    for (int32_t u = 0; u < unroll; ++u) {
      float kf[epl];
#pragma unroll
      for (int32_t e = 0; e < epl; ++e) kf[e] = k[u].at(e, sub, d, valid[u]);
#pragma unroll
      for (int32_t g = 0; g < group_regs; ++g) {
        float dot = 0.f;
        if (Group != 0 || g < G) {
#pragma unroll
          for (int32_t e = 0; e < epl; ++e) dot += q[g][e] * kf[e];
#pragma unroll
          for (int32_t offset = lpk / 2; offset > 0; offset /= 2) dot += __shfl_xor_sync(0xffffffffu, dot, offset);
        }
        logit[u][g] = dot;
      }
    }
#pragma unroll
    for (int32_t g = 0; g < group_regs; ++g) {
      if (g >= G) break;
      float m_new = m[g];
#pragma unroll
      for (int32_t u = 0; u < unroll; ++u)
        if (valid[u]) m_new = fmaxf(m_new, logit[u][g]);
      if (m_new == -INFINITY) continue;  // no valid key in this round
      if (m_new != m[g]) {  // else the scale is exactly 1: most rounds, once the max settles
        const float scale = exp2f(m[g] - m_new);
        s[g] *= scale;
#pragma unroll
        for (int32_t e = 0; e < epl; ++e) acc[g][e] *= scale;
      }
#pragma unroll
      for (int32_t u = 0; u < unroll; ++u) {
        if (!valid[u]) continue;
        const float w = exp2f(logit[u][g] - m_new);
        s[g] += w;
#pragma unroll
        for (int32_t e = 0; e < epl; ++e) acc[g][e] += w * v[u].at(e, sub, d, true);
        if (p.logits && sub == 0)
          p.logits[(head_slot(b, h, a.pool.heads) * G + g) * a.max_length + base + u * subgroups + subgroup] = logit[u][g];
      }
      m[g] = m_new;
    }
  }

  // Merge the subgroups of the CTA in shared memory, then write this split's partial result.
  float* sacc = smem;                                              // [subgroups][G][d]
  float* smax = smem + static_cast<int64_t>(subgroups) * G * d;    // [subgroups][G]
  float* ssum = smax + subgroups * G;                              // [subgroups][G]
#pragma unroll
  for (int32_t g = 0; g < group_regs; ++g) {
    if (g >= G) break;
    if (sub == 0) {
      smax[subgroup * G + g] = m[g];
      ssum[subgroup * G + g] = s[g];
    }
#pragma unroll
    for (int32_t e = 0; e < epl; ++e) {
      const int32_t c = element_of<T, HeadDim>(sub, e);
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
        const float f = exp2f(smax[t * G + g] - mx);
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

//! Merges the splits of one (sequence, KV head), grid (H, batch, element blocks): a warp per
//! query head first reduces the splits' maxima and denominators (lanes over splits), then each
//! thread sums its output element (g, c) over the splits with loads independent of each other,
//! so several are in flight (a running loop over the splits would wait on each in turn).
template <kv_element T>
__global__ void decode_combine_kernel(const __grid_constant__ decode_params<T> p) {
  __shared__ float totals[2 * default_tuning.attention.max_group];  // per g: max, denominator
  const auto& a = p.args;
  const int32_t d = a.pool.head_dim, G = p.group, S = p.splits;
  const int32_t h = blockIdx.x, b = blockIdx.y;
  const int64_t hs = head_slot(b, h, a.pool.heads);
  const float* stats = p.partial_stats + hs * S * G * 2;
  const int32_t warp = static_cast<int32_t>(threadIdx.x / 32), lane = static_cast<int32_t>(threadIdx.x % 32);
  for (int32_t g = warp; g < G; g += static_cast<int32_t>(blockDim.x / 32)) {
    float mx = -INFINITY;
    for (int32_t t = lane; t < S; t += 32) mx = fmaxf(mx, stats[(t * G + g) * 2]);
#pragma unroll
    for (int32_t offset = 16; offset > 0; offset /= 2) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, offset));
    float sum = 0.f;
    for (int32_t t = lane; t < S; t += 32) {
      const float pm = stats[(t * G + g) * 2];
      if (pm != -INFINITY) sum += stats[(t * G + g) * 2 + 1] * exp2f(pm - mx);
    }
#pragma unroll
    for (int32_t offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
    if (lane == 0) {
      totals[2 * g] = mx;
      totals[2 * g + 1] = sum;
    }
  }
  __syncthreads();
  const int32_t i = static_cast<int32_t>(blockIdx.z * blockDim.x + threadIdx.x);
  if (i >= G * d) return;
  const int32_t g = i / d, c = i - g * d;
  const float mx = totals[2 * g], sum = totals[2 * g + 1];
  float out = 0.f;
#pragma unroll 8
  for (int32_t t = 0; t < S; ++t) {
    const float pm = stats[(t * G + g) * 2];
    const float f = pm == -INFINITY ? 0.f : exp2f(pm - mx);
    out += p.partial_acc[((hs * S + t) * G + g) * d + c] * f;
  }
  a.out[(static_cast<int64_t>(b) * a.q_heads + static_cast<int64_t>(h) * G + g) * d + c] = sum > 0.f ? out / sum : 0.f;
  if (p.stats && c == 0) {
    p.stats[(hs * G + g) * 2] = mx;
    p.stats[(hs * G + g) * 2 + 1] = sum;
  }
}

//! slot metric += the group reduction of p (sum) or p^2 (squared_sum), p = 2^(logit - M) / S
//! (base-2 logit and max).
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
      float x = exp2f(p.logits[(hs * G + g) * a.max_length + j] - mx) / sum;
      if (a.accumulate == decode_accumulation::squared_sum) x *= x;
      v = a.reduce == gqa_reduce::max ? (g == 0 ? x : fmaxf(v, x)) : v + x;
    }
    if (a.reduce == gqa_reduce::mean) v /= static_cast<float>(G);
    a.pool.metrics[a.pool.physical(head, j)] += v;
  }
}

template <kv_element T, int32_t HeadDim, int32_t Group>
[[nodiscard]] status launch_decode(const decode_params<T>& p, cudaStream_t stream) {
  constexpr int32_t threads = default_tuning.attention.threads;
  constexpr int32_t max_group = default_tuning.attention.max_group;
  constexpr int32_t subgroups = (threads / 32) * (32 / lanes_per_key<T, HeadDim>);
  const auto& a = p.args;
  const size_t smem = static_cast<size_t>(subgroups) * p.group * (a.pool.head_dim + 2) * sizeof(float);
  auto kernel = decode_split_kernel<T, HeadDim, Group, threads, max_group>;
  if (smem > 48 * 1024) KVTRIM_CUDA_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  const dim3 grid(static_cast<unsigned>(p.splits), static_cast<unsigned>(a.pool.heads), static_cast<unsigned>(a.batch));
  kernel<<<grid, threads, smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  constexpr int32_t combine_threads = 128;
  const dim3 combine_grid(static_cast<unsigned>(a.pool.heads), static_cast<unsigned>(a.batch),
                          static_cast<unsigned>(ceil_div(static_cast<int64_t>(p.group) * a.pool.head_dim, combine_threads)));
  decode_combine_kernel<T><<<combine_grid, combine_threads, 0, stream>>>(p);
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

//! Compile-time G for the common groups (MHA, Llama-3-8B's 4, Llama-3-70B's 8), run-time
//! otherwise.
template <kv_element T, int32_t HeadDim>
[[nodiscard]] status launch_decode_group(const decode_params<T>& p, cudaStream_t stream) {
  switch (p.group) {
    case 1: return launch_decode<T, HeadDim, 1>(p, stream);
    case 4: return launch_decode<T, HeadDim, 4>(p, stream);
    case 8: return launch_decode<T, HeadDim, 8>(p, stream);
    default: return launch_decode<T, HeadDim, 0>(p, stream);
  }
}

//! The fast paths load 16-byte vectors: K and V must be 16-byte aligned.
template <kv_element T>
[[nodiscard]] bool vector_aligned(const paged_view<T>& pool) noexcept {
  return reinterpret_cast<uintptr_t>(pool.keys) % 16 == 0 && reinterpret_cast<uintptr_t>(pool.values) % 16 == 0;
}

}  // namespace detail

//! Decode attention of one layer for a batch of sequences on `stream`; `workspace` holds
//! workspace_size(a) bytes. No allocation, no synchronisation (graph-capturable).
template <kv_element T>
[[nodiscard]] status decode_attention(const decode_arguments<T>& a, void* workspace, cudaStream_t stream) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  const detail::decode_layout l = detail::decode_layout_of(a, detail::resident_decode_ctas());
  detail::workspace_carver w(workspace);
  detail::decode_params<T> p{a, l.group, l.splits, l.split_tokens, detail::base2_logit_scale(a.pool.head_dim),
                             nullptr, nullptr, nullptr, nullptr};
  p.partial_acc = w.take<float>(l.partial_acc);
  p.partial_stats = w.take<float>(l.partial_stats);
  if (a.accumulate != decode_accumulation::none) {
    p.logits = w.take<float>(l.logits);
    p.stats = w.take<float>(l.stats);
  }
  if (!detail::vector_aligned(a.pool))
    return detail::launch_decode_group<T, dynamic_head_dim>(p, stream);
  return dispatch_head_dim(a.pool.head_dim,
                           [&](auto dim) { return detail::launch_decode_group<T, decltype(dim)::value>(p, stream); });
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
