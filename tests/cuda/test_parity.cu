// The CUDA backend against the CPU backend (house style rule 10): decode attention (outputs
// within a stated tolerance, accumulated metrics too; the library's split sizes and a
// caller's) and whole compression steps (kept token
// sets identical), over generated shapes: head dim 8 / 64 / 128, block size 1 / 16,
// G = 1 / 2 / 8 (decode also 4: each compile-time G has its own kernel), fp32 and bf16 storage,
// several seeds.
#include "parity_support.cuh"

#include <cmath>
#include <string>
#include <type_traits>

namespace {

using namespace kvtrim_test;
namespace kv = kvtrim;

//! Outputs and metrics: fp32 accumulation on both sides, different summation order.
constexpr float tolerance = 2e-4f;

bool close(float a, float b) { return std::fabs(a - b) <= tolerance * (1.f + std::fabs(b)); }

//! Random per-head eviction applied to both caches, so heads have different lengths and the
//! mover's compaction runs.
template <kv::kv_element T>
void evict_randomly(twin_caches<T>& c, int64_t seq, std::mt19937& rng) {
  const auto& s = c.config.shape;
  kv::eviction_plan plan(s.layers, s.kv_heads);
  std::vector<int32_t> kept;
  for (int32_t l = 0; l < s.layers; ++l)
    for (int32_t h = 0; h < s.kv_heads; ++h) {
      const int32_t n = c.host.head_length(seq, l, h);
      kept.clear();
      for (int32_t j = 0; j < n; ++j)
        if (j == 0 || std::uniform_int_distribution<int>(0, 2)(rng) != 0) kept.push_back(j);
      plan.set_head(l, h, n, kept);
    }
  require_ok(c.host.apply(seq, plan));
  require_ok(c.device.apply(seq, plan));
}

}  // namespace

