// Every bad input of the paged cache, its pool, its device variant and its attention gets a
// clear status and leaves everything exactly as it was.
#include <catch2/catch.hpp>

#include <cstdint>
#include <random>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::gaussian;
using paged_fixtures::iota_positions;

namespace {
const attention_shape model{2, 4, 2, 8};
const paged_cache_config config{model, 4, 32, 2, 24};
const std::vector<int64_t> seqs{0, 1};

//! Sequence 0 with 10 tokens, sequence 1 with 5, in a pool of 32 blocks.
paged_cache<float> filled() {
  auto cache = paged_fixtures::make_cache<paged_cache<float>>(config);
  std::mt19937 rng(1);
  for (const auto& [seq, n] : {std::pair<int64_t, int32_t>{0, 10}, {1, 5}}) {
    throw_if_error(cache.add_sequence(seq));
    const size_t count = static_cast<size_t>(model.layers) * n * model.kv_heads * model.head_dim;
    throw_if_error(cache.append(seq, iota_positions(0, n), gaussian(rng, count), gaussian(rng, count)));
  }
  return cache;
}

//! Runs `op` on `cache`, expects `expected`, and checks that nothing changed.
template <class Op>
void expect_rejected(paged_cache<float>& cache, status expected, Op&& op) {
  const paged_cache<float> before = cache;
  const status s = op();
  CAPTURE(to_string(s));
  CHECK(s == expected);
  CHECK(cache.tables() == before.tables());
  CHECK(paged_fixtures::take_dump(cache, seqs) == paged_fixtures::take_dump(before, seqs));
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

//! A plan that keeps every slot of sequence `seq` (valid as it stands).
eviction_plan keep_all(const paged_cache<float>& cache, int64_t seq) {
  eviction_plan plan(model.layers, model.kv_heads);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      const int32_t n = cache.head_length(seq, l, h);
      plan.set_head(l, h, n, iota_positions(0, n));
    }
  return plan;
}

std::vector<float> rows(int32_t layers, int32_t tokens) {
  return std::vector<float>(static_cast<size_t>(layers) * tokens * model.kv_heads * model.head_dim, 0.5f);
}

template <class Cache = paged_cache<float>>
status create_with(paged_cache_config c) {
  Cache cache;
  return Cache::create(c, cache);
}
}  // namespace

// ---- create

TEST_CASE("paged bad input: block size of zero", "[cpu][cache][bad-input]") {
  auto c = config;
  c.block_size = 0;
  CHECK(create_with(c) == status::invalid_argument);
}

TEST_CASE("paged bad input: empty pool", "[cpu][cache][bad-input]") {
  auto c = config;
  c.num_blocks = 0;
  CHECK(create_with(c) == status::invalid_argument);
}

TEST_CASE("paged bad input: no sequence rows", "[cpu][cache][bad-input]") {
  auto c = config;
  c.max_sequences = 0;
  CHECK(create_with(c) == status::invalid_argument);
}

TEST_CASE("paged bad input: no tokens per head", "[cpu][cache][bad-input]") {
  auto c = config;
  c.max_tokens_per_head = 0;
  CHECK(create_with(c) == status::invalid_argument);
}

TEST_CASE("paged bad input: query heads not a multiple of KV heads", "[cpu][cache][bad-input]") {
  auto c = config;
  c.shape.q_heads = 3;
  CHECK(create_with(c) == status::invalid_group);
}

TEST_CASE("paged bad input: compile-time head dim differs from the shape", "[cpu][cache][bad-input]") {
  CHECK(create_with<paged_cache<float, 64>>(config) == status::shape_mismatch);
}

// ---- sequences

TEST_CASE("paged bad input: negative sequence id", "[cpu][cache][bad-input]") {
  auto cache = filled();
  REQUIRE(cache.free_sequence(1) == status::success);
  expect_rejected(cache, status::invalid_argument, [&] { return cache.add_sequence(-3); });
}

TEST_CASE("paged bad input: sequence added twice", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::invalid_argument, [&] { return cache.add_sequence(0); });
}

TEST_CASE("paged bad input: more sequences than rows", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::pool_exhausted, [&] { return cache.add_sequence(2); });
}

TEST_CASE("paged bad input: free of an unknown sequence", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::unknown_sequence, [&] { return cache.free_sequence(7); });
}

// ---- append

TEST_CASE("paged bad input: append to an unknown sequence", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::unknown_sequence, [&] { return cache.append(5, iota_positions(0, 1), rows(2, 1), rows(2, 1)); });
}

