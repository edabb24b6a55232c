#pragma once
//! \file window_scores.cuh
//! Observation-window scores, fused (SnapKV §3, PyramidKV §4, Ada-KV §5, KV-Compress §6
//! prefill; CPU semantics: policy/metric/window_attention.hpp). For every (sequence, layer,
//! stored head): the window queries of its G query heads against all the head's keys read
//! through the block table (K never repeated), softmax in fp32 over all keys with the causal
//! mask by position, plain or squared probabilities summed (or averaged) over the window
//! queries, the GQA reduction, and max / avg pooling along positions.
//!
//! One CTA scores a split of one head's keys for a block of (query head, row) pairs, staged
//! once in shared memory, one key tile at a time. Two passes over K: pass 1 keeps every pair's
//! running softmax max and denominator (merged over the CTA's lanes, then over splits), pass 2
//! the probabilities, summed per (query head, key) over the rows. No w x n matrix is stored.
//! Logits are in base 2, q . k times log2(e) / sqrt(d), so each probability is one exp2 (no
//! division, no exp).
//!
//! `window_math` chooses the kernels:
//! - `exact`: fp32 CUDA cores, dot products in the CPU's order over d and row sums in the
//!   CPU's order over the rows, so scores stay within rounding of the CPU oracle's (the parity
//!   tests compare kept sets). 128 pairs a block, 64-key tiles, each thread 4 pairs x 8 keys.
//! - `tensor_cores` (bf16 K): every fp32 query is split into three bf16 terms whose sum is
//!   the query (8 + 8 + 8 significand bits), and each 16 x 8 tile of logits is three bf16
//!   MMAs with fp32 accumulation. bf16 x bf16 products are exact in fp32, so the logits differ
//!   from `exact` by the rounding of their sums only (another order, and the tensor cores'
//!   own fp32 accumulation); a single bf16 MMA would round the queries instead. Its key tiles
//!   arrive by 16-byte cp.async, so `automatic` takes it only for 16-byte aligned keys.
//!   Queries that are bf16 values already (a bf16 model's) have zero low terms: a pair block
//!   whose queries all are takes one MMA per tile, with the same result. Pass 1 divides the
//!   work as in FlashAttention-2, its logits in registers (window_stats_mma_kernel); pass 2
//!   puts each logit tile, the same MMAs', in shared memory and sums rows as the exact path
//!   does (tensor_core_logits).
//! - `automatic` (default): `tensor_cores` wherever it applies, `exact` elsewhere.
#include <cuda_bf16.h>
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "kvtrim/backend/cuda/error.cuh"
#include "kvtrim/backend/cuda/kernels/radix_sort.cuh"
#include "kvtrim/backend/cuda/paged_view.cuh"
#include "kvtrim/backend/cuda/tuning.cuh"
#include "kvtrim/config.hpp"
#include "kvtrim/policy/metric/window_attention.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! How the window-score kernels compute q . k (see the file comment).
enum class window_math : int32_t {
  exact,         //!< fp32 CUDA cores in the CPU's order over d
  tensor_cores,  //!< bf16 K, head dim a multiple of 8 up to 128, sm_80 or newer: bf16x3 MMAs
  automatic,     //!< tensor_cores where it applies (resolved_math), exact elsewhere
};

template <kv_element T>
struct window_score_arguments {
  paged_view<T> pool;                  //!< stored heads H = Hkv, or Hq in per_query_head mode
  const int32_t* rows = nullptr;       //!< [batch] device mirror row of each sequence
  int32_t batch = 0;
  int32_t first_layer = 0;
  int32_t layer_count = 1;
  int32_t q_heads = 0;                 //!< Hq
  int32_t window = 0;                  //!< observed query rows w
  const float* queries = nullptr;      //!< [batch][layer_count][w][Hq][d] device, post-RoPE
  const int32_t* query_positions = nullptr;  //!< [batch][w] device
  window_attention metric{};
  protected_set protect{};             //!< its `recent` bounds the pooled prefix (evictable_prefix)
  int32_t stride = 0;                  //!< >= every head length; row pitch of `scores`
  float* scores = nullptr;             //!< [batch][layer_count][H][stride] device, slot order
  window_math math = window_math::automatic;
};

//! The exact path's shared memory holds a 128-pair block and a 64-key tile in fp32: about 100
//! KiB at head dim 128 and 205 KiB at 256 (within sm_90's 227 KiB per block). The tensor-core
//! pass 1's sizes are its shapes' (mma_shapes below: 206 KiB at 128 on sm_90, one CTA an SM);
//! its pass 2 holds a 64-pair block and a 64-key tile (tensor_core_logits: 70 KiB at 128).
inline constexpr int32_t max_window_head_dim = 256;
inline constexpr int32_t max_tensor_core_head_dim = 128;

//! invalid_argument for an unknown `math`; not_supported where it cannot score keys of type T
//! at head dim d (tensor_cores: bf16 only, d a multiple of 8 up to 128).
template <kv_element T>
[[nodiscard]] constexpr status check_math(window_math math, int32_t head_dim) noexcept {
  if (math != window_math::exact && math != window_math::tensor_cores && math != window_math::automatic)
    return status::invalid_argument;
  if (math == window_math::tensor_cores &&
      (!std::is_same_v<T, bfloat16> || head_dim % 8 != 0 || head_dim > max_tensor_core_head_dim))
    return status::not_supported;
  return status::success;
}

namespace detail {
//! Shared memory of the tensor-core pass 1 (window_stats_mma_kernel).
struct mma_window {
  static constexpr int32_t max_terms = 3;
  static constexpr int32_t max_threads = 256;  //!< 2 x the widest pair block (16 pair rows a warp)

