// One test per defect the fuzzer (tests/fuzz/fuzz_cache_ops.cpp, scripts/fuzz) found; each
// failed before its fix. The inputs that found them are in tests/fuzz/regressions/ and are
// replayed by CTest `fuzz_corpus_replay`. docs/reliability.md lists them.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <vector>

#include "cache_invariants.hpp"
#include "fixtures.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::iota_positions;

namespace {
const attention_shape model{2, 4, 2, 8};
const paged_cache_config config{model, 4, 32, 2, 24};

//! Two heads per layer; head 0's candidates all outscore head 1's. Nothing is protected.
candidate_table lopsided(int32_t layers, int32_t n) {
  candidate_table t(layers, 2);
  for (int32_t l = 0; l < layers; ++l)
    for (int32_t h = 0; h < 2; ++h) {
      head_candidates& c = t.at(l, h);
      c.length = n;
      c.next_position = n;
      for (int32_t s = 0; s < n; ++s) c.ranked.push_back({h == 0 ? 10.f + static_cast<float>(n - s) : 0.001f, s, s});
    }
  return t;
}
}  // namespace

// Found as: apply -> success where the model expected invalid_plan (metrics with three layers
// for a two-layer plan); with fewer layers than the plan, validate() read the metrics' row
// offsets past their end (heap overflow under ASan).
TEST_CASE("regression: a plan whose metrics have another [L][H] shape is refused, not read past its end",
          "[cpu][regression]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  REQUIRE(cache.add_sequence(0) == status::success);
  const std::vector<float> kv(static_cast<size_t>(model.layers) * 5 * model.kv_heads * model.head_dim, 0.5f);
  REQUIRE(cache.append(0, iota_positions(0, 5), kv, kv) == status::success);
  const paged_cache<float> before = cache;
  for (const int32_t metric_layers : {1, 3}) {
    CAPTURE(metric_layers);
    eviction_plan plan(model.layers, model.kv_heads);
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) plan.set_head(l, h, 5, iota_positions(0, 5));
    plan.metrics = ragged_rows(metric_layers, model.kv_heads,
                               std::vector<int32_t>(static_cast<size_t>(metric_layers) * model.kv_heads, 5));
    CHECK(cache.apply(0, plan) == status::invalid_plan);
    CHECK(cache.tables() == before.tables());
    const std::vector<int64_t> seqs{0};
    CHECK(paged_fixtures::take_dump(cache, seqs) == paged_fixtures::take_dump(before, seqs));
    auto dense = fixtures::make_cache(model, 5, 0);
    CHECK(dense.cache.apply(0, plan) == status::invalid_plan);
  }
}

// Found as: compress_layer with a fuzzed model of negative Hq returned shape_mismatch (the
// queries' expected size computed from the unchecked shape) where compress says invalid_group.
TEST_CASE("regression: compress_layer validates the model before sizing its queries", "[cpu][regression]") {
  auto f = fixtures::make_cache(model, 12, 4);
  const auto p = pyramidkv({.budget = token_budget::of_tokens(8), .window = 2});
  const auto before = fixtures::take_snapshot(f.cache);
  const std::vector<float> queries(static_cast<size_t>(4) * model.q_heads * model.head_dim, 0.5f);
  for (const int32_t q_heads : {-4, 0, 3}) {
    CAPTURE(q_heads);
    attention_shape bad = model;
    bad.q_heads = q_heads;
    CHECK(cpu::compress_layer(p, f.cache, 0, bad, 0, queries, iota_positions(8, 4)) == status::invalid_group);
  }
  CHECK(fixtures::take_snapshot(f.cache) == before);
}

// Found as: compress ada_kv -> invalid_plan (the fuzzer's "a policy produced a plan its store
// refuses"): with window 0 nothing is protected, and a head that earned no budget (alpha 0) or
// the pyramid's top layer ((C - w) / beta = 0) got zero candidates, so every evictor refused
// the plan and compression failed on valid parameters. Every non-empty head now keeps one.
TEST_CASE("regression: Ada-KV and PyramidKV with nothing protected keep a token in every head", "[cpu][regression]") {
  std::vector<int32_t> select(2);
  adaptive_budget<> ada;
  ada.base.budget = token_budget::of_tokens(2);
  ada.alpha = 0.f;
  REQUIRE(ada.allocate(lopsided(1, 8), {0, 1, {}}, select) == status::success);
  CHECK(select[0] == 4);  // it earned the whole budget of the layer
  CHECK(select[1] == 1);  // earned nothing: kept one (was 0)

  const pyramid_budget pyramid{.budget = token_budget::of_tokens(4), .beta = 20, .form = pyramid_form::integer};
  std::vector<int32_t> select2(4);
  REQUIRE(pyramid.allocate(lopsided(2, 16), {0, 2, {}}, select2) == status::success);
  CHECK(select2[2] == 1);  // the top layer's (C - w) / beta = 0 (was 0)
  CHECK(select2[3] == 1);

  // End to end: every per-layer preset with window 0 compresses and keeps a token everywhere.
  for (uint32_t seed = 1; seed <= 4; ++seed) {
    CAPTURE(seed);
    const auto run = [&](const auto& p, const char* name) {
      CAPTURE(name);
      auto f = fixtures::make_cache(model, 16, 2, seed);
      REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
      for (int32_t l = 0; l < model.layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h) CHECK(f.cache.head_length(0, l, h) >= 1);
    };
    run(ada_kv({.budget = token_budget::of_tokens(2), .window = 0, .alpha = 0.f}), "ada_kv");
    run(ada_pyramidkv({.budget = token_budget::of_tokens(2), .window = 0, .alpha = 0.f}), "ada_pyramidkv");
    run(pyramidkv({.budget = token_budget::of_tokens(4), .window = 0}), "pyramidkv");
  }
}