TEST_CASE("paged bad input: append_layer to a layer out of range", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append_layer(0, 2, iota_positions(10, 1), rows(1, 1), rows(1, 1)); });
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append_layer(0, -1, iota_positions(10, 1), rows(1, 1), rows(1, 1)); });
}

TEST_CASE("paged bad input: append of no tokens", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append(0, {}, {}, {}); });
}

TEST_CASE("paged bad input: negative position", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int32_t> p{-1};
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append(0, p, rows(2, 1), rows(2, 1)); });
}

TEST_CASE("paged bad input: keys of the wrong size", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::shape_mismatch, [&] { return cache.append(0, iota_positions(10, 2), rows(2, 1), rows(2, 2)); });
}

TEST_CASE("paged bad input: values of the wrong size", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::shape_mismatch, [&] { return cache.append_layer(0, 0, iota_positions(10, 1), rows(1, 1), rows(2, 1)); });
}

TEST_CASE("paged bad input: a head would pass max_tokens_per_head", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append(0, iota_positions(10, 15), rows(2, 15), rows(2, 15)); });
}

TEST_CASE("paged bad input: pool exhausted by a prefill chunk", "[cpu][cache][bad-input]") {
  auto cache = filled();
  // 32 blocks: 12 + 8 used; 16 more tokens per head need 4 x 4 = 16 more blocks.
  REQUIRE(cache.pool().free_blocks() == 12);
  expect_rejected(cache, status::pool_exhausted, [&] { return cache.append(1, iota_positions(5, 16), rows(2, 16), rows(2, 16)); });
}

// ---- append to a batch (one layer of several sequences as one operation)

TEST_CASE("paged bad input: batch append_layer naming an unknown sequence, or one twice", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int32_t> p{10, 5};
  expect_rejected(cache, status::unknown_sequence,
                  [&] { return cache.append_layer(std::vector<int64_t>{0, 6}, 0, p, rows(1, 2), rows(1, 2)); });
  expect_rejected(cache, status::invalid_argument,
                  [&] { return cache.append_layer(std::vector<int64_t>{1, 1}, 0, p, rows(1, 2), rows(1, 2)); });
}

TEST_CASE("paged bad input: batch append_layer to a layer out of range", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int32_t> p{10, 5};
  for (const int32_t layer : {-1, 2}) {
    CAPTURE(layer);
    expect_rejected(cache, status::invalid_argument, [&] { return cache.append_layer(seqs, layer, p, rows(1, 2), rows(1, 2)); });
    expect_rejected(cache, status::unknown_sequence,
                    [&] { return cache.append_layer(std::vector<int64_t>{0, 6}, layer, p, rows(1, 2), rows(1, 2)); });
  }
}

TEST_CASE("paged bad input: batch append_layer with positions of no tokens or not a multiple of the batch",
          "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append_layer(seqs, 0, {}, {}, {}); });
  const std::vector<int32_t> three{10, 11, 5};
  expect_rejected(cache, status::shape_mismatch, [&] { return cache.append_layer(seqs, 0, three, rows(1, 3), rows(1, 3)); });
}

TEST_CASE("paged bad input: batch append_layer with a negative position, or K/V of the wrong size",
          "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int32_t> negative{10, -1}, p{10, 5};
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append_layer(seqs, 0, negative, rows(1, 2), rows(1, 2)); });
  expect_rejected(cache, status::shape_mismatch, [&] { return cache.append_layer(seqs, 0, p, rows(1, 1), rows(1, 2)); });
  expect_rejected(cache, status::shape_mismatch, [&] { return cache.append_layer(seqs, 0, p, rows(1, 2), rows(2, 2)); });
}

TEST_CASE("paged bad input: batch append_layer where one head would pass max_tokens_per_head",
          "[cpu][cache][bad-input]") {
  auto cache = filled();  // 15 more tokens fit sequence 1's heads (5), not sequence 0's (10 of 24)
  std::vector<int32_t> p = iota_positions(10, 15);
  const std::vector<int32_t> second = iota_positions(5, 15);
  p.insert(p.end(), second.begin(), second.end());
  expect_rejected(cache, status::invalid_argument, [&] { return cache.append_layer(seqs, 0, p, rows(1, 30), rows(1, 30)); });
}

