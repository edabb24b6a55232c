#pragma once
//! \file paged_attention.cuh
//! Paged decode attention over per-(sequence, layer, KV head) block tables with per-head
//! lengths (KV-Compress's layout, §6; the CPU semantics are backend/cpu/paged_attention.hpp).
//! GQA: one pass over each KV head serves its G query heads; K/V are never repeated.
//! Flash-decoding split: each CTA reads `split_tokens` keys of one head for all G queries
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

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

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
  //! Keys each split CTA reads: 0 lets the library choose for the device (split_tokens_for);
  //! otherwise a multiple of 32, the caller's own tuning (what FlashAttention's num_splits
  //! sets). workspace_size follows it.
  int32_t split_tokens = 0;
};

inline constexpr int32_t max_attention_head_dim = 256;

template <kv_element T>
[[nodiscard]] status can_implement(const decode_arguments<T>& a) noexcept {
  if (const status s = a.pool.validate(); s != status::success) return s;
  if (a.batch < 0 || a.batch > 65535 || a.layer < 0 || a.layer >= a.pool.layers) return status::invalid_argument;
  if (a.q_heads < a.pool.heads || a.q_heads % a.pool.heads != 0) return status::invalid_group;
  if (a.q_heads / a.pool.heads > default_tuning.attention.max_group) return status::not_supported;
  if (a.pool.head_dim > max_attention_head_dim) return status::not_supported;
  if (a.max_length < 1 || a.split_tokens < 0 || a.split_tokens % 32 != 0) return status::invalid_argument;
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
//! sizing left 1.1 waves at some shapes). Few heads of a few thousand keys would get many
//! short splits, whose merge costs more than the extra CTAs gain: such heads get at most
//! max_short_splits, unless that makes them longer than short_split_tokens (H100, B = 1, 8
//! heads, per graph replay: 4096 keys a head 20.1-21.0 µs in 64 splits, 17.3-17.5 in 32;
//! 8192 keys 28.5-30.0 in 64, 26.5-26.9 in 32; performance.md). Within [min_split_tokens,
//! max_split_tokens], a multiple of 32. Fewer slots never give more splits, so a workspace
//! sized for attention_tuning::max_ctas holds any device's. On an H200 no split size of
//! bm_decode_splits' sweep beat this rule's by more than 2% (B = 1, n = 128k; B = 8, n = 32k at
//! 1x and 8x; performance.md).
template <kv_element T>
[[nodiscard]] int32_t split_tokens_for(const decode_arguments<T>& a, int64_t slots) noexcept {
  constexpr attention_tuning t = default_tuning.attention;
  const int64_t heads = static_cast<int64_t>(a.batch) * a.pool.heads;
  const int64_t per_head = heads > 0 && slots > heads ? slots / heads : 1;
  int64_t split = ceil_div(a.max_length, per_head);
  const int64_t coarse = ceil_div(a.max_length, t.max_short_splits);
  split = std::max(split, std::min<int64_t>(coarse, t.short_split_tokens));
  split = split < t.min_split_tokens ? t.min_split_tokens : (split > t.max_split_tokens ? t.max_split_tokens : split);
  return static_cast<int32_t>(ceil_div(split, 32) * 32);
}

template <kv_element T>
[[nodiscard]] decode_layout decode_layout_of(const decode_arguments<T>& a, int64_t slots) noexcept {
  decode_layout l;
  l.group = a.pool.heads > 0 ? a.q_heads / a.pool.heads : 1;
  l.split_tokens = a.split_tokens > 0 ? a.split_tokens : split_tokens_for(a, slots);
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

//! CTAs of `kernel` the current device holds at once (its occupancy: the register use differs
//! with G and head dim), at most attention_tuning::max_ctas; max_ctas also when a query fails
//! (the launch then reports the error).
template <class Kernel>
[[nodiscard]] int64_t resident_ctas(Kernel kernel, int32_t threads, size_t smem) noexcept {
  constexpr int64_t most = default_tuning.attention.max_ctas;
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess || sms < 1 ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem) != cudaSuccess || per_sm < 1)
    return most;
  // More than ctas_per_sm (G = 1 fits more) gave shorter splits whose merge cost more than the
  // extra CTAs gained (H100, G = 1, B = 8, 4096 keys a head: 58.1 µs at 4 per SM, 61.0 at 7).
  const int64_t slots = static_cast<int64_t>(sms) * (per_sm < default_tuning.attention.ctas_per_sm ? per_sm : default_tuning.attention.ctas_per_sm);
  return slots < most ? slots : most;
}

}  // namespace detail