namespace {

//! Decode attention of two sequences with randomly evicted heads on both backends: outputs and
//! accumulated metrics within the tolerance. `split_tokens` 0 goes through the device cache's
//! entry point (the library sizes the splits); otherwise through the device-side one, with
//! the caller's split size.
template <kv::kv_element T>
void check_decode(int32_t d, int32_t bs, int32_t group, uint32_t seed, kv::decode_accumulation acc,
                  int32_t split_tokens = 0) {
  const kv::attention_shape shape{2, 2 * group, 2, d};
  const kv::paged_cache_config config{shape, bs, 2 * 2 * 2 * (300 / bs + 2), 2, 300};
  twin_caches<T> c(config);
  std::mt19937 rng(seed);
  const std::vector<int64_t> seqs{7, 9};
  for (const int64_t s : seqs) {
    require_ok(c.host.add_sequence(s));
    require_ok(c.device.add_sequence(s));
    c.append(s, 0, 150 + static_cast<int32_t>(s), rng);
    evict_randomly(c, s, rng);
  }
  for (const int64_t s : seqs)
    for (int32_t l = 0; l < shape.layers; ++l)
      for (int32_t h = 0; h < shape.kv_heads; ++h)
        REQUIRE(twin_caches<T>::kept_positions(c.host, s, l, h) == twin_caches<T>::kept_positions(c.device, s, l, h));

  const int32_t layer = 1;
  const size_t width = static_cast<size_t>(shape.q_heads) * d;
  std::vector<float> q(seqs.size() * width);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (auto& x : q) x = dist(rng);
  std::vector<float> expected(q.size());
  std::vector<float> scratch;
  const auto reduce = kv::gqa_reduce::sum;
  for (size_t b = 0; b < seqs.size(); ++b)
    require_ok(kv::cpu::decode_attention(c.host, seqs[b], layer, shape.q_heads, std::span<const float>(q).subspan(b * width, width),
                                         std::span<float>(expected).subspan(b * width, width), acc, reduce, scratch));

  device_memory dq(q.size() * sizeof(float)), dout(q.size() * sizeof(float));
  upload(dq, q);
  if (split_tokens == 0) {
    device_memory ws(kv::cuda::decode_workspace_size(c.device, static_cast<int32_t>(seqs.size()), shape.q_heads, acc));
    require_ok(kv::cuda::decode_attention(c.device, seqs, layer, shape.q_heads, dq.as<float>(), dout.as<float>(), acc,
                                          reduce, ws.as<void>(), ws.bytes(), nullptr));
  } else {
    std::vector<int32_t> rows;
    for (const int64_t s : seqs) rows.push_back(c.device.tables().sequence_slot(s));
    device_memory drows(rows.size() * sizeof(int32_t));
    upload(drows, rows);
    kv::cuda::decode_arguments<T> a;
    a.pool = kv::cuda::make_view(c.device.buffers(), c.config);
    a.rows = drows.as<int32_t>();
    a.batch = static_cast<int32_t>(seqs.size());
    a.layer = layer;
    a.q_heads = shape.q_heads;
    a.max_length = config.max_tokens_per_head;
    a.q = dq.as<float>();
    a.out = dout.as<float>();
    a.accumulate = acc;
    a.reduce = reduce;
    a.split_tokens = split_tokens;
    device_memory ws(kv::cuda::workspace_size(a));
    require_ok(kv::cuda::decode_attention(a, ws.as<void>(), nullptr));
  }
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  const std::vector<float> got = download(dout.as<float>(), q.size());
  int bad = 0;
  for (size_t i = 0; i < got.size(); ++i) bad += close(got[i], expected[i]) ? 0 : 1;
  CHECK(bad == 0);

  // Accumulated metrics of every head of the layer.
  for (const int64_t s : seqs)
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      const int32_t n = c.host.head_length(s, layer, h);
      std::vector<int32_t> p1(n), p2(n);
      std::vector<float> k1(static_cast<size_t>(n) * d), k2(k1.size()), m1(n), m2(n);
      require_ok(c.host.read_head(s, layer, h, p1, k1, m1));
      require_ok(c.device.read_head(s, layer, h, p2, k2, m2));
      CHECK(p1 == p2);
      CHECK(k1 == k2);
      int mismatched = 0;
      for (int32_t j = 0; j < n; ++j) mismatched += close(m2[j], m1[j]) ? 0 : 1;
      CHECK(mismatched == 0);
    }
}

}  // namespace

TEMPLATE_TEST_CASE("paged decode attention matches the CPU backend", "[cuda]", float, kv::bfloat16) {
  const int32_t d = GENERATE(8, 64, 128);
  const int32_t bs = GENERATE(1, 16);
  const int32_t group = GENERATE(1, 2, 4, 8);
  if (!keep_shape(d, bs, group)) return;
  const uint32_t seed = GENERATE(take(quick() ? 1 : 2, values({1u, 2u})));
  const auto acc = GENERATE(kv::decode_accumulation::none, kv::decode_accumulation::sum, kv::decode_accumulation::squared_sum);
  CAPTURE(d, bs, group, seed, static_cast<int>(acc));
  check_decode<TestType>(d, bs, group, seed, acc);
}

TEMPLATE_TEST_CASE("paged decode attention with the caller's split size matches the CPU backend", "[cuda]", float,
                   kv::bfloat16) {
  // 32-key splits (many partials to merge), one not a power of two, and one longer than any head.
  const int32_t split = GENERATE(32, 96, 4096);
  const int32_t d = GENERATE(8, 128);
  const auto acc = GENERATE(kv::decode_accumulation::none, kv::decode_accumulation::sum);
  CAPTURE(split, d, static_cast<int>(acc));
  check_decode<TestType>(d, 16, 4, 3, acc, split);
}

