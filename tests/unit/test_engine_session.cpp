// The engine-shaped loop (design.md "What the engine calls") through compression_session:
// append -> compress after prefill -> decode steps with scheduled eviction -> free.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::gaussian;
using paged_fixtures::iota_positions;

namespace {
const attention_shape model{2, 4, 2, 8};
constexpr int32_t prompt = 40, window = 4, steps = 6;
const paged_cache_config config{model, 4, 128, 2, 64};

auto presets(int32_t c) {
  const token_budget b = token_budget::of_tokens(c);
  return std::make_tuple(streaming_llm({.budget = b, .sinks = 2}), h2o({.budget = b, .recent = window}),
                         snapkv({.budget = b, .window = window}), pyramidkv({.budget = b, .window = window}),
                         ada_kv({.budget = b, .window = window}),
                         kv_compress({.budget = b, .block_size = 4, .protected_window = window + 1}));
}
constexpr const char* preset_names[] = {"streaming_llm", "h2o", "snapkv", "pyramidkv", "ada_kv", "kv_compress"};

//! The engine's side of one sequence: its prompt and its decode tokens, generated up front.
struct engine_inputs {
  std::vector<float> k, v;           // [L][prompt][H][d]
  std::vector<float> window_queries; // [L][window][Hq][d]
  std::vector<float> step_k, step_v; // [steps][L][H][d]
  std::vector<float> step_q;         // [steps][L][Hq][d]

  explicit engine_inputs(uint32_t seed) {
    std::mt19937 rng(seed);
    const size_t width = static_cast<size_t>(model.kv_heads) * model.head_dim, q = static_cast<size_t>(model.q_heads) * model.head_dim;
    k = gaussian(rng, static_cast<size_t>(model.layers) * prompt * width);
    v = gaussian(rng, k.size());
    window_queries = gaussian(rng, static_cast<size_t>(model.layers) * window * q, 2.f);
    step_k = gaussian(rng, static_cast<size_t>(steps) * model.layers * width);
    step_v = gaussian(rng, step_k.size());
    step_q = gaussian(rng, static_cast<size_t>(steps) * model.layers * q, 2.f);
  }
};

//! The loop an engine runs for one sequence; `out` collects every attention output.
template <class Session>
void run_sequence(Session& s, int64_t seq, const engine_inputs& in, std::vector<float>& out, int32_t& compressions) {
  REQUIRE(s.append(seq, iota_positions(0, prompt), in.k, in.v) == status::success);
  REQUIRE(s.finish_prefill(seq, {in.window_queries, iota_positions(prompt - window, window)}) == status::success);
  const size_t width = static_cast<size_t>(model.kv_heads) * model.head_dim, q = static_cast<size_t>(model.q_heads) * model.head_dim;
  std::vector<float> o(q);
  for (int32_t step = 0; step < steps; ++step) {
    const std::vector<int32_t> at{prompt + step};
    for (int32_t l = 0; l < model.layers; ++l) {
      const size_t row = static_cast<size_t>(step) * model.layers + l;
      REQUIRE(s.append(seq, l, at, std::span<const float>(in.step_k).subspan(row * width, width),
                       std::span<const float>(in.step_v).subspan(row * width, width)) == status::success);
      REQUIRE(s.attend(seq, l, std::span<const float>(in.step_q).subspan(row * q, q), o) == status::success);
      out.insert(out.end(), o.begin(), o.end());
    }
    bool compressed = false;
    REQUIRE(s.end_decode_step(seq, compressed) == status::success);
    compressions += compressed ? 1 : 0;
  }
}

//! The same loop by hand on the dense reference cache.
template <class Policy>
void run_reference(dense_cache& ref, const Policy& p, const engine_inputs& in, std::vector<float>& out) {
  paged_fixtures::append_dense(ref, 0, iota_positions(0, prompt), in.k, in.v);
  REQUIRE(cpu::compress(p, ref, 0, model, {in.window_queries, iota_positions(prompt - window, window)}) == status::success);
  const size_t width = static_cast<size_t>(model.kv_heads) * model.head_dim, q = static_cast<size_t>(model.q_heads) * model.head_dim;
  std::vector<float> o(q), scratch;
  for (int32_t step = 0; step < steps; ++step) {
    for (int32_t l = 0; l < model.layers; ++l) {
      const size_t row = static_cast<size_t>(step) * model.layers + l;
      REQUIRE(ref.append(0, l, prompt + step, std::span<const float>(in.step_k).subspan(row * width, width),
                         std::span<const float>(in.step_v).subspan(row * width, width)) == status::success);
      REQUIRE(cpu::decode_attention(ref, 0, l, model.q_heads, std::span<const float>(in.step_q).subspan(row * q, q), o,
                                    p.metric.decode(), decode_reduce(p.metric), scratch) == status::success);
      out.insert(out.end(), o.begin(), o.end());
    }
    if (p.schedule.after_decode_step(step + 1)) REQUIRE(cpu::compress(p, ref, 0, model, {}) == status::success);
  }
}
}  // namespace