  [[nodiscard]] __host__ __device__ static constexpr int32_t padded(int32_t d) noexcept { return (d + 15) / 16 * 16; }
  //! bf16 row pitch: 16 bytes past a multiple of 32 shifts each row by four banks (ldmatrix
  //! reads eight rows at once without conflicts) and keeps every row 16-byte aligned.
  [[nodiscard]] __host__ __device__ static constexpr int32_t pitch(int32_t d) noexcept { return padded(d) + 8; }
  [[nodiscard]] __host__ __device__ static constexpr int64_t term_bytes(int32_t d, int32_t pairs) noexcept {
    return static_cast<int64_t>(pairs) * pitch(d) * 2;
  }
  [[nodiscard]] __host__ __device__ static constexpr int64_t tile_bytes(int32_t d, int32_t keys) noexcept {
    return static_cast<int64_t>(keys) * pitch(d) * 2;
  }
  //! [terms][pairs][pitch] bf16 | [stages][keys][pitch] bf16 | query positions [pairs] |
  //! key positions [stages][keys]. Every region starts 16-byte aligned.
  [[nodiscard]] __host__ __device__ static constexpr int64_t tiles_at(int32_t d, int32_t pairs) noexcept {
    return max_terms * term_bytes(d, pairs);
  }
  [[nodiscard]] __host__ __device__ static constexpr int64_t positions_at(int32_t d, int32_t pairs, int32_t keys,
                                                                           int32_t stages) noexcept {
    return tiles_at(d, pairs) + stages * tile_bytes(d, keys);
  }
  [[nodiscard]] __host__ __device__ static constexpr int64_t smem_bytes(int32_t d, int32_t pairs, int32_t keys,
                                                                         int32_t stages) noexcept {
    return positions_at(d, pairs, keys, stages) + pairs * 4 + static_cast<int64_t>(stages) * keys * 4;
  }
};

//! The shape of the tensor-core pass 1 on a device: key-tile width, pairs per block and ring
//! depth. 0 keys where nothing fits.
struct mma_shape {
  int32_t keys = 0;
  int32_t pairs = 0;
  int32_t stages = 0;
  [[nodiscard]] int64_t smem_bytes(int32_t d) const noexcept { return mma_window::smem_bytes(d, pairs, keys, stages); }
};

//! The shapes, widest first. At head dim 128: 206 KiB for the first (sm_90 offers 227), 154
//! KiB for 64 x 128 x 3 (sm_80: 163), 86 KiB for the last (sm_86 and sm_89: 99).
inline constexpr mma_shape mma_shapes[] = {{128, 128, 3}, {128, 128, 2}, {64, 128, 3}, {64, 128, 2}, {64, 64, 2}};

//! Whether the tensor-core passes' 16-byte copies of key rows are aligned (cudaMalloc's are;
//! an engine's offset into its own allocation may not be).
template <kv_element T>
[[nodiscard]] bool keys_aligned_16(const paged_view<T>& pool) noexcept {
  return reinterpret_cast<uintptr_t>(pool.keys) % 16 == 0;
}

//! The first of mma_shapes that fits `smem_optin` bytes of shared memory per block at head
//! dim d.
[[nodiscard]] constexpr mma_shape mma_shape_for(int32_t d, int64_t smem_optin) noexcept {
  for (const mma_shape& s : mma_shapes)
    if (s.smem_bytes(d) <= smem_optin) return s;
  return {};
}

//! The tensor-core passes' shape on the current device: not_supported below sm_80 (bf16
//! mma.sync, ldmatrix, cp.async) or where no shape's shared memory fits at head dim d.
[[nodiscard]] inline status tensor_core_shape(int32_t head_dim, mma_shape& shape) {
  int device = 0, major = 0, smem_optin = 0;
  KVTRIM_CUDA_TRY(cudaGetDevice(&device));
  KVTRIM_CUDA_TRY(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  if (major < 8) return status::not_supported;
  KVTRIM_CUDA_TRY(cudaDeviceGetAttribute(&smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  shape = mma_shape_for(head_dim, smem_optin);
  return shape.keys > 0 ? status::success : status::not_supported;
}

//! What `math` (exact, tensor_cores or automatic) runs as on the current device, in `runs`,
//! with the tensor-core shape where that is tensor_cores: `automatic` falls back to exact
//! where tensor cores do not apply; an explicit tensor_cores the device cannot run gives
//! not_supported (or the runtime's error).
template <kv_element T>
[[nodiscard]] status resolve_math(window_math math, int32_t head_dim, window_math& runs, mma_shape& shape,
                                  bool keys_aligned = true) {
  runs = window_math::exact;
  if (math == window_math::exact) return status::success;
  const bool automatic = math == window_math::automatic;
  if (check_math<T>(window_math::tensor_cores, head_dim) != status::success || !keys_aligned)
    return automatic ? status::success : status::not_supported;
  const status s = tensor_core_shape(head_dim, shape);
  if (s == status::success) runs = window_math::tensor_cores;
  return automatic ? status::success : s;
}
}  // namespace detail

//! The math window_scores runs for `math` on 16-byte aligned keys of type T at head dim d on
//! the current device: `automatic` becomes `tensor_cores` where check_math accepts it and the
//! device is sm_80 or newer with the shared memory of one of the tensor-core shapes
//! (mma_shape_for), `exact` otherwise; any other value is returned as it is.
template <kv_element T>
[[nodiscard]] window_math resolved_math(window_math math, int32_t head_dim) {
  if (math != window_math::automatic) return math;
  window_math runs = window_math::exact;
  detail::mma_shape shape;
  (void)detail::resolve_math<T>(math, head_dim, runs, shape);  // automatic reports no failure
  return runs;
}

template <kv_element T>
[[nodiscard]] status can_implement(const window_score_arguments<T>& a) noexcept {
  if (const status s = a.pool.validate(); s != status::success) return s;
  const attention_shape shape{a.pool.layers, a.q_heads, a.metric.reduce == gqa_reduce::per_query_head ? a.q_heads : a.pool.heads,
                              a.pool.head_dim};
  if (const status s = a.metric.validate(shape, a.protect); s != status::success) return s;
  if (a.metric.reduce == gqa_reduce::per_query_head ? a.pool.heads != a.q_heads : a.q_heads % a.pool.heads != 0)
    return status::invalid_group;
  if (a.batch < 0 || a.batch > 65535 || a.first_layer < 0 || a.layer_count < 1 ||
      a.first_layer + a.layer_count > a.pool.layers || a.stride < 1)
    return status::invalid_argument;
  // The window passes' grid: (splits, H, batch x layers), each at most 65,535.
  if (a.pool.heads > 65535 || static_cast<int64_t>(a.batch) * a.layer_count > 65535) return status::not_supported;
  if (a.window < 1) return status::window_too_large;
  if (a.pool.head_dim > max_window_head_dim) return status::not_supported;
  const bool pooled = a.metric.pool != pooling::none && a.metric.kernel > 1;
  if (pooled && static_cast<int64_t>(a.batch) * a.layer_count * a.pool.heads * a.stride > INT32_MAX)
    return status::not_supported;  // the position sort's items (CUB's int offsets)
  if (const status s = check_math<T>(a.math, a.pool.head_dim); s != status::success) return s;
  if (a.math == window_math::tensor_cores && !detail::keys_aligned_16(a.pool)) return status::not_supported;
  if (a.batch > 0 && (!a.rows || !a.queries || !a.query_positions || !a.scores)) return status::invalid_argument;
  return status::success;
}

namespace detail {

//! Index of (batch entry b, layer) in the [batch][layer_count] order of the queries and scores
//! of `a` (and of its workspace heads, times H).
template <kv_element T>
[[nodiscard]] __host__ __device__ constexpr int64_t batch_layer(const window_score_arguments<T>& a, int32_t b,
                                                                int32_t layer) noexcept {
  return static_cast<int64_t>(b) * a.layer_count + (layer - a.first_layer);
}

//! The exact path's CTA: pairs / 4 pair groups x 8 key groups of threads, each thread 4 pairs
//! x 8 keys of a 64-key tile.
inline constexpr int32_t window_keys = 64;     // keys per tile
inline constexpr int32_t key_pitch = window_keys + 4;
inline constexpr int32_t prob_pitch = window_keys + 1;
[[nodiscard]] constexpr int32_t window_threads_for(int32_t pairs) noexcept { return pairs / 4 * (window_keys / 8); }
//! Splits are whole tiles of either path (64 keys exact, 64 or 128 with tensor cores).
inline constexpr int32_t split_granule = 128;
//! Pooling sorts every head's slots by position in one device-wide sort: key = head << 32 |
//! position (a non-negative int32), slots past the head's length padded with position bits
//! all ones, so each head's slots stay in its stride-long segment, in position order.
[[nodiscard]] constexpr int32_t position_key_end_bit(int64_t heads) noexcept { return 32 + bits_for(heads); }

struct window_layout {
  int32_t per_row = 1;      // query heads per stored head
  int32_t pairs = 1;        // per_row * w
  int32_t split_keys = 1;   // keys per CTA, a multiple of split_granule
  int32_t splits = 1;
  bool pool = false;
  bool after_pool = false;
  int64_t heads = 0;        // batch * layer_count * H
  int64_t partial = 0;      // [heads][pairs][splits][2]
  int64_t stats = 0;        // [heads][pairs][2]
  int64_t agg = 0;          // [heads][per_row][stride]: row sums per query head
  int64_t pooled = 0;       // [heads][per_row or 1][stride] (with pooling)
  int64_t items = 0;        // [heads][stride] sort items
};

template <kv_element T>
[[nodiscard]] window_layout window_layout_of(const window_score_arguments<T>& a) noexcept {
  constexpr window_tuning t = default_tuning.window;
  window_layout l;
  const bool per_query = a.metric.reduce == gqa_reduce::per_query_head;
  l.per_row = per_query ? 1 : (a.pool.heads > 0 ? a.q_heads / a.pool.heads : 1);
  l.pairs = l.per_row * a.window;
  l.heads = static_cast<int64_t>(a.batch) * a.layer_count * a.pool.heads;
  // Enough CTAs to fill the device: split each head's keys.
  int64_t split = ceil_div(static_cast<int64_t>(a.stride) * (l.heads > 0 ? l.heads : 1), t.target_ctas);
  split = split < t.min_split_keys ? t.min_split_keys : (split > t.max_split_keys ? t.max_split_keys : split);
  l.split_keys = static_cast<int32_t>(ceil_div(split, split_granule) * split_granule);
  l.splits = static_cast<int32_t>(ceil_div(a.stride, l.split_keys));
  l.pool = a.metric.pool != pooling::none && a.metric.kernel > 1;
  l.after_pool = !per_query && a.metric.order == reduce_order::after_pool;
  l.partial = l.heads * l.pairs * l.splits * 2;
  l.stats = l.heads * l.pairs * 2;
  l.agg = l.heads * l.per_row * a.stride;
  l.pooled = l.pool ? l.heads * (l.after_pool ? l.per_row : 1) * a.stride : 0;
  l.items = l.pool ? l.heads * a.stride : 0;
  return l;
}

}  // namespace detail

//! fp32 softmax statistics and aggregated rows, plus the position sort used by pooling.
template <kv_element T>
[[nodiscard]] size_t workspace_size(const window_score_arguments<T>& a) noexcept {
  const detail::window_layout l = detail::window_layout_of(a);
  detail::workspace_carver w(nullptr);
  w.take<float>(l.partial);
  w.take<float>(l.stats);
  w.take<float>(l.agg);
  w.take<float>(l.pooled);
  w.take<uint64_t>(l.items);
  w.take<uint64_t>(l.items);
  w.take<int32_t>(l.items);
  w.take<int32_t>(l.items);
  w.take<char>(static_cast<int64_t>(
      l.pool ? workspace_size(radix_sort_arguments{nullptr, nullptr, nullptr, nullptr, l.items,
                                                   detail::position_key_end_bit(l.heads)})
             : 0));
  return w.used();
}

namespace detail {

template <kv_element T>
struct window_params {
  window_score_arguments<T> args;
  window_layout layout;
  float logit_scale = 0.f;  // base2_logit_scale(d): logit = q . k times it
  float* partial = nullptr;
  float* stats = nullptr;
  float* agg = nullptr;
  float* pooled = nullptr;
  uint64_t* keys_in = nullptr;
  uint64_t* keys_out = nullptr;
  int32_t* values_in = nullptr;
  int32_t* values_out = nullptr;
};

//! Decodes blockIdx.z = (b * layer_count + l') and blockIdx.y = h into the flat head and the
//! workspace head index, and blockIdx.x into the CTA's split of the head's keys.
template <kv_element T>
struct window_head {
  int32_t b, layer, h;
  int64_t head;   // mirror index
  int64_t index;  // workspace index [batch][layer_count][H]
  int32_t length;
  int32_t begin, end;  // the split: keys [begin, end), empty past the head's length
};
template <kv_element T>
__device__ __forceinline__ window_head<T> window_head_of(const window_params<T>& p) {
  const auto& a = p.args;
  window_head<T> w;
  w.b = blockIdx.z / a.layer_count;
  w.layer = a.first_layer + static_cast<int32_t>(blockIdx.z % a.layer_count);
  w.h = blockIdx.y;
  w.head = a.pool.head_index(a.rows[w.b], w.layer, w.h);
  w.index = static_cast<int64_t>(blockIdx.z) * a.pool.heads + w.h;
  w.length = a.pool.lengths[w.head];
  w.begin = static_cast<int32_t>(blockIdx.x) * p.layout.split_keys;
  w.end = min(w.length, w.begin + p.layout.split_keys);
  return w;
}

//! The query row [d] of pair `pair` of the head: pairs are query-head major (g * w + row).
template <kv_element T>
__device__ __forceinline__ const float* pair_query(const window_params<T>& p, const window_head<T>& wh, int32_t pair) {
  const auto& a = p.args;
  const int32_t qh0 = a.metric.reduce == gqa_reduce::per_query_head ? wh.h : wh.h * p.layout.per_row;
  const int64_t lb = batch_layer(a, wh.b, wh.layer);
  const int32_t g = pair / a.window, r = pair - g * a.window;
  return a.queries + ((lb * a.window + r) * a.q_heads + qh0 + g) * a.pool.head_dim;
}

//! Positions of pairs [first, first + count) of a block of `pairs` (-1 past the count), and
//! of keys [base, base + count) of a head (INT32_MAX past the tile: the causal test masks them).
template <kv_element T>
__device__ void stage_pair_positions(const window_params<T>& p, const window_head<T>& wh, int32_t first,
                                     int32_t count, int32_t pairs, int32_t* sqpos) {
  const auto& a = p.args;
  for (int32_t q = threadIdx.x; q < pairs; q += blockDim.x)
    sqpos[q] = q < count ? a.query_positions[static_cast<int64_t>(wh.b) * a.window + (first + q) % a.window] : -1;
}
template <kv_element T>
__device__ void stage_key_positions(const paged_view<T>& pool, int64_t head, int32_t base, int32_t count,
                                    int32_t* skpos) {
  for (int32_t k = threadIdx.x; k < window_keys; k += blockDim.x)
    skpos[k] = k < count ? pool.positions[pool.physical(head, base + k)] : INT32_MAX;
}

//! The shared-memory regions of a CTA of window_stats_kernel or window_probs_kernel, carved by
//! the logit policy (exact_logits, tensor_core_logits).
struct window_smem_view {
  void* q;         // the pair block
  void* k;         // the key tile
  float* logits;   // tensor cores: the pairs x 64 fp32 logit tile, over the key tile
  float* probs;    // pass 2: [pairs][prob_pitch], written once the logits are in registers
  int32_t* skpos;  // [window_keys]
  int32_t* sqpos;  // [pairs]
};

[[nodiscard]] __host__ __device__ constexpr int64_t round_up_128(int64_t bytes) noexcept { return (bytes + 127) / 128 * 128; }

//! window_math::exact: the pair block [d][pair_pitch] and the key tile [d][key_pitch] in fp32,
//! transposed so each thread reads float4 rows; the probability tile reuses the key tile.
struct exact_logits {
  static constexpr int32_t pairs = 128;
  static constexpr int32_t threads = window_threads_for(pairs);
  static constexpr int32_t min_blocks = 1;
  static constexpr int32_t pair_pitch = pairs + 4;  // transposed rows, 16-byte aligned
  [[nodiscard]] __host__ __device__ static int64_t tile_floats(int32_t d) noexcept {
    const int64_t keys = static_cast<int64_t>(d) * key_pitch, probs = static_cast<int64_t>(pairs) * prob_pitch;
    return keys > probs ? keys : probs;
  }
  [[nodiscard]] static size_t smem_bytes(int32_t d) noexcept {
    return static_cast<size_t>((static_cast<int64_t>(d) * pair_pitch + tile_floats(d)) * sizeof(float) +
                               (window_keys + pairs) * sizeof(int32_t));
  }
  __device__ static window_smem_view view(char* smem, int32_t d) {
    window_smem_view v;
    v.q = smem;
    v.k = smem + static_cast<int64_t>(d) * pair_pitch * sizeof(float);
    v.logits = nullptr;
    v.probs = static_cast<float*>(v.k);
    v.skpos = reinterpret_cast<int32_t*>(static_cast<float*>(v.k) + tile_floats(d));
    v.sqpos = v.skpos + window_keys;
    return v;
  }
  //! Returns what tile() takes as `terms` (one: the queries stay fp32).
  template <kv_element T>
  __device__ static int32_t stage_pairs(const window_params<T>& p, const window_head<T>& wh, int32_t first,
                                        int32_t count, const window_smem_view& v) {
    const int32_t d = p.args.pool.head_dim;
    float* sq = static_cast<float*>(v.q);
    for (int32_t i = threadIdx.x; i < pairs * d; i += blockDim.x) {
      const int32_t q = i / d, c = i - q * d;
      sq[c * pair_pitch + q] = q < count ? pair_query(p, wh, first + q)[c] : 0.f;
    }
    stage_pair_positions(p, wh, first, count, pairs, v.sqpos);
    return 1;
  }
  //! A key tile, loaded and staged when stored: fetch() only notes which keys. Lanes walk
  //! keys fastest, so the transposed shared-memory stores do not conflict.
  template <kv_element T>
  struct key_tile {
    const paged_view<T>* pool = nullptr;
    int64_t head = 0;
    int32_t base = 0, count = 0;

    __device__ void fetch(const paged_view<T>& from, int64_t h, int32_t first, int32_t keys) {
      pool = &from;
      head = h;
      base = first;
      count = keys;
    }
    __device__ void store(const window_smem_view& v) const {
      const int32_t d = pool->head_dim;
      float* sk = static_cast<float*>(v.k);
      for (int32_t i = threadIdx.x; i < window_keys * d; i += blockDim.x) {
        const int32_t c = i / window_keys, k = i - c * window_keys;
        sk[c * key_pitch + k] = k < count ? load(pool->keys[pool->physical(head, base + k) * d + c]) : 0.f;
      }
      stage_key_positions(*pool, head, base, count, v.skpos);
    }
  };
  //! This thread's 4 x 8 logits: pairs 4 pg + i, keys 8 kg + j, dot products over c ascending,
  //! times `scale`.
  __device__ static void tile(const window_smem_view& v, int32_t d, float scale, int32_t /*terms*/, float (&x)[4][8]) {
    const int32_t pg = threadIdx.x / 8, kg = threadIdx.x % 8;
    const float* sq = static_cast<const float*>(v.q);
    const float* sk = static_cast<const float*>(v.k);
#pragma unroll
    for (int32_t i = 0; i < 4; ++i)
#pragma unroll
      for (int32_t j = 0; j < 8; ++j) x[i][j] = 0.f;
    for (int32_t c = 0; c < d; ++c) {
      const float4 q = *reinterpret_cast<const float4*>(sq + c * pair_pitch + 4 * pg);
      const float4 k0 = *reinterpret_cast<const float4*>(sk + c * key_pitch + 8 * kg);
      const float4 k1 = *reinterpret_cast<const float4*>(sk + c * key_pitch + 8 * kg + 4);
      const float qv[4] = {q.x, q.y, q.z, q.w};
      const float kv[8] = {k0.x, k0.y, k0.z, k0.w, k1.x, k1.y, k1.z, k1.w};
#pragma unroll
      for (int32_t i = 0; i < 4; ++i)
#pragma unroll
        for (int32_t j = 0; j < 8; ++j) x[i][j] += qv[i] * kv[j];
    }
#pragma unroll
    for (int32_t i = 0; i < 4; ++i)
#pragma unroll
      for (int32_t j = 0; j < 8; ++j) x[i][j] *= scale;
  }
};

//! The shared-memory (32-bit) address of a pointer into shared memory.
__device__ __forceinline__ uint32_t shared_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
//! Four 8 x 8 b16 matrices from shared memory; lane l gives the address of row l % 8 of matrix
//! l / 8 and gets, in r[i], elements 2 (l % 4) and + 1 of row l / 4 of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], uint32_t address) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(address)
               : "memory");
}
//! d += a b: one m16n8k16 MMA, bf16 inputs, fp32 accumulation (sm_80+; PTX ISA fragment layout).
__device__ __forceinline__ void mma_bf16_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
//! 16 bytes global -> shared, asynchronously; `bytes` 0 zero-fills and reads nothing.
__device__ __forceinline__ void cp_async_16(uint32_t dst, const void* src, int32_t bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(bytes) : "memory");
}
__device__ __forceinline__ void cp_async_4(uint32_t dst, const void* src) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4;\n" ::"r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
//! Until at most `pending` (0 or 1: the ring holds 2 or 3 tiles) of this thread's newest
//! groups are still in flight.
__device__ __forceinline__ void cp_async_wait(int32_t pending) {
  if (pending > 0) {
    asm volatile("cp.async.wait_group 1;\n" ::: "memory");
  } else {
    asm volatile("cp.async.wait_group 0;\n" ::: "memory");
  }
}

//! A CTA's view of its shared memory (mma_window's layout).
struct mma_smem {
  char* base;
  int32_t d, pairs, keys, stages;
  //! The pair block's three term matrices, one after another (stage_query_terms).
  [[nodiscard]] __device__ __nv_bfloat16* terms() const { return reinterpret_cast<__nv_bfloat16*>(base); }
  [[nodiscard]] __device__ uint32_t tile_address(int32_t stage) const {
    return shared_address(base + mma_window::tiles_at(d, pairs) + stage * mma_window::tile_bytes(d, keys));
  }
  [[nodiscard]] __device__ int32_t* qpos() const {
    return reinterpret_cast<int32_t*>(base + mma_window::positions_at(d, pairs, keys, stages));
  }
  [[nodiscard]] __device__ int32_t* kpos(int32_t stage) const { return qpos() + pairs + stage * keys; }
};

//! Stages pairs [first, first + count) of the head of a block of `pairs` as three bf16 term
//! matrices [pairs][pitch] one after another from `terms` (hi, mid, lo: hi + mid + lo == the
//! fp32 query; zero rows past the count, zero columns past d), and their positions into
//! `sqpos` (-1 past the count). Every thread of the CTA calls it: it ends with a CTA barrier
//! and returns the number of terms the block needs (1 where every low term is zero, as for a
//! bf16 model's queries: zero terms would add exact zeros).
template <kv_element T>
__device__ int32_t stage_query_terms(const window_params<T>& p, const window_head<T>& wh, int32_t first, int32_t count,
                                     int32_t pairs, __nv_bfloat16* terms, int32_t* sqpos) {
  const int32_t d = p.args.pool.head_dim, dp = mma_window::padded(d), ld = mma_window::pitch(d);
  const int32_t warps = static_cast<int32_t>(blockDim.x) / 32;
  __nv_bfloat16* hi = terms;
  __nv_bfloat16* mid = hi + pairs * ld;
  __nv_bfloat16* lo = mid + pairs * ld;
  bool low_terms = false;
  for (int32_t q = threadIdx.x / 32; q < pairs; q += warps) {  // a warp per row, lanes along d
    const float* row = q < count ? pair_query(p, wh, first + q) : nullptr;
    for (int32_t c = threadIdx.x % 32; c < dp; c += 32) {
      const float x = row && c < d ? row[c] : 0.f;
      // Each residual is exact in fp32; three bf16 terms hold all 24 significand bits.
      const __nv_bfloat16 h = __float2bfloat16_rn(x);
      const float r = x - __bfloat162float(h);
      const __nv_bfloat16 m = __float2bfloat16_rn(r);
      const __nv_bfloat16 l = __float2bfloat16_rn(r - __bfloat162float(m));
      hi[q * ld + c] = h;
      mid[q * ld + c] = m;
      lo[q * ld + c] = l;
      low_terms = low_terms || __bfloat162float(m) != 0.f || __bfloat162float(l) != 0.f;
    }
  }
  stage_pair_positions(p, wh, first, count, pairs, sqpos);
  return __syncthreads_or(low_terms ? 1 : 0) ? 3 : 1;
}

//! Issues the copies of keys [base, base + count) of the head into ring stage `stage`: zero
//! rows and position INT32_MAX past the count (the causal tests mask them). Steps through
//! this thread's 16-byte chunks instead of dividing per chunk (d is a run-time value).
template <kv_element T>
__device__ void load_mma_tile(const paged_view<T>& pool, int64_t head, int32_t base, int32_t count,
                              const mma_smem& s, int32_t stage) {
  const int32_t chunks = mma_window::padded(s.d) / 8, ld = mma_window::pitch(s.d);
  const auto threads = static_cast<int32_t>(blockDim.x);
  const uint32_t tile = s.tile_address(stage);
  int32_t k = static_cast<int32_t>(threadIdx.x) / chunks;
  int32_t ch = static_cast<int32_t>(threadIdx.x) - k * chunks;
  const int32_t k_step = threads / chunks, ch_step = threads - k_step * chunks;
  while (k < s.keys) {
    const bool valid = k < count && ch * 8 < s.d;
    const T* src = valid ? pool.keys + pool.physical(head, base + k) * s.d + ch * 8 : pool.keys;
    cp_async_16(tile + static_cast<uint32_t>((k * ld + ch * 8) * 2), src, valid ? 16 : 0);
    k += k_step;
    ch += ch_step;
    if (ch >= chunks) ch -= chunks, ++k;
  }
  int32_t* kpos = s.kpos(stage);
  for (int32_t j = threadIdx.x; j < s.keys; j += threads) {
    if (j < count) {
      cp_async_4(shared_address(kpos + j), pool.positions + pool.physical(head, base + j));
    } else {
      kpos[j] = INT32_MAX;
    }
  }
}

//! Runs compute(stage, base, count) for every key tile of [begin, end), the tile in ring stage
//! `stage`. Every thread of the CTA calls it; the loads of the next stages - 1 tiles are in
//! flight during each compute, and one barrier a tile both publishes the tile and retires the
//! stage the next load overwrites (the one computed in the previous iteration).
template <kv_element T, class Compute>
__device__ void for_each_mma_tile(const paged_view<T>& pool, int64_t head, int32_t begin, int32_t end,
                                  const mma_smem& s, Compute&& compute) {
  const int32_t tiles = begin < end ? (end - begin + s.keys - 1) / s.keys : 0;
  const auto tile_keys = [&](int32_t t) { return min(s.keys, end - begin - t * s.keys); };
  for (int32_t t = 0; t < s.stages - 1; ++t) {
    if (t < tiles) load_mma_tile(pool, head, begin + t * s.keys, tile_keys(t), s, t);
    cp_async_commit();  // empty groups too: the wait below counts groups
  }
  for (int32_t t = 0; t < tiles; ++t) {
    cp_async_wait(s.stages - 2);  // this thread's copies of tile t have landed
    __syncthreads();              // everyone's have; everyone is done with tile t - 1
    const int32_t next = t + s.stages - 1;
    if (next < tiles) load_mma_tile(pool, head, begin + next * s.keys, tile_keys(next), s, next % s.stages);
    cp_async_commit();
    compute(t % s.stages, begin + t * s.keys, tile_keys(t));
  }
}

//! acc += A x B^T over d for one warp: 16 query rows of A at `a_addr`, the pair block's bf16
//! terms `term_bytes` apart of which the last `Terms` are used, small terms first, and
//! `NTiles` 8-key tiles of B at `b_addr` (two per ldmatrix), both in ldmatrix order
//! (a_rows_address, b_rows_address). Both passes take their logits from here, so pass 2's are
//! pass 1's to the bit.
//! A step of 16 along d loads its fragments first, then runs the MMAs term by term across
//! every tile: consecutive MMAs update different accumulators (one accumulator's three terms
//! back to back would wait on each other), and each accumulator adds its terms in a fixed order.
template <int32_t Terms, int32_t NTiles>
__device__ __forceinline__ void mma_tiles(uint32_t a_addr, uint32_t b_addr, uint32_t term_bytes, int32_t ld,
                                          int32_t dp, float (&acc)[NTiles][4]) {
  for (int32_t c = 0; c < dp; c += 16) {
    uint32_t a[Terms][4];
#pragma unroll
    for (int32_t t = 0; t < Terms; ++t)
      ldmatrix_x4(a[t], a_addr + (Terms - 1 - t) * term_bytes + static_cast<uint32_t>(c * 2));
    const uint32_t b_step = b_addr + static_cast<uint32_t>(c * 2);
    uint32_t b[NTiles / 2][4];
#pragma unroll
    for (int32_t n = 0; n < NTiles / 2; ++n) ldmatrix_x4(b[n], b_step + static_cast<uint32_t>(16 * n * ld * 2));
#pragma unroll
    for (int32_t t = 0; t < Terms; ++t)
#pragma unroll
      for (int32_t n = 0; n < NTiles / 2; ++n) {
        mma_bf16_16816(acc[2 * n], a[t], b[n][0], b[n][1]);
        mma_bf16_16816(acc[2 * n + 1], a[t], b[n][2], b[n][3]);
      }
  }
}
#endif

//! ldmatrix row addresses (bf16 elements -> bytes) of this lane, for a matrix [row][ld] at
//! `base`: as A (16 rows from `row`: lane -> row + lane % 16 at column 8 (lane / 16)) and as B
//! (two 8-row tiles: lane -> row lane % 8 + 8 (lane / 16) at column 8 (lane / 8 % 2)). Each
//! lands as the m16n8k16 fragment of that lane.
__device__ __forceinline__ uint32_t a_rows_address(uint32_t base, int32_t row, int32_t ld, int32_t lane) {
  return base + static_cast<uint32_t>(((row + lane % 16) * ld + 8 * (lane / 16)) * 2);
}
__device__ __forceinline__ uint32_t b_rows_address(uint32_t base, int32_t ld, int32_t lane) {
  return base + static_cast<uint32_t>(((lane % 8 + 8 * (lane / 16)) * ld + 8 * (lane / 8 % 2)) * 2);
}

//! Pass 2 with tensor cores (bf16 K): the 64-pair block staged as three bf16 matrices
//! (stage_query_terms), the key tile [key][pitch] in bf16 as stored; warp w computes logit rows
//! [16 w, 16 w + 16) x 64 keys with pass 1's MMAs in pass 1's order (mma_tiles), so the logits
//! are pass 1's to the bit, into an fp32 tile over the key tile, from which each thread reads
//! its 4 x 8 (rows of its own warp). The probability tile reuses it too. 64 pairs keep the
//! shared memory to 70 KiB at head dim 128, so three CTAs share an SM and one CTA's MMAs
//! overlap another's softmax and row sums: on an H200 this pass took 1.27 ms where a
//! register-only one in pass 1's division took 1.92 (ncu, B = 8, n = 32k; reworked, it still
//! lost: docs/performance.md).
struct tensor_core_logits {
  static constexpr int32_t pairs = 64;
  static constexpr int32_t threads = window_threads_for(pairs);
  static constexpr int32_t min_blocks = 3;
  //! fp32 elements: a multiple of 4 (float4 reads), and 8 banks per row so the float2 stores of
  //! a half-warp's four rows do not conflict.
  static constexpr int32_t logit_pitch = window_keys + 8;
  static_assert(threads / 32 * 16 == pairs, "one warp per 16 pair rows");
  static_assert(prob_pitch <= logit_pitch, "the probability tile fits the logit tile");

