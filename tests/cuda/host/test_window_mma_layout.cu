// The tensor-core window passes' shape choice and shared-memory layouts (window_scores.cuh),
// host arithmetic only, so it needs no GPU. ldmatrix and cp.async need 16-byte aligned rows
// and regions; the launch sizes dynamic shared memory with smem_bytes; the host picks the
// widest pass-1 shape a device's opt-in shared memory holds; pass 2 has one shape, which
// must fit every device that runs tensor cores.
#include <catch2/catch.hpp>

#include <cstdint>

#include "kvtrim/cuda.cuh"

namespace {

namespace cu = kvtrim::cuda;
using mma = cu::detail::mma_window;
constexpr auto& all_shapes = cu::detail::mma_shapes;

}  // namespace

TEST_CASE("tensor-core window layout: every region is 16-byte aligned and inside smem_bytes", "[cuda]") {
  for (int32_t d = 8; d <= cu::max_tensor_core_head_dim; d += 8)
    for (const auto& s : all_shapes) {
      CAPTURE(d, s.keys, s.pairs, s.stages);
      CHECK(mma::pitch(d) * 2 % 16 == 0);   // every bf16 row
      CHECK(mma::pitch(d) * 2 % 32 == 16);  // rows four banks apart: ldmatrix without conflicts
      CHECK(mma::padded(d) % 16 == 0);
      CHECK(mma::padded(d) >= d);
      CHECK(mma::term_bytes(d, s.pairs) % 16 == 0);
      CHECK(mma::tile_bytes(d, s.keys) % 16 == 0);
      CHECK(mma::tiles_at(d, s.pairs) == mma::max_terms * mma::term_bytes(d, s.pairs));
      // query positions after the key tiles, key positions after them: int2 reads at even indices
      const int64_t qpos = mma::positions_at(d, s.pairs, s.keys, s.stages), kpos = qpos + s.pairs * 4;
      CHECK(qpos == mma::tiles_at(d, s.pairs) + s.stages * mma::tile_bytes(d, s.keys));
      CHECK(qpos % 16 == 0);
      CHECK(kpos % 16 == 0);
      CHECK(kpos + static_cast<int64_t>(s.stages) * s.keys * 4 == s.smem_bytes(d));
      CHECK(2 * s.pairs <= mma::max_threads);  // pass 1's threads: no more than 128 pairs
      CHECK(s.stages >= 2);
      CHECK(s.stages <= 3);  // cp_async_wait takes 0 or 1 pending groups
    }
}

TEST_CASE("tensor-core window shape: the widest that fits the device's shared memory", "[cuda]") {
  // Opt-in shared memory per block: sm_90 (H100) 227 KiB, sm_80 (A100) 163 KiB, sm_86 / sm_89 99 KiB.
  constexpr int64_t h100 = 232448, a100 = 166912, ada = 101376;
  for (int32_t d = 8; d <= cu::max_tensor_core_head_dim; d += 8) {
    CAPTURE(d);
    const auto on_h100 = cu::detail::mma_shape_for(d, h100);
    CHECK(on_h100.keys == 128);
    CHECK(on_h100.pairs == 128);
    CHECK(on_h100.stages == 3);
    for (const int64_t optin : {h100, a100, ada, int64_t{49152}, int64_t{0}}) {
      const auto s = cu::detail::mma_shape_for(d, optin);
      CAPTURE(optin, s.keys, s.pairs, s.stages);
      if (s.keys == 0) {  // nothing fits: every shape needs more
        for (const auto& t : all_shapes) CHECK(t.smem_bytes(d) > optin);
        continue;
      }
      CHECK(s.smem_bytes(d) <= optin);
      // No wider shape (earlier in the list) fits.
      for (const auto& t : all_shapes) {
        if (t.keys == s.keys && t.pairs == s.pairs && t.stages == s.stages) break;
        CHECK(t.smem_bytes(d) > optin);
      }
    }
  }
  // Head dim 128, the common one, runs on each of these devices.
  CHECK(cu::detail::mma_shape_for(128, a100).keys == 64);
  CHECK(cu::detail::mma_shape_for(128, a100).pairs == 128);
  CHECK(cu::detail::mma_shape_for(128, ada).keys == 64);
  CHECK(cu::detail::mma_shape_for(128, ada).pairs == 64);
  CHECK(cu::detail::mma_shape_for(128, 0).keys == 0);
}

TEST_CASE("tensor-core window pass 2: aligned regions, and it fits every sm_80+ device", "[cuda]") {
  using probs = cu::detail::tensor_core_logits;
  CHECK(probs::threads / 32 * 16 == probs::pairs);  // a warp per 16 pair rows
  CHECK(probs::logit_pitch % 4 == 0);              // float4 reads of the logit tile
  for (int32_t d = 8; d <= cu::max_tensor_core_head_dim; d += 8) {
    CAPTURE(d);
    // The pair block's three terms, then the key tile (which the logit and probability tiles
    // overwrite), then the key and query positions.
    CHECK(probs::q_bytes(d) >= mma::max_terms * mma::term_bytes(d, probs::pairs));
    CHECK(probs::q_bytes(d) % 128 == 0);
    CHECK(probs::tile_bytes(d) >= mma::tile_bytes(d, cu::detail::window_keys));
    CHECK(probs::tile_bytes(d) >= probs::logit_bytes);
    CHECK(probs::tile_bytes(d) >= static_cast<int64_t>(probs::pairs) * cu::detail::prob_pitch * 4);
    CHECK(probs::tile_bytes(d) % 128 == 0);
    CHECK(static_cast<int64_t>(probs::smem_bytes(d)) ==
          probs::q_bytes(d) + probs::tile_bytes(d) + (cu::detail::window_keys + probs::pairs) * 4);
    // The prefetch registers hold the tile's 16-byte chunks.
    CHECK(cu::detail::window_keys * (mma::padded(d) / 8) <=
          probs::key_tile<kvtrim::bfloat16>::max_chunks * probs::threads);
    // The least opt-in shared memory per block of an sm_80+ device: 99 KiB (sm_86, sm_89, sm_120).
    CHECK(probs::smem_bytes(d) <= 101376u);
  }
  // Three CTAs an SM on sm_90 (228 KiB an SM, 1 KiB of it reserved per CTA) at head dim 128.
  CHECK(3 * (probs::smem_bytes(128) + 1024) <= 233472);
}