TEST_CASE("paged bad input: batch append_layer that the pool holds for each sequence, not for both",
          "[cpu][cache][bad-input]") {
  auto cache = filled();
  REQUIRE(cache.append_layer(1, 1, iota_positions(5, 4), rows(1, 4), rows(1, 4)) == status::success);
  REQUIRE(cache.pool().free_blocks() == 10);
  // 13 tokens: 6 new blocks for each sequence's layer 0, 12 for both.
  for (const int64_t seq : seqs) {
    auto alone = cache;
    CHECK(alone.append_layer(seq, 0, iota_positions(10, 13), rows(1, 13), rows(1, 13)) == status::success);
  }
  std::vector<int32_t> p = iota_positions(10, 13);
  const std::vector<int32_t> second = iota_positions(9, 13);
  p.insert(p.end(), second.begin(), second.end());
  expect_rejected(cache, status::pool_exhausted, [&] { return cache.append_layer(seqs, 0, p, rows(1, 26), rows(1, 26)); });
}

TEST_CASE("paged bad input: batch append_layer of no sequences", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int64_t> none;
  expect_rejected(cache, status::shape_mismatch,
                  [&] { return cache.append_layer(none, 0, iota_positions(10, 1), rows(1, 1), rows(1, 1)); });
  expect_rejected(cache, status::success, [&] { return cache.append_layer(none, 0, {}, {}, {}); });
}

// ---- read / rewrite

TEST_CASE("paged bad input: read_head of an unknown sequence", "[cpu][cache][bad-input]") {
  const auto cache = filled();
  std::vector<int32_t> p;
  std::vector<float> k, m;
  CHECK(cache.read_head(9, 0, 0, p, k, m) == status::unknown_sequence);
}

TEST_CASE("paged bad input: read_head of a head out of range", "[cpu][cache][bad-input]") {
  const auto cache = filled();
  std::vector<int32_t> p;
  std::vector<float> k, m;
  CHECK(cache.read_head(0, 0, 2, p, k, m) == status::invalid_argument);
  CHECK(cache.read_head(0, 2, 0, p, k, m) == status::invalid_argument);
  CHECK(cache.read_head(0, -1, 0, p, k, m) == status::invalid_argument);
}

TEST_CASE("paged bad input: read_head into outputs of the wrong size", "[cpu][cache][bad-input]") {
  const auto cache = filled();
  std::vector<int32_t> p(10);
  std::vector<float> k(80), m(10);
  REQUIRE(cache.read_head(0, 0, 0, p, k, m) == status::success);
  std::vector<int32_t> p9(9);
  std::vector<float> k79(79), m11(11);
  CHECK(cache.read_head(0, 0, 0, p9, k, m) == status::shape_mismatch);
  CHECK(cache.read_head(0, 0, 0, p, k79, m) == status::shape_mismatch);
  CHECK(cache.read_head(0, 0, 0, p, k, m11) == status::shape_mismatch);
}

TEST_CASE("paged bad input: read_values of an unknown sequence, bad head, wrong size", "[cpu][cache][bad-input]") {
  const auto cache = filled();
  std::vector<float> v(80), v_short(79);
  CHECK(cache.read_values(0, 0, 0, v) == status::success);
  CHECK(cache.read_values(4, 0, 0, v) == status::unknown_sequence);
  CHECK(cache.read_values(0, 0, 5, v) == status::invalid_argument);
  CHECK(cache.read_values(0, 0, 0, v_short) == status::shape_mismatch);
}

TEST_CASE("paged bad input: rewrite_head of an unknown sequence", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::unknown_sequence, [&] { return cache.rewrite_head(3, 0, 0, {}, {}); });
}

TEST_CASE("paged bad input: rewrite_head of a head out of range", "[cpu][cache][bad-input]") {
  auto cache = filled();
  expect_rejected(cache, status::invalid_argument, [&] { return cache.rewrite_head(0, 0, 2, {}, {}); });
}

TEST_CASE("paged bad input: rewrite_head with inputs of the wrong size", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int32_t> p(10, 1);
  const std::vector<float> k(79, 0.f);
  expect_rejected(cache, status::shape_mismatch, [&] { return cache.rewrite_head(0, 0, 0, p, k); });
}

TEST_CASE("paged bad input: rewrite_head with a negative position", "[cpu][cache][bad-input]") {
  auto cache = filled();
  std::vector<int32_t> p(10, 1);
  p[4] = -2;
  const std::vector<float> k(80, 0.f);
  expect_rejected(cache, status::invalid_argument, [&] { return cache.rewrite_head(0, 0, 0, p, k); });
}

// ---- apply

TEST_CASE("paged bad input: apply to an unknown sequence", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const auto plan = keep_all(cache, 0);
  expect_rejected(cache, status::unknown_sequence, [&] { return cache.apply(6, plan); });
}