  [[nodiscard]] __host__ __device__ static constexpr int64_t q_bytes(int32_t d) noexcept {
    return round_up_128(mma_window::max_terms * mma_window::term_bytes(d, pairs));
  }
  static constexpr int64_t logit_bytes = static_cast<int64_t>(pairs) * logit_pitch * sizeof(float);
  //! The key tile, which the logit (and probability) tile overwrites once every warp's MMAs
  //! are done with it.
  [[nodiscard]] __host__ __device__ static constexpr int64_t tile_bytes(int32_t d) noexcept {
    const int64_t keys = mma_window::tile_bytes(d, window_keys);
    return round_up_128(keys > logit_bytes ? keys : logit_bytes);
  }
  [[nodiscard]] __host__ __device__ static constexpr size_t smem_bytes(int32_t d) noexcept {
    return static_cast<size_t>(q_bytes(d) + tile_bytes(d) + (window_keys + pairs) * sizeof(int32_t));
  }
  __device__ static window_smem_view view(char* smem, int32_t d) {
    window_smem_view v;
    v.q = smem;
    v.k = smem + q_bytes(d);
    v.logits = static_cast<float*>(v.k);
    v.probs = v.logits;
    v.skpos = reinterpret_cast<int32_t*>(smem + q_bytes(d) + tile_bytes(d));
    v.sqpos = v.skpos + window_keys;
    return v;
  }
  //! Every thread of the CTA must call it (stage_query_terms); returns the terms for tile().
  template <kv_element T>
  __device__ static int32_t stage_pairs(const window_params<T>& p, const window_head<T>& wh, int32_t first,
                                        int32_t count, const window_smem_view& v) {
    return stage_query_terms(p, wh, first, count, pairs, static_cast<__nv_bfloat16*>(v.q), v.sqpos);
  }
  //! A key tile prefetched into registers: fetch() issues the 16-byte loads of the stored
  //! bf16 rows (d % 8 == 0 and 16-byte aligned keys, so every row is 16-byte aligned) and
  //! their positions, which land while the CTA works on the previous tile; store() writes
  //! them to shared memory.
  template <kv_element T>
  struct key_tile {
    static_assert(std::is_same_v<T, bfloat16>, "the tensor-core path reads bf16 keys");
    static constexpr int32_t max_chunks = window_keys * (max_tensor_core_head_dim / 8) / threads;
    uint4 chunk[max_chunks];
    int32_t position = 0;  // of key threadIdx.x (threads below window_keys)
    int32_t d = 0;