namespace {

//! The heads of a compression test: sequence s holds `copies` copies of positions
//! [0, tokens / copies - s), one after another (with two, every rank key is held twice and
//! the lower slot of a tied pair must be the one kept).
struct heads_of {
  int32_t tokens = 200;
  int32_t copies = 1;
  int32_t max_tokens = 0;  //!< the cache's max_tokens_per_head, the step's stride (0: tokens + 8)
  int64_t piece_slots = 0;  //!< the step's piece size (0: the library's)
};

//! Runs `policy` on both caches and compares the kept tokens (position and key) of every head.
template <class P, kv::kv_element T>
void check_compression(const P& policy, const kv::attention_shape& model, int32_t bs, uint32_t seed, int32_t rows,
                       kv::cuda::window_math math, heads_of heads = {}) {
  const int32_t n = heads.tokens;
  const kv::paged_cache_config config{{model.layers, model.q_heads, policy.metric.stored_heads(model), model.head_dim},
                                      bs, model.layers * policy.metric.stored_heads(model) * 2 * (n / bs + 2), 2,
                                      heads.max_tokens > 0 ? heads.max_tokens : n + 8};
  twin_caches<T> c(config);
  std::mt19937 rng(seed);
  const std::vector<int64_t> seqs{3, 5};
  std::vector<int32_t> span;  // positions of each sequence: [0, span)
  for (const int64_t s : seqs) {
    require_ok(c.host.add_sequence(s));
    require_ok(c.device.add_sequence(s));
    span.push_back(n / heads.copies - static_cast<int32_t>(s));
    for (int32_t copy = 0; copy < heads.copies; ++copy) c.append(s, 0, span.back(), rng);
  }
  // Window queries: the last `rows` positions of each sequence.
  const size_t per_seq = static_cast<size_t>(model.layers) * rows * model.q_heads * model.head_dim;
  std::vector<float> queries(seqs.size() * per_seq);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (auto& x : queries) x = dist(rng);
  std::vector<int32_t> positions(seqs.size() * static_cast<size_t>(rows));
  for (size_t b = 0; b < seqs.size(); ++b)
    for (int32_t r = 0; r < rows; ++r) positions[b * rows + r] = span[b] - rows + r;

  for (size_t b = 0; b < seqs.size(); ++b) {
    const kv::cpu::observation obs{std::span<const float>(queries).subspan(b * per_seq, per_seq),
                                   std::span<const int32_t>(positions).subspan(b * rows, static_cast<size_t>(rows))};
    require_ok(kv::cpu::compress(policy, c.host, seqs[b], model, obs));
  }
  device_memory dq(queries.size() * sizeof(float)), dp(positions.size() * sizeof(int32_t));
  upload(dq, queries);
  upload(dp, positions);
  const kv::cuda::device_observation obs{dq.as<float>(), dp.as<int32_t>(), rows};
  device_memory ws(kv::cuda::compress_workspace_size(policy, c.device, model, static_cast<int32_t>(seqs.size()), rows,
                                                     heads.piece_slots));
  require_ok(kv::cuda::compress(policy, c.device, seqs, model, obs, ws.as<void>(), ws.bytes(), nullptr, math,
                                heads.piece_slots));

  for (const int64_t s : seqs)
    for (int32_t l = 0; l < config.shape.layers; ++l)
      for (int32_t h = 0; h < config.shape.kv_heads; ++h) {
        CAPTURE(s, l, h);
        CHECK(twin_caches<T>::kept_tokens(c.host, s, l, h) == twin_caches<T>::kept_tokens(c.device, s, l, h));
      }
  CHECK(c.host.pool() == c.device.pool());
}

}  // namespace

