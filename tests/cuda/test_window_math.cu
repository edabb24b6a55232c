// The tensor-core window scores (window_math::tensor_cores, bf16x3 MMAs) against the fp32
// path (window_math::exact) score by score, and the default (automatic) against the one it picks. The parity tests compare kept sets with the CPU;
// this one says by how much the scores differ, so a kept-set difference can be told apart
// from a near tie: the two paths compute the same products and differ only in the order of
// the fp32 sums, i.e. by rounding.
#include "parity_support.cuh"

#include <cmath>
#include <cstring>
#include <vector>

namespace {

using namespace kvtrim_test;
namespace kv = kvtrim;
namespace cu = kvtrim::cuda;
using T = kv::bfloat16;

//! Scores are probabilities summed over the window (then pooled): rounding of the logits
//! (about 1e-6 of their size) moves each by a few parts in a million.
constexpr float relative_tolerance = 2e-5f;

//! Scores of both maths for the window metric `metric` on `batch` sequences of a cache.
//! `bf16_queries`: queries that are bf16 values (a bf16 model's), whose low terms are zero, so
//! the tensor-core path takes one MMA per tile instead of three.
//! `shape`: the tensor-core tile shape to run instead of the widest that fits (the automatic
//! math is then not compared: another tile width sums in another order).
void compare_maths(const kv::window_attention& metric, const kv::protected_set& protect, int32_t d, int32_t group,
                   int32_t window, int32_t bs, bool bf16_queries, const cu::detail::mma_shape* shape = nullptr) {
  const kv::attention_shape model{2, 2 * group, 2, d};
  const int32_t n = 300;
  const kv::paged_cache_config config{model, bs, model.layers * model.kv_heads * 2 * (n / bs + 2), 2, n + 8};
  twin_caches<T> c(config);
  std::mt19937 rng(9);
  const std::vector<int64_t> seqs{1, 2};
  std::vector<int32_t> rows;
  for (const int64_t s : seqs) {
    require_ok(c.host.add_sequence(s));
    require_ok(c.device.add_sequence(s));
    c.append(s, 0, n - 7 * static_cast<int32_t>(s), rng);  // heads of different lengths
    rows.push_back(c.device.tables().sequence_slot(s));
  }
  const auto batch = static_cast<int32_t>(seqs.size());
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> queries(static_cast<size_t>(batch) * model.layers * window * model.q_heads * d);
  for (auto& x : queries) x = bf16_queries ? kv::to_float(kv::from_float<T>(dist(rng))) : dist(rng);
  std::vector<int32_t> positions;
  for (const int64_t s : seqs)
    for (int32_t r = 0; r < window; ++r) positions.push_back(n - 7 * static_cast<int32_t>(s) - window + r);
  device_memory drows(rows.size() * sizeof(int32_t)), dq(queries.size() * sizeof(float)),
      dpos(positions.size() * sizeof(int32_t));
  upload(drows, rows);
  upload(dq, queries);
  upload(dpos, positions);

  cu::window_score_arguments<T> a;
  a.pool = cu::make_view(c.device.buffers(), c.config);
  a.rows = drows.as<int32_t>();
  a.batch = batch;
  a.layer_count = model.layers;
  a.q_heads = model.q_heads;
  a.window = window;
  a.queries = dq.as<float>();
  a.query_positions = dpos.as<int32_t>();
  a.metric = metric;
  a.protect = protect;
  a.stride = config.max_tokens_per_head;
  const size_t entries = static_cast<size_t>(batch) * model.layers * model.kv_heads * a.stride;
  device_memory exact(entries * sizeof(float)), tensor(entries * sizeof(float)), automatic(entries * sizeof(float));
  device_memory ws(cu::workspace_size(a));
  REQUIRE(cudaMemset(exact.as<void>(), 0, exact.bytes()) == cudaSuccess);
  REQUIRE(cudaMemset(tensor.as<void>(), 0, tensor.bytes()) == cudaSuccess);
  REQUIRE(cudaMemset(automatic.as<void>(), 0xff, automatic.bytes()) == cudaSuccess);  // NaN: unwritten shows
  a.scores = exact.as<float>();
  a.math = cu::window_math::exact;
  require_ok(cu::window_scores(a, ws.as<void>(), nullptr));
  a.scores = tensor.as<float>();
  a.math = cu::window_math::tensor_cores;
  require_ok(cu::detail::run_window_scores(a, ws.as<void>(), nullptr, shape));
  a.scores = automatic.as<float>();
  a.math = cu::window_math::automatic;  // the default
  require_ok(cu::window_scores(a, ws.as<void>(), nullptr));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);

