#pragma once
//! \file tuning.cuh
//! Launch shapes of the CUDA kernels as constexpr policies (house style rule 3), chosen by a
//! selector that takes the compute capability, as CUB's policy hubs do. One policy is tuned
//! today (sm_80 and newer, measured target sm_90); older devices get the same numbers.

#include <cstdint>

#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! Paged decode attention (kernels/paged_attention.cuh).
struct attention_tuning {
  int32_t threads = 128;            //!< threads per CTA (4 warps)
  int32_t tokens_per_split = 512;   //!< keys of one head one CTA reads (flash-decoding split)
  int32_t max_group = 8;            //!< largest G = Hq / Hkv held in registers
};

//! Window scores (kernels/window_scores.cuh).
struct window_tuning {
  int32_t threads = 256;         //!< threads per CTA
  int32_t keys_per_split = 1024; //!< keys of one head one CTA scores
  int32_t query_chunk = 16;      //!< (row, query head) pairs staged in shared memory at once
  int32_t smem_floats = 8192;    //!< fp32 budget of the key tile (32 KiB)
};

//! Element-wise kernels: append, moves, metadata, gathers, pooling.
struct elementwise_tuning {
  int32_t threads = 256;
};

//! Per-head planning (ranking keys, budgets, compaction scans).
struct planning_tuning {
  int32_t threads = 256;
};

struct tuning_policy {
  attention_tuning attention{};
  window_tuning window{};
  elementwise_tuning elementwise{};
  planning_tuning planning{};
};

//! The policy for a device of compute capability `major * 10 + minor`.
[[nodiscard]] constexpr tuning_policy select_tuning(int32_t compute_capability) noexcept {
  tuning_policy p{};
  if (compute_capability < 80) p.window.smem_floats = 4096;  // 48 KiB devices: smaller key tile
  return p;
}

//! What the kernels are compiled against (the launch shapes are template-free: one binary).
inline constexpr tuning_policy default_tuning = select_tuning(90);

}  // namespace cuda
KVTRIM_NAMESPACE_END