// Both window maths: the bf16x3 tensor-core window scores (bf16 keys only) must keep the same
// tokens as the fp32 path.
TEMPLATE_TEST_CASE("compression on the device keeps the CPU backend's tokens", "[cuda]", float, kv::bfloat16) {
  const int32_t d = GENERATE(8, 64, 128);
  const int32_t bs = GENERATE(1, 16);
  const int32_t group = GENERATE(1, 2, 8);
  if (!keep_shape(d, bs, group)) return;
  const uint32_t seed = GENERATE(take(quick() ? 1 : 2, values({11u, 12u})));
  const auto math = GENERATE(kv::cuda::window_math::exact, kv::cuda::window_math::tensor_cores);
  if (math == kv::cuda::window_math::tensor_cores && !std::is_same_v<TestType, kv::bfloat16>) return;
  CAPTURE(d, bs, group, seed, static_cast<int>(math));
  const kv::attention_shape model{2, 2 * group, 2, d};
  SECTION("StreamingLLM") {
    check_compression<kv::streaming_llm_policy, TestType>(
        kv::streaming_llm({.budget = kv::token_budget::of_tokens(40), .sinks = 4}), model, bs, seed, 4, math);
  }
  SECTION("SnapKV, max pool 7") {
    check_compression<kv::snapkv_policy, TestType>(
        kv::snapkv({.budget = kv::token_budget::of_tokens(64), .window = 8}), model, bs, seed, 8, math);
  }
  SECTION("SnapKV, avg pool 5, reduce after pooling per query head") {
    auto p = kv::snapkv({.budget = kv::token_budget::of_tokens(64), .window = 8, .pool = kv::pooling::avg, .kernel = 5});
    p.metric.reduce = kv::gqa_reduce::max;
    p.metric.order = kv::reduce_order::after_pool;
    check_compression<kv::snapkv_policy, TestType>(p, model, bs, seed, 8, math);
  }
  SECTION("SnapKV, window 40 (at G = 8 the 320 query pairs span three blocks of 128)") {
    check_compression<kv::snapkv_policy, TestType>(
        kv::snapkv({.budget = kv::token_budget::of_tokens(64), .window = 40}), model, bs, seed, 40, math);
  }
  SECTION("Ada-KV") {
    check_compression<kv::ada_snapkv_policy, TestType>(
        kv::ada_kv({.budget = kv::token_budget::of_tokens(64), .window = 8}), model, bs, seed, 8, math);
  }
  SECTION("PyramidKV") {
    check_compression<kv::pyramidkv_policy, TestType>(
        kv::pyramidkv({.budget = kv::token_budget::of_tokens(64), .window = 8}), model, bs, seed, 8, math);
  }
  // Budget variants whose kernels the sections above launch too: racecheck's tier skips them.
  const bool budget_variants = quick_level() < 2;
  SECTION("PyramidKV, real form (kvpress)") {
    if (budget_variants)
      check_compression<kv::pyramidkv_policy, TestType>(
          kv::pyramidkv({.budget = kv::token_budget::of_ratio(0.3f), .window = 8, .form = kv::pyramid_form::real}),
          model, bs, seed, 8, math);
  }
  SECTION("PyramidKV, the frozen pyramid of a 512-token prompt (layer 0 keeps all, layer 1 14)") {
    if (budget_variants)
      check_compression<kv::pyramidkv_policy, TestType>(
          kv::pyramidkv({.budget = kv::token_budget::of_tokens(128), .window = 8, .context = 512}), model, bs, seed, 8,
          math);
  }
  SECTION("Ada-PyramidKV") {
    if (budget_variants)
      check_compression<kv::ada_pyramidkv_policy, TestType>(
          kv::ada_pyramidkv({.budget = kv::token_budget::of_tokens(64), .window = 8}), model, bs, seed, 8, math);
  }
  SECTION("Ada-PyramidKV, the frozen pyramid of a 512-token prompt") {
    auto p = kv::ada_pyramidkv({.budget = kv::token_budget::of_tokens(128), .window = 8});
    p.allocator.base.context = 512;
    if (budget_variants) check_compression<kv::ada_pyramidkv_policy, TestType>(p, model, bs, seed, 8, math);
  }
  SECTION("KV-Compress") {
    check_compression<kv::kv_compress_policy, TestType>(
        kv::kv_compress({.budget = kv::token_budget::of_tokens(64), .block_size = bs, .protected_window = 8}), model, bs,
        seed, 8, math);
  }
  SECTION("KV-Compress, nothing protected (every head keeps at least one token)") {
    check_compression<kv::kv_compress_policy, TestType>(
        kv::kv_compress({.budget = kv::token_budget::of_tokens(16), .block_size = bs, .protected_window = 0}), model, bs,
        seed, 8, math);
  }
  SECTION("H2O (prefill observation)") {
    check_compression<kv::h2o_policy, TestType>(kv::h2o({.budget = kv::token_budget::of_tokens(48), .recent = 8}), model,
                                                bs, seed, 8, math);
  }
}