    //! Calls f(r, k, ch) for this thread's chunks: chunk r is 16-byte chunk ch of key k of the
    //! tile (k may pass the tile). Steps instead of dividing per chunk (d is a run-time value).
    template <class F>
    __device__ static void for_each_chunk(int32_t chunks, F&& f) {
      int32_t k = static_cast<int32_t>(threadIdx.x) / chunks;
      int32_t ch = static_cast<int32_t>(threadIdx.x) - k * chunks;
      const int32_t k_step = threads / chunks, ch_step = threads - k_step * chunks;
#pragma unroll
      for (int32_t r = 0; r < max_chunks; ++r) {
        f(r, k, ch);
        k += k_step;
        ch += ch_step;
        if (ch >= chunks) ch -= chunks, ++k;
      }
    }

    __device__ void fetch(const paged_view<T>& pool, int64_t head, int32_t base, int32_t count) {
      d = pool.head_dim;
      for_each_chunk(mma_window::padded(d) / 8, [&](int32_t r, int32_t k, int32_t ch) {
        chunk[r] = uint4{0u, 0u, 0u, 0u};
        if (k < count && ch * 8 < d)
          chunk[r] = *reinterpret_cast<const uint4*>(pool.keys + pool.physical(head, base + k) * d + ch * 8);
      });
      if (threadIdx.x < window_keys)
        position = static_cast<int32_t>(threadIdx.x) < count
                       ? pool.positions[pool.physical(head, base + static_cast<int32_t>(threadIdx.x))]
                       : INT32_MAX;
    }
    __device__ void store(const window_smem_view& v) const {
      const int32_t ld = mma_window::pitch(d);
      auto* sk = static_cast<__nv_bfloat16*>(v.k);
      for_each_chunk(mma_window::padded(d) / 8, [&](int32_t r, int32_t k, int32_t ch) {
        if (k < window_keys) *reinterpret_cast<uint4*>(sk + k * ld + ch * 8) = chunk[r];
      });
      if (threadIdx.x < window_keys) v.skpos[threadIdx.x] = position;
    }
  };
  //! Every thread of the CTA must call it (it synchronises the CTA once: the logits overwrite
  //! the key tile). Each thread's 4 x 8 logits are rows of its own warp's MMAs, times `scale`.
  __device__ static void tile(const window_smem_view& v, int32_t d, float scale, int32_t terms, float (&x)[4][8]) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
    constexpr int32_t n_tiles = window_keys / 8;  // a C fragment: keys 8 n + 2 (lane % 4) + {0, 1}
    const int32_t ld = mma_window::pitch(d), dp = mma_window::padded(d);
    const int32_t lane = static_cast<int32_t>(threadIdx.x) % 32, row = 16 * (static_cast<int32_t>(threadIdx.x) / 32);
    const auto term_bytes = static_cast<uint32_t>(mma_window::term_bytes(d, pairs));
    const uint32_t a_addr = a_rows_address(shared_address(v.q), row, ld, lane);
    const uint32_t b_addr = b_rows_address(shared_address(v.k), ld, lane);
    float acc[n_tiles][4] = {};  // rows row + lane / 4 (acc[n][0, 1]) and + 8 (acc[n][2, 3])
    if (terms == 3) {
      mma_tiles<3, n_tiles>(a_addr, b_addr, term_bytes, ld, dp, acc);
    } else {
      mma_tiles<1, n_tiles>(a_addr, b_addr, term_bytes, ld, dp, acc);
    }
    __syncthreads();  // every warp is done with the key tile
#pragma unroll
    for (int32_t n = 0; n < n_tiles; ++n) {
      float* out = v.logits + (row + lane / 4) * logit_pitch + 8 * n + 2 * (lane % 4);
      *reinterpret_cast<float2*>(out) = float2{__fmul_rn(acc[n][0], scale), __fmul_rn(acc[n][1], scale)};
      *reinterpret_cast<float2*>(out + 8 * logit_pitch) = float2{__fmul_rn(acc[n][2], scale), __fmul_rn(acc[n][3], scale)};
    }
    __syncwarp();
    const int32_t pg = threadIdx.x / 8, kg = threadIdx.x % 8;
    static_assert(32 / 8 * 4 == 16, "a warp's threads read back exactly its 16 rows");
#pragma unroll
    for (int32_t i = 0; i < 4; ++i) {
      const float* r = v.logits + (4 * pg + i) * logit_pitch + 8 * kg;
      const float4 x0 = *reinterpret_cast<const float4*>(r);
      const float4 x1 = *reinterpret_cast<const float4*>(r + 4);
      const float xs[8] = {x0.x, x0.y, x0.z, x0.w, x1.x, x1.y, x1.z, x1.w};
#pragma unroll
      for (int32_t j = 0; j < 8; ++j) x[i][j] = xs[j];
    }
#else
    __trap();  // window_scores refuses tensor_cores below sm_80 before launching
#endif
  }
};

