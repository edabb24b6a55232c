// The tensor-core window passes' shape choice and shared-memory layout (window_scores.cuh),
// host arithmetic only, so it needs no GPU. ldmatrix and cp.async need 16-byte aligned rows
// and regions; the launch sizes dynamic shared memory with smem_bytes; the host picks the
// widest shape a device's opt-in shared memory holds.
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
      const int64_t stats = mma::stats_at(d, s.pairs, s.keys, s.stages);
      CHECK(stats == mma::tiles_at(d, s.pairs) + s.stages * mma::tile_bytes(d, s.keys));
      CHECK(stats % 16 == 0);  // float4 reads of two pairs' {max, 1 / denominator}
      // query positions after the stats, key positions after them: int2 reads at even indices
      const int64_t qpos = stats + s.pairs * 8, kpos = qpos + s.pairs * 4;
      CHECK(qpos % 16 == 0);
      CHECK(kpos % 16 == 0);
      CHECK(kpos + static_cast<int64_t>(s.stages) * s.keys * 4 == s.smem_bytes(d));
      CHECK(s.pairs <= mma::max_pairs);
      CHECK(2 * s.pairs <= mma::max_threads);  // pass 1's threads
      CHECK(2 * s.keys <= mma::max_threads);   // pass 2's threads
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