// Heads longer than one round of the per-slot ranking, select and compaction kernels, and heads
// that hold every position twice: equal rank keys, of which the lower slot is kept (CPU rule,
// plan/tie_break.hpp). The budgets cut inside a tied pair.
TEMPLATE_TEST_CASE("compression on the device keeps the CPU backend's tokens on long heads and repeated positions",
                   "[cuda]", float, kv::bfloat16) {
  const int32_t bs = GENERATE(1, 16);
  if (quick_level() >= 2 && bs != 16) return;  // racecheck's tier (keep_shape)
  const uint32_t seed = GENERATE(take(quick() ? 1 : 2, values({21u, 22u})));
  CAPTURE(bs, seed);
  const kv::attention_shape model{2, 4, 2, 8};
  const auto math = kv::cuda::window_math::automatic;
  const bool long_heads = quick_level() < 2;  // racecheck's tier: the short case only
  SECTION("StreamingLLM, every position twice (8 sinks, 33 of the rest kept)") {
    check_compression<kv::streaming_llm_policy, TestType>(
        kv::streaming_llm({.budget = kv::token_budget::of_tokens(41), .sinks = 4}), model, bs, seed, 4, math, {200, 2});
  }
  SECTION("StreamingLLM, 5000 tokens, every position twice") {
    if (long_heads)
      check_compression<kv::streaming_llm_policy, TestType>(
          kv::streaming_llm({.budget = kv::token_budget::of_tokens(1001), .sinks = 4}), model, bs, seed, 4, math,
          {5000, 2});
  }
  SECTION("SnapKV, 5000 tokens") {
    if (long_heads)
      check_compression<kv::snapkv_policy, TestType>(
          kv::snapkv({.budget = kv::token_budget::of_tokens(1000), .window = 8}), model, bs, seed, 8, math, {5000, 1});
  }
  SECTION("PyramidKV, 5000 tokens") {
    if (long_heads)
      check_compression<kv::pyramidkv_policy, TestType>(
          kv::pyramidkv({.budget = kv::token_budget::of_tokens(1000), .window = 8}), model, bs, seed, 8, math,
          {5000, 1});
  }
  SECTION("Ada-KV, 5000 tokens") {
    if (long_heads)
      check_compression<kv::ada_snapkv_policy, TestType>(
          kv::ada_kv({.budget = kv::token_budget::of_tokens(1000), .window = 8}), model, bs, seed, 8, math, {5000, 1});
  }
}