//! Pass 1 with tensor cores (bf16 K), with FlashAttention-2's division of the work. The pair
//! block (`block_pairs`, 128 or 64 pairs) is staged once as three bf16 matrices [pair][pitch]
//! (stage_query_terms). Key tiles of `TileKeys` keys [key][pitch] arrive by cp.async in a
//! ring of `stages` buffers, so one CTA barrier a tile suffices and the next tiles load while
//! this one is multiplied. Warp w keeps its m16n8k16 results, pair rows [16 w, 16 w + 16) x
//! the tile's keys, in registers (no logit tile in shared memory); a row's running max and
//! denominator live in the four lanes (a quad) that hold the row. The denominators sum in
//! another order than the CPU's (as the logits do); the parity tests compare kept sets and
//! test_window_math the scores' distance from the exact path's. The host picks the widest
//! shape whose shared memory the device offers (mma_shape_for). Launched with 2 x block_pairs
//! threads (16 pair rows a warp).
template <kv_element T, int32_t TileKeys>
__global__ void __launch_bounds__(mma_window::max_threads, 1)
    window_stats_mma_kernel(const __grid_constant__ window_params<T> p, int32_t block_pairs, int32_t stages) {
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
  extern __shared__ __align__(128) char window_shared[];
  constexpr int32_t n_tiles = TileKeys / 8;  // a C fragment: keys 8 n + 2 (lane % 4) + {0, 1}
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const mma_smem s{window_shared, a.pool.head_dim, block_pairs, TileKeys, stages};
  const int32_t ld = mma_window::pitch(s.d), dp = mma_window::padded(s.d);
  const window_head<T> wh = window_head_of(p);
  const int32_t warp = static_cast<int32_t>(threadIdx.x) / 32, lane = static_cast<int32_t>(threadIdx.x) % 32;
  const int32_t quad = lane % 4, row0 = 16 * warp + lane / 4;  // this lane's rows: row0 and row0 + 8
  const auto term_bytes = static_cast<uint32_t>(mma_window::term_bytes(s.d, s.pairs));
  for (int32_t first = 0; first < l.pairs; first += s.pairs) {
    const int32_t count = min(s.pairs, l.pairs - first);
    __syncthreads();  // the previous block is done with the pair block and the ring
    const int32_t terms = stage_query_terms(p, wh, first, count, s.pairs, s.terms(), s.qpos());
    const bool live = 16 * warp < count;  // warp-uniform: rows past the count are zero
    const int32_t qpos[2] = {s.qpos()[row0], s.qpos()[row0 + 8]};
    float m[2] = {-INFINITY, -INFINITY}, sum[2] = {0.f, 0.f};  // sum: this lane's keys only
    const uint32_t a_addr = a_rows_address(shared_address(s.terms()), 16 * warp, ld, lane);
    for_each_mma_tile(a.pool, wh.head, wh.begin, wh.end, s, [&](int32_t stage, int32_t, int32_t) {
      if (!live) return;
      float acc[n_tiles][4] = {};
      const uint32_t b_addr = b_rows_address(s.tile_address(stage), ld, lane);
      if (terms == 3) {
        mma_tiles<3, n_tiles>(a_addr, b_addr, term_bytes, ld, dp, acc);
      } else {
        mma_tiles<1, n_tiles>(a_addr, b_addr, term_bytes, ld, dp, acc);
      }
      int2 kpos[n_tiles];
#pragma unroll
      for (int32_t n = 0; n < n_tiles; ++n) kpos[n] = *reinterpret_cast<const int2*>(s.kpos(stage) + 8 * n + 2 * quad);
#pragma unroll
      for (int32_t n = 0; n < n_tiles; ++n)
#pragma unroll
        for (int32_t e = 0; e < 4; ++e) acc[n][e] = __fmul_rn(acc[n][e], p.logit_scale);  // rounded, as stored
      // Per row (acc[n][2 i + {0, 1}]): the tile's max over the quad first, then this lane's
      // exponentials folded into its running denominator once (the quad shares the max, so
      // its lanes' sums add).
#pragma unroll
      for (int32_t i = 0; i < 2; ++i) {
        float tile_max = -INFINITY;
#pragma unroll
        for (int32_t n = 0; n < n_tiles; ++n) {
          if (kpos[n].x <= qpos[i]) tile_max = fmaxf(tile_max, acc[n][2 * i]);  // causal (and padding: INT32_MAX)
          if (kpos[n].y <= qpos[i]) tile_max = fmaxf(tile_max, acc[n][2 * i + 1]);
        }
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
        tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
        if (tile_max == -INFINITY) continue;
        const float m_new = fmaxf(m[i], tile_max);
        float tile_sum = 0.f;
#pragma unroll
        for (int32_t n = 0; n < n_tiles; ++n) {
          if (kpos[n].x <= qpos[i]) tile_sum += exp2f(acc[n][2 * i] - m_new);
          if (kpos[n].y <= qpos[i]) tile_sum += exp2f(acc[n][2 * i + 1] - m_new);
        }
        // An unchanged max would scale by exactly 1: skip its exp2 (one rounding either way).
        sum[i] = m_new != m[i] ? fmaf(sum[i], exp2f(m[i] - m_new), tile_sum) : sum[i] + tile_sum;
        m[i] = m_new;
      }
    });
    if (!live) continue;
#pragma unroll
    for (int32_t i = 0; i < 2; ++i) {
      float total = sum[i] + __shfl_xor_sync(0xffffffffu, sum[i], 1);
      total += __shfl_xor_sync(0xffffffffu, total, 2);
      const int32_t q = row0 + 8 * i;
      if (quad == 0 && q < count) {
        const int64_t at = ((wh.index * l.pairs + first + q) * l.splits + blockIdx.x) * 2;
        p.partial[at] = m[i];
        p.partial[at + 1] = total;
      }
    }
  }
#else
  __trap();  // window_scores refuses tensor_cores below sm_80 before launching
#endif
}