TEST_CASE("paged bad input: plan of another shape", "[cpu][cache][bad-input]") {
  auto cache = filled();
  eviction_plan plan(1, model.kv_heads);
  for (int32_t h = 0; h < model.kv_heads; ++h) plan.set_head(0, h, 10, iota_positions(0, 10));
  expect_rejected(cache, status::invalid_plan, [&] { return cache.apply(0, plan); });
}

TEST_CASE("paged bad input: plan made for other head lengths", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const auto plan = keep_all(cache, 1);  // lengths 5, sequence 0 has 10
  expect_rejected(cache, status::invalid_plan, [&] { return cache.apply(0, plan); });
}

TEST_CASE("paged bad input: plan with unsorted, repeated or out-of-range slots", "[cpu][cache][bad-input]") {
  auto cache = filled();
  for (const std::vector<int32_t>& kept : {std::vector<int32_t>{3, 1}, {2, 2}, {0, 10}, {-1, 4}}) {
    CAPTURE(kept);
    eviction_plan plan(model.layers, model.kv_heads);
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h)
        plan.set_head(l, h, 10, l == 1 && h == 1 ? std::span<const int32_t>(kept) : std::span<const int32_t>(iota_positions(0, 10)));
    expect_rejected(cache, status::invalid_plan, [&] { return cache.apply(0, plan); });
  }
}

TEST_CASE("paged bad input: plan that empties a non-empty head", "[cpu][cache][bad-input]") {
  auto cache = filled();
  eviction_plan plan(model.layers, model.kv_heads);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h)
      plan.set_head(l, h, 10, l == 0 && h == 1 ? std::vector<int32_t>{} : iota_positions(0, 3));
  expect_rejected(cache, status::invalid_plan, [&] { return cache.apply(0, plan); });
}

TEST_CASE("paged bad input: plan metrics of the wrong size", "[cpu][cache][bad-input]") {
  auto cache = filled();
  auto plan = keep_all(cache, 0);
  const std::vector<int32_t> lengths(4, 9);
  plan.metrics = ragged_rows(model.layers, model.kv_heads, lengths);
  expect_rejected(cache, status::invalid_plan, [&] { return cache.apply(0, plan); });
}

// ---- truncate

TEST_CASE("paged bad input: truncate of an unknown sequence, or of one named twice", "[cpu][cache][bad-input]") {
  auto cache = filled();
  const std::vector<int32_t> two(2 * 4, 3);
  expect_rejected(cache, status::unknown_sequence, [&] { return cache.truncate(std::vector<int64_t>{0, 6}, two); });
  expect_rejected(cache, status::invalid_argument, [&] { return cache.truncate(std::vector<int64_t>{1, 1}, two); });
}

TEST_CASE("paged bad input: truncate with lengths of the wrong size", "[cpu][cache][bad-input]") {
  auto cache = filled();
  for (const size_t size : {size_t{0}, size_t{4}, size_t{7}, size_t{9}}) {
    CAPTURE(size);
    const std::vector<int32_t> lengths(size, 3);
    expect_rejected(cache, status::shape_mismatch, [&] { return cache.truncate(seqs, lengths); });
  }
}

TEST_CASE("paged bad input: truncate to a length above the head's, or that empties it", "[cpu][cache][bad-input]") {
  auto cache = filled();  // sequence 0 holds 10 tokens a head, sequence 1 holds 5
  // Every other head is valid, and the bad one comes last, so nothing may be applied early.
  for (const int32_t bad : {6, 0, -1}) {
    CAPTURE(bad);
    std::vector<int32_t> lengths(2 * 4, 2);
    lengths.back() = bad;
    expect_rejected(cache, status::invalid_argument, [&] { return cache.truncate(seqs, lengths); });
  }
}

// ---- decode attention

TEST_CASE("paged bad input: decode attention on an unknown sequence", "[cpu][cache][bad-input]") {
  auto cache = filled();
  std::vector<float> q(32, 0.1f), out(32), scratch;
  expect_rejected(cache, status::unknown_sequence, [&] {
    return cpu::decode_attention(cache, 8, 0, 4, q, out, decode_accumulation::sum, gqa_reduce::mean, scratch);
  });
}

TEST_CASE("paged bad input: decode attention on a layer out of range", "[cpu][cache][bad-input]") {
  auto cache = filled();
  std::vector<float> q(32, 0.1f), out(32), scratch;
  expect_rejected(cache, status::invalid_argument, [&] {
    return cpu::decode_attention(cache, 0, 2, 4, q, out, decode_accumulation::sum, gqa_reduce::mean, scratch);
  });
}