  const std::vector<float> e = download(exact.as<float>(), entries), t = download(tensor.as<float>(), entries);
  // automatic runs one of the two, bit for bit.
  const bool picked_tensor_cores = cu::resolved_math<T>(cu::window_math::automatic, d) == cu::window_math::tensor_cores;
  const std::vector<float>& picked = picked_tensor_cores ? t : e;
  const std::vector<float> chosen = download(automatic.as<float>(), entries);
  int compared = 0, off = 0, differing = 0;
  float worst = 0.f;
  for (int32_t b = 0; b < batch; ++b)
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        const int32_t len = c.device.head_length(seqs[static_cast<size_t>(b)], l, h);
        const size_t row = ((static_cast<size_t>(b) * model.layers + l) * model.kv_heads + h) * a.stride;
        for (int32_t j = 0; j < len; ++j) {
          differing += !shape && std::memcmp(&picked[row + j], &chosen[row + j], sizeof(float)) != 0 ? 1 : 0;
          const float x = e[row + j], y = t[row + j];
          const float rel = std::fabs(x - y) / std::fmax(std::fabs(x), 1e-30f);
          worst = std::fmax(worst, x == y ? 0.f : rel);
          off += rel <= relative_tolerance || x == y ? 0 : 1;
          ++compared;
        }
      }
  CAPTURE(worst);
  CHECK(compared > 0);
  CHECK(off == 0);
  CHECK(differing == 0);
}

}  // namespace

TEST_CASE("tensor-core window scores equal the fp32 path's to rounding", "[cuda]") {
  const int32_t d = GENERATE(8, 64, 128);
  const int32_t group = GENERATE(1, 4);
  const int32_t bs = GENERATE(1, 16);
  const bool bf16_queries = GENERATE(false, true);
  if (!keep_shape(d, bs, group)) return;
  // racecheck's tier (KVTRIM_QUICK=2) runs each query kind at one head dim: the three-term
  // MMAs at d = 8, the one-term MMAs at d = 128.
  if (quick_level() >= 2 && bf16_queries != (d == 128)) return;
  CAPTURE(d, group, bs, bf16_queries);
  const auto b = kv::token_budget::of_tokens(64);
  SECTION("SnapKV: sum over 8 rows, max pool 7") {
    const auto p = kv::snapkv({.budget = b, .window = 8});
    compare_maths(p.metric, p.protect, d, group, 8, bs, bf16_queries);
  }
  SECTION("PyramidKV: avg pool, 40 rows (pairs over several blocks at G = 4)") {
    const auto p = kv::pyramidkv({.budget = b, .window = 40, .pool = kv::pooling::avg, .kernel = 5});
    compare_maths(p.metric, p.protect, d, group, 40, bs, bf16_queries);
  }
  SECTION("SnapKV: 12 rows, so 8-pair tiles straddle query heads at G = 4") {
    const auto p = kv::snapkv({.budget = b, .window = 12});
    compare_maths(p.metric, p.protect, d, group, 12, bs, bf16_queries);
  }
  SECTION("KV-Compress observation: squared probabilities") {
    const auto p = kv::kv_compress({.budget = b, .block_size = bs, .protected_window = 8});
    compare_maths(p.metric.observation, p.protect, d, group, 8, bs, bf16_queries);
  }
}

TEST_CASE("every tensor-core tile shape that fits the device scores as the fp32 path does", "[cuda]") {
  // The device runs the widest shape that fits (mma_shape_for); smaller GPUs run the others.
  int device = 0, optin = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess);
  const int32_t d = GENERATE(8, 128);
  const int32_t group = GENERATE(1, 4);
  // racecheck's tier (KVTRIM_QUICK=2) keeps to the device's own shape, in the test above.
  if (quick_level() >= 2) return;
  const auto p = kv::pyramidkv({.budget = kv::token_budget::of_tokens(64), .window = 40, .pool = kv::pooling::avg,
                                .kernel = 5});
  int ran = 0;
  for (const cu::detail::mma_shape& shape : cu::detail::mma_shapes) {
    if (shape.smem_bytes(d) > optin) continue;
    CAPTURE(d, group, shape.keys, shape.pairs, shape.stages);
    compare_maths(p.metric, p.protect, d, group, 40, 16, false, &shape);
    ++ran;
  }
  CHECK(ran > 0);
}

TEST_CASE("automatic window math picks tensor cores for bf16 keys where they apply, exact elsewhere", "[cuda]") {
  int device = 0, major = 0, optin = 0;
  REQUIRE(cudaGetDevice(&device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) == cudaSuccess);
  REQUIRE(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device) == cudaSuccess);
  // sm_80 or newer, and the shared memory of a tensor-core shape at that head dim.
  const auto tc = [&](int32_t d) {
    return major >= 8 && cu::detail::mma_shape_for(d, optin).keys > 0 ? cu::window_math::tensor_cores
                                                                       : cu::window_math::exact;
  };
  const auto automatic = cu::window_math::automatic;
  CHECK(cu::resolved_math<kv::bfloat16>(automatic, 8) == tc(8));
  CHECK(cu::resolved_math<kv::bfloat16>(automatic, 128) == tc(128));
  CHECK(cu::resolved_math<kv::bfloat16>(automatic, 12) == cu::window_math::exact);   // not a multiple of 8
  CHECK(cu::resolved_math<kv::bfloat16>(automatic, 256) == cu::window_math::exact);  // above 128
  CHECK(cu::resolved_math<float>(automatic, 128) == cu::window_math::exact);
  CHECK(cu::resolved_math<kv::float16>(automatic, 128) == cu::window_math::exact);
  // Explicit choices are kept as they are.
  CHECK(cu::resolved_math<float>(cu::window_math::exact, 128) == cu::window_math::exact);
  CHECK(cu::resolved_math<kv::bfloat16>(cu::window_math::tensor_cores, 128) == cu::window_math::tensor_cores);
}