//! Runs compute(base, keys, x, kpos) for every 64-key tile [base, base + keys) of this CTA's
//! split, with this thread's 4 x 8 logits x of `Logits` (pairs 4 pg + i, keys 8 kg + j) and
//! the positions kpos of its 8 keys. Every thread of the CTA calls it, after staging the pair
//! block (`terms`: what stage_pairs returned); the next tile's loads are in flight during each
//! compute. compute may overwrite the key tile's shared memory after a CTA barrier: the next
//! tile is stored only after the barrier that opens the next iteration.
template <class Logits, kv_element T, class Compute>
__device__ __forceinline__ void for_each_logit_tile(const window_params<T>& p, const window_head<T>& wh,
                                                    const window_smem_view& sm, int32_t terms, Compute&& compute) {
  const int32_t begin = wh.begin, end = wh.end, kg = threadIdx.x % 8;
  typename Logits::template key_tile<T> tile_keys;
  if (begin < end) tile_keys.fetch(p.args.pool, wh.head, begin, min(window_keys, end - begin));
  for (int32_t base = begin; base < end; base += window_keys) {
    __syncthreads();
    tile_keys.store(sm);
    __syncthreads();
    if (base + window_keys < end)
      tile_keys.fetch(p.args.pool, wh.head, base + window_keys, min(window_keys, end - base - window_keys));
    float x[4][8];
    Logits::tile(sm, p.args.pool.head_dim, p.logit_scale, terms, x);
    int32_t kpos[8];
#pragma unroll
    for (int32_t j = 0; j < 8; ++j) kpos[j] = sm.skpos[8 * kg + j];
    compute(base, min(window_keys, end - base), x, kpos);
  }
}