TEST_CASE("paged bad input: decode attention with query heads not a multiple of KV heads", "[cpu][cache][bad-input]") {
  auto cache = filled();
  std::vector<float> q(24, 0.1f), out(24), scratch;
  expect_rejected(cache, status::invalid_group, [&] {
    return cpu::decode_attention(cache, 0, 0, 3, q, out, decode_accumulation::sum, gqa_reduce::mean, scratch);
  });
}

TEST_CASE("paged bad input: decode attention with q or out of the wrong size", "[cpu][cache][bad-input]") {
  auto cache = filled();
  std::vector<float> q(31, 0.1f), q_ok(32, 0.1f), out(32), out_short(30), scratch;
  expect_rejected(cache, status::shape_mismatch, [&] {
    return cpu::decode_attention(cache, 0, 0, 4, q, out, decode_accumulation::none, gqa_reduce::mean, scratch);
  });
  expect_rejected(cache, status::shape_mismatch, [&] {
    return cpu::decode_attention(cache, 0, 0, 4, q_ok, out_short, decode_accumulation::none, gqa_reduce::mean, scratch);
  });
}

TEST_CASE("paged bad input: decode attention over an empty head", "[cpu][cache][bad-input]") {
  auto cache = filled();
  REQUIRE(cache.free_sequence(1) == status::success);
  REQUIRE(cache.add_sequence(1) == status::success);
  std::vector<float> q(32, 0.1f), out(32), scratch;
  expect_rejected(cache, status::empty_sequence, [&] {
    return cpu::decode_attention(cache, 1, 0, 4, q, out, decode_accumulation::none, gqa_reduce::mean, scratch);
  });
}

// ---- the pool on its own

TEST_CASE("pool bad input: allocating more blocks than are free", "[cpu][cache][bad-input]") {
  block_pool pool(3);
  std::vector<int32_t> out(4);
  const block_pool before = pool;
  CHECK(pool.allocate(out) == status::pool_exhausted);
  CHECK(pool == before);
}

TEST_CASE("pool bad input: double free", "[cpu][cache][bad-input]") {
  block_pool pool(4);
  std::vector<int32_t> two(2);
  REQUIRE(pool.allocate(two) == status::success);
  REQUIRE(pool.release(std::span<const int32_t>(two).first(1)) == status::success);
  const block_pool before = pool;
  CHECK(pool.release(two) == status::invalid_argument);  // two[0] is already free
  CHECK(pool == before);
}

TEST_CASE("pool bad input: a block named twice in one release", "[cpu][cache][bad-input]") {
  block_pool pool(4);
  std::vector<int32_t> two(2);
  REQUIRE(pool.allocate(two) == status::success);
  const std::vector<int32_t> twice{two[1], two[0], two[1]};
  const block_pool before = pool;
  CHECK(pool.release(twice) == status::invalid_argument);
  CHECK(pool == before);
}

TEST_CASE("pool bad input: releasing a block outside the pool", "[cpu][cache][bad-input]") {
  block_pool pool(4);
  const std::vector<int32_t> outside{4}, negative{-1};
  const block_pool before = pool;
  CHECK(pool.release(outside) == status::invalid_argument);
  CHECK(pool.release(negative) == status::invalid_argument);
  CHECK(pool == before);
}

// ---- device variant

TEST_CASE("device bad input: a null buffer", "[cpu][cache][bad-input]") {
  paged_fixtures::device_memory<float> memory(config);
  auto buffers = memory.buffers();
  buffers.pointers.metrics = nullptr;
  device_paged_cache<float> cache;
  CHECK(device_paged_cache<float>::create(config, device_storage<float>{buffers, host_mover{}}, cache) ==
        status::invalid_argument);
  CHECK_FALSE(cache.contains(0));
  CHECK(device_paged_cache<float>::create(config, cache) == status::invalid_argument);  // no buffers at all
}

TEST_CASE("device bad input: a buffer smaller than buffer_sizes says", "[cpu][cache][bad-input]") {
  paged_fixtures::device_memory<bfloat16> memory(config);
  auto buffers = memory.buffers();
  buffers.bytes.block_tables -= 4;
  device_paged_cache<bfloat16> cache;
  CHECK(device_paged_cache<bfloat16>::create(config, device_storage<bfloat16>{buffers, host_mover{}}, cache) ==
        status::shape_mismatch);
  CHECK(memory.tables[0] == 12345);  // nothing written
}