TEST_CASE("the engine loop runs every preset on the paged cache and frees its memory", "[cpu][cache][engine]") {
  std::apply([&](const auto&... policies) {
    size_t i = 0;
    (
        [&](const auto& p) {
          const char* preset = preset_names[i++];
          CAPTURE(preset);
          auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
          compression_session session(cache, model, p);
          const engine_inputs in(5);
          REQUIRE(session.add_sequence(3) == status::success);
          std::vector<float> out, expected;
          int32_t compressions = 0;
          run_sequence(session, 3, in, out, compressions);
          CHECK(session.decode_steps(3) == steps);
          CHECK(compressions == (p.schedule.when == compression_schedule::kind::every_step ? steps : 0));
          dense_cache ref(model, 1, 64);
          run_reference(ref, p, in, expected);
          CHECK(out == expected);
          // The cache holds what the reference holds; the pool holds what the heads use.
          for (int32_t l = 0; l < model.layers; ++l)
            for (int32_t h = 0; h < model.kv_heads; ++h) {
              CHECK(cache.head_length(3, l, h) == ref.head_length(0, l, h));
              CHECK(cache.head_length(3, l, h) < prompt);
            }
          CHECK(cache.pool().used_blocks == cache.usage(3).blocks);
          REQUIRE(session.free_sequence(3) == status::success);
          CHECK(cache.pool().used_blocks == 0);
          CHECK_FALSE(session.contains(3));
          CHECK(cache_invariants::check_tables(cache.tables()).empty());
        }(policies),
        ...);
  }, presets(12));
}