//! Pass 1 (exact): per pair, the running max and denominator over this split's causal keys.
template <kv_element T>
__global__ void __launch_bounds__(exact_logits::threads, 1) window_stats_kernel(const __grid_constant__ window_params<T> p) {
  extern __shared__ __align__(128) char window_shared[];
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int32_t d = a.pool.head_dim;
  const window_head<T> wh = window_head_of(p);
  const window_smem_view sm = exact_logits::view(window_shared, d);
  const int32_t pg = threadIdx.x / 8, kg = threadIdx.x % 8;
  for (int32_t first = 0; first < l.pairs; first += exact_logits::pairs) {
    const int32_t count = min(exact_logits::pairs, l.pairs - first);
    float m[4], s[4];
#pragma unroll
    for (int32_t i = 0; i < 4; ++i) m[i] = -INFINITY, s[i] = 0.f;
    __syncthreads();
    const int32_t terms = exact_logits::stage_pairs(p, wh, first, count, sm);
    const auto fold = [&](int32_t, int32_t, const float (&x)[4][8], const int32_t (&kpos)[8]) {
      // Per row: the tile's max first, then its eight exponentials independently (a running
      // update per key would chain them), folded into the running denominator once.
#pragma unroll
      for (int32_t i = 0; i < 4; ++i) {
        const int32_t qpos = sm.sqpos[4 * pg + i];
        float tile_max = -INFINITY;
#pragma unroll
        for (int32_t j = 0; j < 8; ++j)
          if (kpos[j] <= qpos) tile_max = fmaxf(tile_max, x[i][j]);  // causal (and padding: INT32_MAX)
        if (tile_max == -INFINITY) continue;
        const float m_new = fmaxf(m[i], tile_max);
        float sum = 0.f;
#pragma unroll
        for (int32_t j = 0; j < 8; ++j)
          if (kpos[j] <= qpos) sum += exp2f(x[i][j] - m_new);
        // An unchanged max would scale by exactly 1: skip its exp2 (one rounding either way).
        s[i] = m_new != m[i] ? fmaf(s[i], exp2f(m[i] - m_new), sum) : s[i] + sum;
        m[i] = m_new;
      }
    };
    for_each_logit_tile<exact_logits>(p, wh, sm, terms, fold);
    // Merge the 8 key groups (adjacent lanes), then one lane per pair group writes.
#pragma unroll
    for (int32_t i = 0; i < 4; ++i) {
#pragma unroll
      for (int32_t offset = 1; offset < 8; offset *= 2) {
        const float om = __shfl_xor_sync(0xffffffffu, m[i], offset);
        const float os = __shfl_xor_sync(0xffffffffu, s[i], offset);
        const float mx = fmaxf(m[i], om);
        if (mx != -INFINITY) s[i] = s[i] * exp2f(m[i] - mx) + os * exp2f(om - mx);
        m[i] = mx;
      }
      const int32_t q = 4 * pg + i;
      if (kg == 0 && q < count) {
        const int64_t at = ((wh.index * l.pairs + first + q) * l.splits + blockIdx.x) * 2;
        p.partial[at] = m[i];
        p.partial[at + 1] = s[i];
      }
    }
  }
}

template <kv_element T>
__global__ void window_merge_kernel(const __grid_constant__ window_params<T> p) {
  const window_layout& l = p.layout;
  const int64_t total = l.heads * l.pairs;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float m = -INFINITY;
    for (int32_t t = 0; t < l.splits; ++t) m = fmaxf(m, p.partial[(i * l.splits + t) * 2]);
    float s = 0.f;
    if (m != -INFINITY)
      for (int32_t t = 0; t < l.splits; ++t) {
        const float pm = p.partial[(i * l.splits + t) * 2];
        if (pm != -INFINITY) s += p.partial[(i * l.splits + t) * 2 + 1] * exp2f(pm - m);
      }
    p.stats[i * 2] = m;
    p.stats[i * 2 + 1] = s;
  }
}

//! Pass 2: probabilities (or their squares) summed per (query head, key) over the rows,
//! ascending (the CPU's order), into agg [heads][per_row][stride], with the logits of
//! `Logits` (exact_logits, tensor_core_logits).
template <kv_element T, class Logits>
__global__ void __launch_bounds__(Logits::threads, Logits::min_blocks) window_probs_kernel(const __grid_constant__ window_params<T> p) {
  extern __shared__ __align__(128) char window_shared[];
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int32_t d = a.pool.head_dim;
  const window_head<T> wh = window_head_of(p);
  const window_smem_view sm = Logits::view(window_shared, d);
  const int32_t pg = threadIdx.x / 8, kg = threadIdx.x % 8;
  const bool squared = a.metric.squared;
  for (int32_t first = 0; first < l.pairs; first += Logits::pairs) {
    const int32_t count = min(Logits::pairs, l.pairs - first);
    float m[4], inv_s[4];  // a row's max and 1 / its denominator (>= 1 where m is finite)
#pragma unroll
    for (int32_t i = 0; i < 4; ++i) {
      const int32_t q = first + 4 * pg + i;
      m[i] = q < l.pairs ? p.stats[(wh.index * l.pairs + q) * 2] : -INFINITY;
      inv_s[i] = q < l.pairs ? 1.f / p.stats[(wh.index * l.pairs + q) * 2 + 1] : 1.f;
    }
    // Query heads whose rows this block holds: [g_first, g_last].
    const int32_t g_first = first / a.window, g_last = (first + count - 1) / a.window;
    __syncthreads();
    const int32_t terms = Logits::stage_pairs(p, wh, first, count, sm);
    const auto sum_rows = [&](int32_t base, int32_t keys, const float (&x)[4][8], const int32_t (&kpos)[8]) {
      __syncthreads();  // the probability tile overwrites the key (or logit) tile
#pragma unroll
      for (int32_t i = 0; i < 4; ++i) {
        const int32_t qpos = sm.sqpos[4 * pg + i];
#pragma unroll
        for (int32_t j = 0; j < 8; ++j) {
          float v = 0.f;
          if (m[i] != -INFINITY && static_cast<int64_t>(kpos[j]) <= static_cast<int64_t>(qpos) - a.metric.buffer) {
            v = exp2f(x[i][j] - m[i]) * inv_s[i];
            if (squared) v *= v;
          }
          sm.probs[(4 * pg + i) * prob_pitch + 8 * kg + j] = v;
        }
      }
      __syncthreads();
      for (int32_t i = threadIdx.x; i < (g_last - g_first + 1) * window_keys; i += blockDim.x) {
        const int32_t g = g_first + i / window_keys, k = i % window_keys;
        if (k >= keys) continue;
        const int32_t r0 = max(first, g * a.window) - first;              // block rows of g
        const int32_t r1 = min(first + count, (g + 1) * a.window) - first;
        float* out = p.agg + (wh.index * l.per_row + g) * a.stride + base + k;
        float v = first > g * a.window ? *out : 0.f;  // rows of g in an earlier block
        for (int32_t q = r0; q < r1; ++q) v += sm.probs[q * prob_pitch + k];
        *out = v;
      }
    };
    for_each_logit_tile<Logits>(p, wh, sm, terms, sum_rows);
  }
}

[[nodiscard]] inline dim3 window_grid(const window_layout& l, int32_t heads, int32_t batch_layers) {
  return dim3(static_cast<unsigned>(l.splits), static_cast<unsigned>(heads), static_cast<unsigned>(batch_layers));
}