//! fp32 partial results of the splits (and, with accumulation, every key's logit). The same
//! on every device: sized for attention_tuning::max_ctas splits, or for a.split_tokens.
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

//! Sums each of the N partial dot products over the Lanes lanes of a key, leaving every sum in
//! every lane. The transposed butterfly: at each level a lane keeps half of its values and adds
//! its partner's half, until one value is left (N - 1 shuffles instead of N per level), then
//! plain levels, then each sum is read from the lane that holds it (g * Lanes / N). Same lane
//! pairs, same level order as reducing each value alone: the same sums, bit for bit.
template <int32_t N, int32_t Lanes>
__device__ __forceinline__ void reduce_group_dots(float (&dot)[N], int32_t lane) {
  static_assert(N >= 1 && (N & (N - 1)) == 0 && N <= Lanes);
  float held[N];
#pragma unroll
  for (int32_t i = 0; i < N; ++i) held[i] = dot[i];
  int32_t offset = Lanes / 2;
#pragma unroll
  for (int32_t n = N; n > 1; n /= 2, offset /= 2) {
    const bool upper = (lane & offset) != 0;  // keeps values [n/2, n)
#pragma unroll
    for (int32_t i = 0; i < n / 2; ++i) {
      const float send = upper ? held[i] : held[i + n / 2];
      const float keep = upper ? held[i + n / 2] : held[i];
      held[i] = keep + __shfl_xor_sync(0xffffffffu, send, offset);
    }
  }
#pragma unroll
  for (; offset > 0; offset /= 2) held[0] += __shfl_xor_sync(0xffffffffu, held[0], offset);
  if constexpr (N == 1) {
    dot[0] = held[0];  // every lane already holds the sum
  } else {
#pragma unroll
    for (int32_t g = 0; g < N; ++g) dot[g] = __shfl_sync(0xffffffffu, held[0], g * (Lanes / N), Lanes);
  }
}

//! Split CTAs per SM the kernel is compiled for (its register budget): G <= 4 fits 128
//! registers a thread, larger groups hold G accumulators and queries in about 240.
[[nodiscard]] constexpr int32_t split_ctas_per_sm(int32_t group) noexcept {
  return group <= 4 ? default_tuning.attention.ctas_per_sm : 2;
}

//! What one lane holds of one stored row: fast paths one aligned vector, the generic kernel
//! the elements sub, sub + 32, ...; zeros where nothing was loaded (a key past the end, a column
//! past d), so every use of a row is unconditional.
template <kv_element T, int32_t HeadDim>
struct row_piece {
  alignas(16) T raw[elements_per_lane<T, HeadDim>];

  __device__ __forceinline__ void load_from(const T* row, int32_t sub, int32_t d, bool valid) {
    if constexpr (HeadDim != dynamic_head_dim) {
      static_assert(lanes_per_key<T, HeadDim> >= 1 && lanes_per_key<T, HeadDim> <= 32 &&
                    (lanes_per_key<T, HeadDim> & (lanes_per_key<T, HeadDim> - 1)) == 0);
      uint4 bits = make_uint4(0u, 0u, 0u, 0u);
      if (valid) bits = *reinterpret_cast<const uint4*>(row + sub * vector_elements<T>);
      *reinterpret_cast<uint4*>(raw) = bits;
    } else {
#pragma unroll
      for (int32_t e = 0; e < elements_per_lane<T, HeadDim>; ++e) {
        const int32_t c = sub + 32 * e;
        raw[e] = valid && c < d ? row[c] : T{};
      }
    }
  }
  //! Element e as fp32. bf16 from the 32-bit word that holds it: one shift (low half) or one
  //! mask (high half) instead of an extract and a shift.
  [[nodiscard]] __device__ __forceinline__ float at(int32_t e) const {
    if constexpr (std::is_same_v<T, bfloat16>) {
      uint32_t word;
      memcpy(&word, &raw[e & ~1], sizeof word);
      return __uint_as_float((e & 1) == 0 ? word << 16 : word & 0xffff0000u);
    } else {
      return load(raw[e]);
    }
  }
};