TEST_CASE("sequences with their own budgets share one pool through the session", "[cpu][cache][engine]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  compression_session session(cache, model, snapkv({.budget = token_budget::of_tokens(10), .window = window}));
  REQUIRE(session.add_sequence(0) == status::success);
  REQUIRE(session.add_sequence(1, snapkv({.budget = token_budget::of_tokens(20), .window = window})) == status::success);
  const engine_inputs a(1), b(2);
  std::vector<float> out;
  int32_t compressions = 0;
  run_sequence(session, 0, a, out, compressions);
  run_sequence(session, 1, b, out, compressions);
  CHECK(cache.head_length(0, 1, 1) == 10 + steps);
  CHECK(cache.head_length(1, 1, 1) == 20 + steps);
  CHECK(cache.pool().used_blocks == cache.usage(0).blocks + cache.usage(1).blocks);
  REQUIRE(session.free_sequence(0) == status::success);
  CHECK(cache.pool().used_blocks == cache.usage(1).blocks);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("the engine loop runs on a dense view, and free empties the row", "[cpu][cache][engine]") {
  paged_fixtures::engine_buffers<float> buffers(model, 2, 64);
  const auto layers = buffers.layers();
  dense_view<float> view;
  REQUIRE(dense_view<float>::create(model, 2, 64, layers, view) == status::success);
  const auto p = h2o({.budget = token_budget::of_tokens(12), .recent = window});
  compression_session session(view, model, p);
  REQUIRE(session.add_sequence(1) == status::success);
  const engine_inputs in(8);
  std::vector<float> out, expected;
  int32_t compressions = 0;
  run_sequence(session, 1, in, out, compressions);
  dense_cache ref(model, 1, 64);
  run_reference(ref, p, in, expected);
  CHECK(out == expected);
  CHECK(view.head_length(1, 0, 0) == 12);
  REQUIRE(session.free_sequence(1) == status::success);
  CHECK(view.head_length(1, 0, 0) == 0);
}

TEST_CASE("session bad input: a policy that does not validate", "[cpu][cache][engine][bad-input]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  compression_session session(cache, model, snapkv({.budget = token_budget::of_tokens(0), .window = window}));
  CHECK(session.add_sequence(0) == status::invalid_budget);
  CHECK_FALSE(cache.contains(0));
  CHECK_FALSE(session.contains(0));
}

TEST_CASE("session bad input: a sequence added twice", "[cpu][cache][engine][bad-input]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  compression_session session(cache, model, snapkv({.budget = token_budget::of_tokens(8), .window = window}));
  REQUIRE(session.add_sequence(0) == status::success);
  CHECK(session.add_sequence(0) == status::invalid_argument);
}

TEST_CASE("session bad input: more sequences than the paged cache has rows", "[cpu][cache][engine][bad-input]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  compression_session session(cache, model, snapkv({.budget = token_budget::of_tokens(8), .window = window}));
  REQUIRE(session.add_sequence(0) == status::success);
  REQUIRE(session.add_sequence(1) == status::success);
  CHECK(session.add_sequence(2) == status::pool_exhausted);
  CHECK_FALSE(session.contains(2));
}

TEST_CASE("session bad input: a dense row outside the batch", "[cpu][cache][engine][bad-input]") {
  paged_fixtures::engine_buffers<float> buffers(model, 1, 16);
  const auto layers = buffers.layers();
  dense_view<float> view;
  REQUIRE(dense_view<float>::create(model, 1, 16, layers, view) == status::success);
  compression_session session(view, model, snapkv({.budget = token_budget::of_tokens(8), .window = window}));
  CHECK(session.add_sequence(1) == status::unknown_sequence);
  CHECK_FALSE(session.contains(1));
}

TEST_CASE("session bad input: every call on an unknown sequence", "[cpu][cache][engine][bad-input]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  REQUIRE(cache.add_sequence(4) == status::success);  // in the store, but not in the session
  compression_session session(cache, model, snapkv({.budget = token_budget::of_tokens(8), .window = window}));
  const std::vector<float> kv(static_cast<size_t>(model.kv_heads) * model.head_dim, 0.f), q(32, 0.f);
  std::vector<float> out(32);
  bool compressed = true;
  CHECK(session.append(4, 0, iota_positions(0, 1), kv, kv) == status::unknown_sequence);
  CHECK(session.append(4, iota_positions(0, 1), kv, kv) == status::unknown_sequence);
  CHECK(session.finish_prefill(4, {}) == status::unknown_sequence);
  CHECK(session.compress(4, {}) == status::unknown_sequence);
  CHECK(session.attend(4, 0, q, out) == status::unknown_sequence);
  CHECK(session.end_decode_step(4, compressed) == status::unknown_sequence);
  CHECK_FALSE(compressed);
  CHECK(session.free_sequence(4) == status::unknown_sequence);
  CHECK(session.decode_steps(4) == -1);
  CHECK(cache.head_length(4, 0, 0) == 0);
}

TEST_CASE("session bad input: a scheduled compression that fails does not count the step",
          "[cpu][cache][engine][bad-input]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  auto p = snapkv({.budget = token_budget::of_tokens(8), .window = window});
  p.schedule.when = compression_schedule::kind::every_step;  // window attention, but no queries observed
  compression_session session(cache, model, p);
  REQUIRE(session.add_sequence(0) == status::success);
  const engine_inputs in(3);
  REQUIRE(session.append(0, iota_positions(0, prompt), in.k, in.v) == status::success);
  bool compressed = true;
  CHECK(session.end_decode_step(0, compressed) == status::window_too_large);
  CHECK_FALSE(compressed);
  CHECK(session.decode_steps(0) == 0);
  CHECK(cache.head_length(0, 0, 0) == prompt);
}

TEST_CASE("compress evicts now, whatever the schedule, and keeps the step count", "[cpu][cache][engine]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  compression_session session(cache, model, streaming_llm({.budget = token_budget::of_tokens(10), .sinks = 2}));
  REQUIRE(session.add_sequence(0) == status::success);
  const engine_inputs in(5);
  REQUIRE(session.append(0, iota_positions(0, prompt), in.k, in.v) == status::success);
  const int64_t blocks_before = cache.usage(0).blocks;
  REQUIRE(session.compress(0, {}) == status::success);
  CHECK(cache.head_length(0, 1, 1) == 10);
  CHECK(cache.usage(0).blocks < blocks_before);
  CHECK(session.decode_steps(0) == 0);
  compression_session window_session(cache, model, snapkv({.budget = token_budget::of_tokens(8), .window = window}));
  CHECK(window_session.add_sequence(1) == status::success);
  REQUIRE(window_session.append(1, iota_positions(0, prompt), in.k, in.v) == status::success);
  CHECK(window_session.compress(1, {}) == status::window_too_large);  // window attention with nothing observed
  CHECK(cache.head_length(1, 0, 0) == prompt);
}

TEST_CASE("the engine loop as docs/cache.md shows it", "[cpu][cache][engine]") {
  std::mt19937 rng(12);
  const int32_t n = 100, w = 8;
  const size_t kv_width = static_cast<size_t>(model.kv_heads) * model.head_dim;
  const size_t q_width = static_cast<size_t>(model.q_heads) * model.head_dim;
  const std::vector<int32_t> prompt_positions = iota_positions(0, n), window_positions = iota_positions(n - w, w);
  const auto prompt_k = gaussian(rng, static_cast<size_t>(model.layers) * n * kv_width), prompt_v = prompt_k;
  const auto window_queries = gaussian(rng, static_cast<size_t>(model.layers) * w * q_width);
  const auto token_k = gaussian(rng, kv_width), token_v = token_k, q = gaussian(rng, q_width);
  std::vector<float> out(q_width);

// example-begin engine-loop
  kvtrim::paged_cache<kvtrim::bfloat16> cache;  // model: L = 2, Hq = 4, Hkv = 2, d = 8
  kvtrim::throw_if_error(kvtrim::paged_cache<kvtrim::bfloat16>::create(
      {.shape = model, .block_size = 16, .num_blocks = 64, .max_sequences = 4, .max_tokens_per_head = 256}, cache));
  kvtrim::compression_session session(cache, model, kvtrim::snapkv({.budget = kvtrim::token_budget::of_tokens(32), .window = 8}));

  kvtrim::throw_if_error(session.add_sequence(7));
  kvtrim::throw_if_error(session.append(7, prompt_positions, prompt_k, prompt_v));       // k, v [L][n][Hkv][d]
  const kvtrim::memory_usage before = cache.usage(7);                                    // 2 x 2 heads x 7 blocks
  kvtrim::throw_if_error(session.finish_prefill(7, {window_queries, window_positions})); // [L][w][Hq][d]
  const kvtrim::memory_usage after = cache.usage(7);                                     // 2 x 2 heads x 2 blocks

  for (int32_t step = 0; step < 4; ++step) {
    const std::vector<int32_t> position{n + step};
    for (int32_t layer = 0; layer < model.layers; ++layer) {
      kvtrim::throw_if_error(session.append(7, layer, position, token_k, token_v));     // k, v [1][Hkv][d]
      kvtrim::throw_if_error(session.attend(7, layer, q, out));                         // q, out [Hq][d]
    }
    bool evicted = false;  // SnapKV compresses once, after prefill
    kvtrim::throw_if_error(session.end_decode_step(7, evicted));
  }
  kvtrim::throw_if_error(session.free_sequence(7));  // every block goes back to the pool
// example-end engine-loop

  CHECK(before.blocks == 2 * 2 * 7);
  CHECK(after.blocks == 2 * 2 * 2);
  CHECK(before.bytes - after.bytes == 2 * 2 * 5 * cache.pool().bytes_per_block);
  CHECK(cache.pool().used_blocks == 0);
}