// A step larger than a piece: 80 heads (2 sequences x 5 layers x 8 KV heads) in pieces of
// 2^16 slots, whose stride (the cache's max_tokens_per_head, not the tokens held) sets the
// pieces. The window scores run as whole sequences (1,250 slots a head: 2 pieces), runs of 2,
// 2 and 1 layers of one sequence (3,125: 6 pieces) or single layers (18,750: 10 pieces); the
// compaction in 2 pieces of 40 heads; one ranking of the whole batch between them.
TEMPLATE_TEST_CASE("compression on the device keeps the CPU backend's tokens when the step runs in pieces", "[cuda]",
                   float, kv::bfloat16) {
  if (quick_level() >= 2) return;  // racecheck's tier: the kernels of the tests above, launched more often
  const int32_t max_tokens = GENERATE(1250, 3125, 18750);
  const auto math = GENERATE(kv::cuda::window_math::exact, kv::cuda::window_math::tensor_cores);
  if (math == kv::cuda::window_math::tensor_cores && !std::is_same_v<TestType, kv::bfloat16>) return;
  CAPTURE(max_tokens, static_cast<int>(math));
  const kv::attention_shape model{5, 16, 8, 64};
  const int32_t heads = 2 * model.layers * model.kv_heads;
  const int64_t piece_slots = int64_t{1} << 16;
  REQUIRE(kv::cuda::detail::piece_pairs(model.kv_heads, max_tokens, piece_slots) < 2 * model.layers);
  REQUIRE(kv::cuda::detail::compaction_pieces(heads, max_tokens, piece_slots).count == 2);
  const heads_of lengths{200, 1, max_tokens, piece_slots};
  SECTION("SnapKV") {
    check_compression<kv::snapkv_policy, TestType>(
        kv::snapkv({.budget = kv::token_budget::of_tokens(64), .window = 8}), model, 16, 31, 8, math, lengths);
  }
  SECTION("Ada-KV") {
    check_compression<kv::ada_snapkv_policy, TestType>(
        kv::ada_kv({.budget = kv::token_budget::of_tokens(64), .window = 8}), model, 16, 32, 8, math, lengths);
  }
  SECTION("KV-Compress (a budget across layers)") {
    check_compression<kv::kv_compress_policy, TestType>(
        kv::kv_compress({.budget = kv::token_budget::of_tokens(64), .block_size = 16, .protected_window = 8}), model,
        16, 33, 8, math, lengths);
  }
}

// What docs/cuda.md tells an engine to do with a policy the device does not implement (here
// Ada-KV with KVCache-Factory's normalisation): plan on the CPU over the device cache, whose
// heads the planner reads through the mover, then apply the plan on the device.
TEMPLATE_TEST_CASE("a policy the device does not run is planned on the CPU and applied on the device", "[cuda]", float,
                   kv::bfloat16) {
  const int32_t bs = GENERATE(1, 16);
  if (quick_level() >= 2 && bs != 16) return;  // racecheck's tier (keep_shape)
  CAPTURE(bs);
  const kv::attention_shape model{2, 4, 2, 8};
  const auto policy = kv::ada_kv({.budget = kv::token_budget::of_tokens(48), .window = 8, .normalize = true});
  REQUIRE(kv::cuda::supports<TestType>(policy, model) == status::not_supported);
  const int32_t n = 150, rows = 8;
  const kv::paged_cache_config config{model, bs, model.layers * model.kv_heads * (n / bs + 2), 1, n};
  twin_caches<TestType> c(config);
  std::mt19937 rng(31);
  const int64_t seq = 4;
  require_ok(c.host.add_sequence(seq));
  require_ok(c.device.add_sequence(seq));
  c.append(seq, 0, n, rng);
  std::vector<float> queries(static_cast<size_t>(model.layers) * rows * model.q_heads * model.head_dim);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (auto& x : queries) x = dist(rng);
  std::vector<int32_t> positions;
  for (int32_t r = 0; r < rows; ++r) positions.push_back(n - rows + r);
  const kv::cpu::observation obs{queries, positions};

  require_ok(kv::cpu::compress(policy, c.host, seq, model, obs));
  kv::cpu::compression_result planned;
  require_ok(kv::cpu::plan(policy, c.device, seq, model, obs, 0, model.layers, planned));
  require_ok(c.device.apply(seq, planned.plan));
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(l, h);
      CHECK(c.host.head_length(seq, l, h) < n);  // it did compress
      CHECK(twin_caches<TestType>::kept_tokens(c.host, seq, l, h) == twin_caches<TestType>::kept_tokens(c.device, seq, l, h));
    }
  CHECK(c.host.pool() == c.device.pool());
}