// Found (UBSan, signed overflow in blocks_for) by fuzzing the library before its 64-bit fixes:
// KV-Compress with a block size of 2^31 - 2 computed length + block_size - 1 in 32 bits.
TEST_CASE("regression: KV-Compress with a block size near 2^31 does not overflow", "[cpu][regression]") {
  auto f = fixtures::make_cache(model, 20, 4);
  const auto p = kv_compress({.budget = token_budget::of_tokens(8), .block_size = 2147483646, .protected_window = 3});
  REQUIRE(cpu::compress(p, f.cache, 0, f.model, f.observation()) == status::success);
  // One block holds every head whole: there is no whole block to evict.
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) CHECK(f.cache.head_length(0, l, h) == 20);
  CHECK(blocks_for(20, 2147483646) == 1);
}

// Found (UBSan, signed overflow in rank_head's position + 1) by fuzzing the library before the
// fix: append accepted the position 2^31 - 1, and compressing that head overflowed "one past
// the newest position". Stores now refuse positions above max_position (2^31 - 2).
TEST_CASE("regression: a position of 2^31 - 1 is refused before it can overflow", "[cpu][regression]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  REQUIRE(cache.add_sequence(0) == status::success);
  const std::vector<float> kv(static_cast<size_t>(model.layers) * model.kv_heads * model.head_dim, 0.5f);
  const std::vector<int32_t> last{2147483647}, largest{max_position};
  CHECK(cache.append(0, last, kv, kv) == status::invalid_argument);
  CHECK(cache.head_length(0, 0, 0) == 0);
  REQUIRE(cache.append(0, iota_positions(0, 4), std::vector<float>(kv.size() * 4, 0.5f),
                       std::vector<float>(kv.size() * 4, 0.5f)) == status::success);
  REQUIRE(cache.append(0, largest, kv, kv) == status::success);
  const auto p = streaming_llm({.budget = token_budget::of_tokens(3), .sinks = 1});
  REQUIRE(cpu::compress(p, cache, 0, model, {}) == status::success);
  std::vector<int32_t> positions(3);
  std::vector<float> keys(24), metric(3);
  REQUIRE(cache.read_head(0, 1, 1, positions, keys, metric) == status::success);
  std::sort(positions.begin(), positions.end());
  CHECK(positions == std::vector<int32_t>{0, 3, max_position});  // the sink and the two newest
}

// Found as: append -> invalid_argument where the model expected shape_mismatch (a chunk of
// more tokens than a head holds, with K one value short). When the batch append_layer
// arrived, the appends checked the chunk's length before the data's size, the reverse of the
// documented order (docs/errors.md). The length check now comes after the sizes, as before.
TEST_CASE("regression: an append longer than a head holds with K/V of the wrong size is a shape mismatch",
          "[cpu][regression]") {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  REQUIRE(cache.add_sequence(0) == status::success);
  REQUIRE(cache.add_sequence(1) == status::success);
  const int32_t tokens = config.max_tokens_per_head + 1;
  const size_t row = static_cast<size_t>(model.kv_heads) * model.head_dim;
  const auto positions = iota_positions(0, tokens);
  const std::vector<float> all_layers(static_cast<size_t>(model.layers) * tokens * row, 0.5f);
  const std::vector<float> one_layer(static_cast<size_t>(tokens) * row, 0.5f);
  const std::vector<float> short_by_one(one_layer.begin(), one_layer.end() - 1);
  CHECK(cache.append(0, positions, std::vector<float>(all_layers.begin() + 1, all_layers.end()), all_layers) ==
        status::shape_mismatch);
  CHECK(cache.append_layer(0, 1, positions, one_layer, short_by_one) == status::shape_mismatch);
  std::vector<int32_t> both(positions);
  both.insert(both.end(), positions.begin(), positions.end());
  std::vector<float> both_kv(one_layer);
  both_kv.insert(both_kv.end(), one_layer.begin(), one_layer.end());
  const std::vector<int64_t> ids{0, 1};
  CHECK(cache.append_layer(ids, 0, both, std::vector<float>(both_kv.begin(), both_kv.end() - 1), both_kv) ==
        status::shape_mismatch);
  // With the right sizes, the length is what is wrong.
  CHECK(cache.append(0, positions, all_layers, all_layers) == status::invalid_argument);
  CHECK(cache.append_layer(ids, 0, both, both_kv, both_kv) == status::invalid_argument);
  CHECK(cache.head_length(0, 0, 0) == 0);
  CHECK(cache.head_length(1, 0, 0) == 0);
}
