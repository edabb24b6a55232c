#pragma once
//! \file tuning.cuh
//! Launch shapes of the CUDA kernels as constexpr policies (house style rule 3), chosen by a
//! selector that takes the compute capability, as CUB's policy hubs do. One policy is tuned
//! today (measured on sm_90).

#include <cstdint>

#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! Paged decode attention (kernels/paged_attention.cuh).
struct attention_tuning {
  int32_t threads = 128;             //!< threads per CTA (4 warps)
  int32_t ctas_per_sm = 4;           //!< split CTAs resident per SM at most (128 registers a thread)
  int64_t max_ctas = 1024;           //!< flash-decoding split: at most this many CTAs fill the device
                                     //!< (the workspace is sized for it; fewer where the split
                                     //!< kernel's occupancy holds fewer at once: G = 8),
  int32_t min_split_tokens = 64;     //!< each reading at least this many keys of one head
  int32_t max_split_tokens = 4096;   //!< and at most this many
  int32_t max_short_splits = 32;     //!< a head's splits shorter than short_split_tokens are
  int32_t short_split_tokens = 256;  //!< coarsened to at most this many (their merge costs more
                                     //!< than the CTAs gain; paged_attention.cuh)
  int32_t max_group = 8;            //!< largest G = Hq / Hkv held in registers
};

//! Window scores (kernels/window_scores.cuh; the CTA shapes are chosen there). Measured with
//! the exact path and the earlier tensor-core passes (three CTAs per SM in both); the current
//! tensor-core pass 1 holds one CTA per SM at head dim 128 (its pass 2 three), and the split
//! sizes have not been tuned for it on a GPU.
struct window_tuning {
  int64_t target_ctas = 2048;    //!< split each head's keys for about this many CTAs (many
                                 //!< waves: the tail wave stays small),
  int32_t min_split_keys = 256;  //!< each scoring at least this many keys (staging its pair
                                 //!< block costs about as much as scoring one 64-key tile)
  int32_t max_split_keys = 4096; //!< and at most this many
};

//! The compression step (compress_on_device): its window scores and its compaction run over
//! pieces of the batch, one after another, so their workspace follows a piece instead of every
//! layer of every sequence (the ranking between them sees the whole batch: budgets can cross
//! heads and layers).
struct step_tuning {
  //! Slots (heads x stride) of a piece, at least one (sequence, layer); compress_arguments
  //! can set its own. Each extra piece cost 0.25-0.41 ms on an H200 (bm_snapkv_pieces at
  //! d9833f2, B = 8, n = 32k and 128k): about 3% of a piece of this size (window scores take
  //! about 1 ns a slot there), whose window stage holds about 0.6 GB. One layer of each benchmark
  //! shape (up to B = 8, n = 128k: 8.4M slots) is one piece.
  int64_t piece_slots = int64_t{3} << 22;
  //! Heads of a compaction piece at least: a CTA per head scans its slots round after round,
  //! so a launch of few heads leaves most SMs idle.
  int32_t min_compaction_heads = 64;
};

//! Element-wise kernels: append, moves, metadata, gathers, pooling.
struct elementwise_tuning {
  int32_t threads = 256;
};

//! Per-head planning (a CTA per head: budgets, kept flags, compaction scans).
struct planning_tuning {
  int32_t threads = 256;
  int32_t select_threads = 512;  //!< the per-head radix select of kept slots (at least 256)
};

struct tuning_policy {
  attention_tuning attention{};
  window_tuning window{};
  step_tuning step{};
  elementwise_tuning elementwise{};
  planning_tuning planning{};
};

//! The policy for a device of compute capability `major * 10 + minor`. One policy today,
//! measured on sm_90; the exact window-score CTA needs about 100 KiB of shared memory at head
//! dim 128 (sm_80 and newer).
[[nodiscard]] constexpr tuning_policy select_tuning(int32_t /*compute_capability*/) noexcept { return {}; }

//! What the kernels are compiled against (the launch shapes are template-free: one binary).
inline constexpr tuning_policy default_tuning = select_tuning(90);

}  // namespace cuda
KVTRIM_NAMESPACE_END