//! Merges pass 1's per-split statistics into one max and denominator per pair.
template <kv_element T>
[[nodiscard]] status launch_window_merge(const window_params<T>& p, cudaStream_t stream) {
  const int32_t et = default_tuning.elementwise.threads;
  window_merge_kernel<T><<<grid_for(p.layout.heads * p.layout.pairs, et), et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! window_math::exact: the two passes and the merge between them.
template <kv_element T>
[[nodiscard]] status launch_exact_passes(const window_params<T>& p, cudaStream_t stream) {
  const size_t smem = exact_logits::smem_bytes(p.args.pool.head_dim);
  if (const status s = allow_smem(window_stats_kernel<T>, smem); s != status::success) return s;
  if (const status s = allow_smem(window_probs_kernel<T, exact_logits>, smem); s != status::success) return s;
  const dim3 grid = window_grid(p.layout, p.args.pool.heads, p.args.batch * p.args.layer_count);
  window_stats_kernel<T><<<grid, exact_logits::threads, smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  if (const status s = launch_window_merge(p, stream); s != status::success) return s;
  window_probs_kernel<T, exact_logits><<<grid, exact_logits::threads, smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! window_math::tensor_cores: pass 1 in `shape` (mma_shape_for), the merge, pass 2 with
//! tensor_core_logits (whose shared memory is below every shape's: test_window_mma_layout).
template <kv_element T, int32_t TileKeys>
[[nodiscard]] status launch_mma_passes(const window_params<T>& p, const mma_shape& shape, cudaStream_t stream) {
  const auto smem = static_cast<size_t>(shape.smem_bytes(p.args.pool.head_dim));
  const size_t probs_smem = tensor_core_logits::smem_bytes(p.args.pool.head_dim);
  if (const status s = allow_smem(window_stats_mma_kernel<T, TileKeys>, smem); s != status::success) return s;
  if (const status s = allow_smem(window_probs_kernel<T, tensor_core_logits>, probs_smem); s != status::success)
    return s;
  const dim3 grid = window_grid(p.layout, p.args.pool.heads, p.args.batch * p.args.layer_count);
  window_stats_mma_kernel<T, TileKeys><<<grid, 2 * shape.pairs, smem, stream>>>(p, shape.pairs, shape.stages);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  if (const status s = launch_window_merge(p, stream); s != status::success) return s;
  window_probs_kernel<T, tensor_core_logits><<<grid, tensor_core_logits::threads, probs_smem, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

//! Mirror index of workspace head hi.
template <kv_element T>
__device__ __forceinline__ int64_t mirror_head_of(const window_score_arguments<T>& a, int64_t hi) {
  int32_t layer = 0;
  return batch_head(a.pool, a.rows, a.first_layer, a.layer_count, hi, layer);
}

//! Position sort keys (position_key_end_bit): slot j of head hi at hi * stride + j, value j.
template <kv_element T>
__global__ void position_keys_kernel(const __grid_constant__ window_params<T> p) {
  const auto& a = p.args;
  for (int64_t hi = blockIdx.y; hi < p.layout.heads; hi += gridDim.y) {  // workspace head index
    const int64_t head = mirror_head_of(a, hi);
    const int32_t n = a.pool.lengths[head];
    const uint64_t high = static_cast<uint64_t>(hi) << 32;
    for (int32_t j = blockIdx.x * blockDim.x + threadIdx.x; j < a.stride; j += gridDim.x * blockDim.x) {
      const uint32_t position = j < n ? static_cast<uint32_t>(a.pool.positions[a.pool.physical(head, j)]) : ~0u;
      p.keys_in[hi * a.stride + j] = high | position;
      p.values_in[hi * a.stride + j] = j;
    }
  }
}

//! Pools rows `in` / divisor into `out` along positions (slots in position order:
//! values_out); `rows` rows per head.
template <kv_element T>
__global__ void pool_kernel(const __grid_constant__ window_params<T> p, const float* in, float* out, int32_t rows,
                            float divisor) {
  const auto& a = p.args;
  for (int64_t row = blockIdx.y; row < p.layout.heads * rows; row += gridDim.y) {  // [heads][rows]
    const int64_t hi = row / rows;
    const int64_t seg = hi * a.stride;
    const int32_t n = a.pool.lengths[mirror_head_of(a, hi)];
    if (n == 0) continue;
    const uint64_t* keys = p.keys_out + seg;  // ascending positions in the low 32 bits
    const auto pos = [keys](int32_t i) { return static_cast<int64_t>(keys[i] & 0xffffffffu); };
    const int32_t* by_position = p.values_out + seg;
    int32_t m = n;
    if (a.metric.range == pool_range::evictable_prefix) {  // keys before the recent window
      const int64_t limit = pos(n - 1) + 1 - a.protect.recent;
      int32_t lo = 0, hi2 = n;
      while (lo < hi2) {
        const int32_t mid = (lo + hi2) / 2;
        if (pos(mid) < limit) lo = mid + 1; else hi2 = mid;
      }
      m = lo;
    }
    const int32_t half = a.metric.kernel / 2;
    const float* src = in + row * a.stride;
    float* dst = out + row * a.stride;
    for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
      const int32_t j = by_position[i];
      if (i >= m) {
        dst[j] = src[j] / divisor;
        continue;
      }
      const bool is_max = a.metric.pool == pooling::max;
      float v = is_max ? -INFINITY : 0.f;
      for (int32_t t = max(0, i - half); t <= min(m - 1, i + half); ++t) {
        const float x = src[by_position[t]] / divisor;
        v = is_max ? fmaxf(v, x) : v + x;
      }
      dst[j] = is_max ? v : v / static_cast<float>(a.metric.kernel);
    }
  }
}

//! out = reduction over the group of the per-query-head rows `in` / divisor (reduce_group).
template <kv_element T>
__global__ void group_reduce_kernel(const __grid_constant__ window_params<T> p, const float* in, float* out,
                                    float divisor) {
  const auto& a = p.args;
  const window_layout& l = p.layout;
  const int64_t total = l.heads * a.stride;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < total;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t hi = i / a.stride, j = i - hi * a.stride;
    if (j >= a.pool.lengths[mirror_head_of(a, hi)]) continue;  // nothing was scored there
    float v = 0.f;
    for (int32_t g = 0; g < l.per_row; ++g) {
      const float x = in[(hi * l.per_row + g) * a.stride + j] / divisor;
      v = g == 0 ? x : (a.metric.reduce == gqa_reduce::max ? fmaxf(v, x) : v + x);
    }
    if (a.metric.reduce == gqa_reduce::mean) v /= static_cast<float>(l.per_row);
    out[i] = v;
  }
}

//! window_scores, with the tensor-core passes in `forced` instead of the widest shape that
//! fits the device (tests run each shape a smaller GPU would: the caller checks it fits).
template <kv_element T>
[[nodiscard]] status run_window_scores(const window_score_arguments<T>& a, void* workspace, cudaStream_t stream,
                                       const mma_shape* forced) {
  if (const status s = can_implement(a); s != status::success) return s;
  if (a.batch == 0) return status::success;
  if (!workspace) return status::invalid_argument;
  const window_layout l = window_layout_of(a);
  workspace_carver w(workspace);
  window_params<T> p{a, l, base2_logit_scale(a.pool.head_dim)};
  p.partial = w.take<float>(l.partial);
  p.stats = w.take<float>(l.stats);
  p.agg = w.take<float>(l.agg);
  p.pooled = w.take<float>(l.pooled);
  p.keys_in = w.take<uint64_t>(l.items);
  p.keys_out = w.take<uint64_t>(l.items);
  p.values_in = w.take<int32_t>(l.items);
  p.values_out = w.take<int32_t>(l.items);
  window_math math = window_math::exact;
  mma_shape shape;
  if (const status s = resolve_math<T>(a.math, a.pool.head_dim, math, shape, keys_aligned_16(a.pool));
      s != status::success)
    return s;
  if (forced) shape = *forced;
  if constexpr (std::is_same_v<T, bfloat16>) {  // can_implement refuses tensor_cores for other types
    if (math == window_math::tensor_cores) {
      const status s = shape.keys == 128 ? launch_mma_passes<T, 128>(p, shape, stream)
                                         : launch_mma_passes<T, 64>(p, shape, stream);
      if (s != status::success) return s;
    }
  }
  if (math == window_math::exact)
    if (const status s = launch_exact_passes(p, stream); s != status::success) return s;
  const int32_t et = default_tuning.elementwise.threads;

  // agg holds row sums per query head; the mean over rows divides them (as the CPU does)
  // before pooling and the group reduction, in the metric's order.
  const float divisor = a.metric.aggregation == query_aggregation::mean ? static_cast<float>(a.window) : 1.f;
  const unsigned reduce_grid = grid_for(l.heads * a.stride, et);
  if (!l.pool) {
    group_reduce_kernel<T><<<reduce_grid, et, 0, stream>>>(p, p.agg, a.scores, divisor);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    return status::success;
  }
  const unsigned x = static_cast<unsigned>(ceil_div(a.stride, et) < 64 ? ceil_div(a.stride, et) : 64);
  // Rows stride over grid y, which stops at 65,535.
  const auto rows_grid = [](int64_t rows) { return grid_for(rows, 1, 65535); };
  position_keys_kernel<T><<<dim3(x, rows_grid(l.heads)), et, 0, stream>>>(p);
  KVTRIM_CUDA_TRY(cudaGetLastError());
  const radix_sort_arguments sort{p.keys_in, p.keys_out, p.values_in, p.values_out, l.items,
                                  position_key_end_bit(l.heads)};
  if (const status s = radix_sort(sort, w.take<char>(static_cast<int64_t>(workspace_size(sort))), stream);
      s != status::success)
    return s;
  if (l.after_pool) {  // pool each query head's row, then reduce the group
    pool_kernel<T><<<dim3(x, rows_grid(l.heads * l.per_row)), et, 0, stream>>>(
        p, p.agg, p.pooled, l.per_row, divisor);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    group_reduce_kernel<T><<<reduce_grid, et, 0, stream>>>(p, p.pooled, a.scores, 1.f);
  } else {  // reduce the group, then pool
    group_reduce_kernel<T><<<reduce_grid, et, 0, stream>>>(p, p.agg, p.pooled, divisor);
    KVTRIM_CUDA_TRY(cudaGetLastError());
    pool_kernel<T><<<dim3(x, rows_grid(l.heads)), et, 0, stream>>>(p, p.pooled, a.scores, 1, 1.f);
  }
  KVTRIM_CUDA_TRY(cudaGetLastError());
  return status::success;
}

}  // namespace detail

//! Scores every slot of layers [first_layer, first_layer + layer_count) of the batch into
//! `scores`, on `stream`. Entries past a head's length are left alone.
template <kv_element T>
[[nodiscard]] status window_scores(const window_score_arguments<T>& a, void* workspace, cudaStream_t stream) {
  return detail::run_window_scores(a, workspace, stream, nullptr);
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