//! 2^x with subnormal results flushed to zero: exp2f spends extra instructions on every weight
//! to keep them, and a weight below 2^-126 adds nothing to a softmax denominator whose largest
//! term is 1.
[[nodiscard]] __device__ __forceinline__ float exp2_flush(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

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
__global__ void __launch_bounds__(Threads, split_ctas_per_sm(Group == 0 ? MaxGroup : Group)) decode_split_kernel(const __grid_constant__ decode_params<T> p) {
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
  // 64-bit: the last split of a head near 2^31 tokens ends past INT32_MAX.
  const int64_t split_end = static_cast<int64_t>(begin) + p.split_tokens;
  const int32_t end = split_end < length ? static_cast<int32_t>(split_end) : length;

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

  // The physical slots of a round's keys (0 past the end). Each round reads the next round's
  // block-table entries right after issuing its own K/V loads, so the table's latency overlaps
  // them instead of preceding every round's loads.
  constexpr int32_t round_keys = subgroups * unroll;
  int64_t slot[unroll];
  const auto slots_of_round = [&](int32_t base) {
#pragma unroll
    for (int32_t u = 0; u < unroll; ++u) {
      const int32_t j = base + u * subgroups + subgroup;
      slot[u] = j < end ? a.pool.physical(head, j) : 0;
    }
  };
  slots_of_round(begin);
  // Every lane of a warp runs the same number of iterations (the shuffles need them all).
  for (int32_t base = begin; base < end; base += round_keys) {
    row_piece<T, HeadDim> k[unroll], v[unroll];
    bool valid[unroll];
#pragma unroll
    for (int32_t u = 0; u < unroll; ++u) {
      valid[u] = base + u * subgroups + subgroup < end;
      k[u].load_from(a.pool.keys + slot[u] * d, sub, d, valid[u]);
      v[u].load_from(a.pool.values + slot[u] * d, sub, d, valid[u]);
    }
    slots_of_round(base + round_keys);
    float logit[unroll][group_regs];
#pragma unroll
    for (int32_t u = 0; u < unroll; ++u) {
      float kf[epl];
#pragma unroll
      for (int32_t e = 0; e < epl; ++e) kf[e] = k[u].at(e);
#pragma unroll
      for (int32_t g = 0; g < group_regs; ++g) {
        float dot = 0.f;
        if (Group != 0 || g < G) {
#pragma unroll
          for (int32_t e = 0; e < epl; ++e) dot += q[g][e] * kf[e];
        }
        logit[u][g] = dot;
      }
      if constexpr (Group != 0 && (Group & (Group - 1)) == 0 && Group <= lpk) {
        reduce_group_dots<Group, lpk>(logit[u], lane);
      } else {
#pragma unroll
        for (int32_t g = 0; g < group_regs; ++g) {
          if (Group == 0 && g >= G) break;
#pragma unroll
          for (int32_t offset = lpk / 2; offset > 0; offset /= 2)
            logit[u][g] += __shfl_xor_sync(0xffffffffu, logit[u][g], offset);
        }
      }
    }
    if (p.logits && sub == 0) {  // accumulation: every key's logit, one branch a round
      const int64_t row = head_slot(b, h, a.pool.heads) * G;
#pragma unroll
      for (int32_t u = 0; u < unroll; ++u) {
        if (!valid[u]) continue;
#pragma unroll
        for (int32_t g = 0; g < group_regs; ++g)
          if (g < G) p.logits[(row + g) * a.max_length + base + u * subgroups + subgroup] = logit[u][g];
      }
    }
    // Per query head: the round's max, the rescale, then each key's weight in place of its
    // logit. A key past the end weighs 0 (and its row is zeros): no branch per key and head.
#pragma unroll
    for (int32_t g = 0; g < group_regs; ++g) {
      if (g >= G) break;
      float m_new = m[g];
#pragma unroll
      for (int32_t u = 0; u < unroll; ++u) m_new = fmaxf(m_new, valid[u] ? logit[u][g] : -INFINITY);
      if (m_new != m[g]) {  // else the scale is exactly 1: most rounds, once the max settles
        const float scale = exp2_flush(m[g] - m_new);
        s[g] *= scale;
#pragma unroll
        for (int32_t e = 0; e < epl; ++e) acc[g][e] *= scale;
      }
#pragma unroll
      for (int32_t u = 0; u < unroll; ++u) {
        logit[u][g] = valid[u] ? exp2_flush(logit[u][g] - m_new) : 0.f;
        s[g] += logit[u][g];
      }
      m[g] = m_new;
    }
    // Each V row converted once for all G heads (per head, the register budget would have it
    // converted again for every head); every accumulator adds the keys in the same order.
#pragma unroll
    for (int32_t u = 0; u < unroll; ++u) {
      float vf[epl];
#pragma unroll
      for (int32_t e = 0; e < epl; ++e) vf[e] = v[u].at(e);
#pragma unroll
      for (int32_t g = 0; g < group_regs; ++g) {
        if (g >= G) break;
#pragma unroll
        for (int32_t e = 0; e < epl; ++e) acc[g][e] += logit[u][g] * vf[e];
      }
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
[[nodiscard]] status launch_decode(const decode_arguments<T>& a, void* workspace, cudaStream_t stream) {
  constexpr int32_t threads = default_tuning.attention.threads;
  constexpr int32_t max_group = default_tuning.attention.max_group;
  constexpr int32_t subgroups = (threads / 32) * (32 / lanes_per_key<T, HeadDim>);
  const int32_t group = a.q_heads / a.pool.heads;
  const size_t smem = static_cast<size_t>(subgroups) * group * (a.pool.head_dim + 2) * sizeof(float);
  auto kernel = decode_split_kernel<T, HeadDim, Group, threads, max_group>;
  if (const status s = allow_smem(kernel, smem); s != status::success) return s;
  const decode_layout l = decode_layout_of(a, resident_ctas(kernel, threads, smem));
  workspace_carver w(workspace);
  decode_params<T> p{a, l.group, l.splits, l.split_tokens, base2_logit_scale(a.pool.head_dim),
                     nullptr, nullptr, nullptr, nullptr};
  p.partial_acc = w.take<float>(l.partial_acc);
  p.partial_stats = w.take<float>(l.partial_stats);
  if (a.accumulate != decode_accumulation::none) {
    p.logits = w.take<float>(l.logits);
    p.stats = w.take<float>(l.stats);
  }
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
[[nodiscard]] status launch_decode_group(const decode_arguments<T>& a, void* workspace, cudaStream_t stream) {
  switch (a.q_heads / a.pool.heads) {
    case 1: return launch_decode<T, HeadDim, 1>(a, workspace, stream);
    case 4: return launch_decode<T, HeadDim, 4>(a, workspace, stream);
    case 8: return launch_decode<T, HeadDim, 8>(a, workspace, stream);
    default: return launch_decode<T, HeadDim, 0>(a, workspace, stream);
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
  if (!detail::vector_aligned(a.pool))
    return detail::launch_decode_group<T, dynamic_head_dim>(a, workspace, stream);
  return dispatch_head_dim(a.pool.head_dim, [&](auto dim) {
    return detail::launch_decode_group<T, decltype(dim)::value>(a, workspace, stream);
  });
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