// Ada-KV on heads an earlier compression left unequal (the streaming case): head 0 of each
// layer holds every third token, fewer candidates than its base, head 1 all of them; the layer
// still holds more than its total, so the heads share it by score (adaptive_budget's rule).
TEMPLATE_TEST_CASE("Ada-KV on the device shares a layer between heads of different lengths as the CPU does", "[cuda]",
                   float, kv::bfloat16) {
  const int32_t bs = GENERATE(1, 16);
  if (quick_level() >= 2 && bs != 16) return;  // racecheck's tier (keep_shape)
  const uint32_t seed = GENERATE(take(quick() ? 1 : 2, values({41u, 42u})));
  CAPTURE(bs, seed);
  const kv::attention_shape model{2, 4, 2, 8};
  const int32_t n = 150, rows = 8;
  const kv::paged_cache_config config{model, bs, model.layers * model.kv_heads * (n / bs + 2), 1, n};
  twin_caches<TestType> c(config);
  std::mt19937 rng(seed);
  const int64_t seq = 6;
  require_ok(c.host.add_sequence(seq));
  require_ok(c.device.add_sequence(seq));
  c.append(seq, 0, n, rng);
  kv::eviction_plan thinned(model.layers, model.kv_heads);
  std::vector<int32_t> every_third, all;
  for (int32_t j = 0; j < n; ++j) {
    all.push_back(j);
    if (j % 3 == 0) every_third.push_back(j);
  }
  for (int32_t l = 0; l < model.layers; ++l) {
    thinned.set_head(l, 0, n, every_third);
    thinned.set_head(l, 1, n, all);
  }
  require_ok(c.host.apply(seq, thinned));
  require_ok(c.device.apply(seq, thinned));

  // Bases C - P: head 0's 48 candidates (2 of its tokens are in the window) are fewer than its
  // base of 62; the layer's 190 are more than its 118. The CPU keeps 50 + 75 (the old per-head
  // rule: 50 + 64).
  const auto policy = kv::ada_kv({.budget = kv::token_budget::of_tokens(64), .window = rows});
  std::vector<float> queries(static_cast<size_t>(model.layers) * rows * model.q_heads * model.head_dim);
  std::normal_distribution<float> dist(0.f, 1.f);
  for (auto& x : queries) x = dist(rng);
  std::vector<int32_t> positions;
  for (int32_t r = 0; r < rows; ++r) positions.push_back(n - rows + r);
  require_ok(kv::cpu::compress(policy, c.host, seq, model, {queries, positions}));
  device_memory dq(queries.size() * sizeof(float)), dp(positions.size() * sizeof(int32_t));
  upload(dq, queries);
  upload(dp, positions);
  const kv::cuda::device_observation obs{dq.as<float>(), dp.as<int32_t>(), rows};
  const std::vector<int64_t> seqs{seq};
  device_memory ws(kv::cuda::compress_workspace_size(policy, c.device, model, 1, rows));
  require_ok(kv::cuda::compress(policy, c.device, seqs, model, obs, ws.as<void>(), ws.bytes(), nullptr));
  for (int32_t l = 0; l < model.layers; ++l) {
    CAPTURE(l);
    // Head 1 is cut below its 150 tokens and the layer to about its total of 128.
    CHECK(c.host.head_length(seq, l, 1) < n);
    CHECK(c.host.head_length(seq, l, 0) + c.host.head_length(seq, l, 1) <= 128 + 2);
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(h);
      CHECK(twin_caches<TestType>::kept_tokens(c.host, seq, l, h) == twin_caches<TestType>::kept_tokens(c.device, seq, l, h));
    }
  }
  CHECK(c.host.pool() == c.device.pool());
}
