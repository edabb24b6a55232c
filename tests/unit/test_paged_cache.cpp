// The paged per-head cache: block tables, compaction that frees memory, memory accounting,
// pool exhaustion, batches, storage types, paged decode attention.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>
#include <span>
#include <vector>

#include "cache_invariants.hpp"
#include "fixtures.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;
using paged_fixtures::gaussian;
using paged_fixtures::iota_positions;
using paged_fixtures::make_cache;

namespace {
const attention_shape model{2, 4, 2, 8};  // L, Hq, Hkv, d

paged_cache_config small_config(int32_t block_size = 4, int32_t blocks = 64, int32_t sequences = 4, int32_t max_tokens = 64) {
  return {model, block_size, blocks, sequences, max_tokens};
}

//! Appends `n` tokens (positions first..) to every layer of `seq`; returns K and V [L][n][H][d].
template <class Cache>
std::pair<std::vector<float>, std::vector<float>> fill(Cache& cache, int64_t seq, int32_t first, int32_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  using T = typename Cache::element_type;
  const size_t count = static_cast<size_t>(model.layers) * n * model.kv_heads * model.head_dim;
  auto k = gaussian<T>(rng, count), v = gaussian<T>(rng, count);
  throw_if_error(cache.append(seq, iota_positions(first, n), k, v), "fill");
  return {k, v};
}

//! Row of token t of head (l, h) in an [L][n][H][d] buffer.
size_t row(int32_t l, int32_t n, int32_t t, int32_t h) {
  return ((static_cast<size_t>(l) * n + t) * model.kv_heads + h) * model.head_dim;
}

std::vector<int32_t> head_positions(const paged_cache<float>& c, int64_t seq, int32_t l, int32_t h) {
  const auto n = static_cast<size_t>(c.head_length(seq, l, h));
  std::vector<int32_t> p(n);
  std::vector<float> k(n * model.head_dim), m(n);
  throw_if_error(c.read_head(seq, l, h, p, k, m));
  return p;
}
}  // namespace

TEST_CASE("a new paged cache is empty and reports its pool and buffer sizes", "[cpu][cache]") {
  const auto config = small_config();
  auto cache = make_cache<paged_cache<float16>>(config);
  const pool_usage pool = cache.pool();
  CHECK(pool.total_blocks == 64);
  CHECK(pool.used_blocks == 0);
  CHECK(pool.bytes_per_block == 4 * (2 * 8 * 2 + 4 + 4));
  CHECK(pool.free_bytes() == 64 * pool.bytes_per_block);
  CHECK_FALSE(cache.contains(0));
  const paged_buffer_sizes sizes = buffer_sizes<float16>(config);
  CHECK(sizes.keys == 64u * 4 * 8 * 2);
  CHECK(sizes.positions == 64u * 4 * 4);
  CHECK(sizes.block_tables == 4u * 2 * 2 * 16 * 4);
  CHECK(sizes.lengths == 4u * 2 * 2 * 4);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("append gives each head its own blocks and maps slots through its table", "[cpu][cache]") {
  auto cache = make_cache<paged_cache<float>>(small_config());
  REQUIRE(cache.add_sequence(42) == status::success);
  const auto [k, v] = fill(cache, 42, 0, 6, 1);
  CHECK(cache.pool().used_blocks == 2 * 2 * 2);  // 6 tokens = 2 blocks of 4, for 2 layers x 2 heads
  std::set<int32_t> all_blocks;
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(l, h);
      CHECK(cache.head_length(42, l, h) == 6);
      const auto blocks = cache.head_blocks(42, l, h);
      REQUIRE(blocks.size() == 2);
      all_blocks.insert(blocks.begin(), blocks.end());
      std::vector<int32_t> p(6);
      std::vector<float> keys(48), values(48), m(6);
      REQUIRE(cache.read_head(42, l, h, p, keys, m) == status::success);
      REQUIRE(cache.read_values(42, l, h, values) == status::success);
      CHECK(p == iota_positions(0, 6));
      CHECK(m == std::vector<float>(6, 0.f));
      for (int32_t t = 0; t < 6; ++t)
        for (int32_t c = 0; c < model.head_dim; ++c) {
          CHECK(keys[static_cast<size_t>(t * 8 + c)] == k[row(l, 6, t, h) + c]);
          CHECK(values[static_cast<size_t>(t * 8 + c)] == v[row(l, 6, t, h) + c]);
        }
    }
  CHECK(all_blocks.size() == 8);  // no block shared between heads
  CHECK(cache.usage(42) == memory_usage{24, 8, 8 * cache.pool().bytes_per_block});
  CHECK(cache.usage(42, 1) == memory_usage{12, 4, 4 * cache.pool().bytes_per_block});
  CHECK(cache.usage(42, 1, 0) == memory_usage{6, 2, 2 * cache.pool().bytes_per_block});
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("append_layer fills one layer, and a decode token takes a block only where the last one is full", "[cpu][cache]") {
  auto cache = make_cache<paged_cache<float>>(small_config());
  REQUIRE(cache.add_sequence(0) == status::success);
  std::mt19937 rng(3);
  const auto k = gaussian(rng, 4 * 2 * 8), v = gaussian(rng, 4 * 2 * 8);
  REQUIRE(cache.append_layer(0, 1, iota_positions(0, 4), k, v) == status::success);
  CHECK(cache.head_length(0, 0, 0) == 0);
  CHECK(cache.head_length(0, 1, 1) == 4);
  CHECK(cache.pool().used_blocks == 2);
  // Head (1, 0) drops to 3 tokens; head (1, 1) stays full. One decode token: only (1, 1) grows a block.
  eviction_plan plan(model.layers, model.kv_heads);
  const std::vector<int32_t> none, three{0, 1, 3}, all{0, 1, 2, 3};
  plan.set_head(0, 0, 0, none);
  plan.set_head(0, 1, 0, none);
  plan.set_head(1, 0, 4, three);
  plan.set_head(1, 1, 4, all);
  REQUIRE(cache.apply(0, plan) == status::success);
  const auto k1 = gaussian(rng, 2 * 8), v1 = gaussian(rng, 2 * 8);
  REQUIRE(cache.append_layer(0, 1, iota_positions(4, 1), k1, v1) == status::success);
  CHECK(cache.head_blocks(0, 1, 0).size() == 1);
  CHECK(cache.head_blocks(0, 1, 1).size() == 2);
  CHECK(cache.pool().used_blocks == 3);
  CHECK(head_positions(cache, 0, 1, 0) == std::vector<int32_t>{0, 1, 3, 4});
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("a batch append_layer equals appending each sequence's tokens in turn", "[cpu][cache]") {
  // bf16: the batch rounds its fp32 input like the single appends. Sequences of 3, 6 and 8
  // tokens: with 2 tokens each, the second needs no new block, the others one per head.
  auto batch = make_cache<paged_cache<bfloat16>>(small_config());
  auto single = make_cache<paged_cache<bfloat16>>(small_config());
  const std::vector<int64_t> seqs{4, 9, 2};
  const std::vector<int32_t> lengths{3, 6, 8};
  for (size_t b = 0; b < seqs.size(); ++b) {
    REQUIRE(batch.add_sequence(seqs[b]) == status::success);
    REQUIRE(single.add_sequence(seqs[b]) == status::success);
    fill(batch, seqs[b], 0, lengths[b], static_cast<uint32_t>(b));
    fill(single, seqs[b], 0, lengths[b], static_cast<uint32_t>(b));
  }
  std::mt19937 rng(8);
  constexpr int32_t tokens = 2;
  const size_t per_sequence = static_cast<size_t>(tokens) * model.kv_heads * model.head_dim;
  const auto k = gaussian(rng, seqs.size() * per_sequence), v = gaussian(rng, k.size());
  std::vector<int32_t> positions;  // [B][t]: each sequence continues from its own length
  for (const int32_t n : lengths)
    for (int32_t t = 0; t < tokens; ++t) positions.push_back(n + t);
  const int32_t used = batch.pool().used_blocks;
  REQUIRE(batch.append_layer(seqs, 1, positions, k, v) == status::success);
  CHECK(batch.pool().used_blocks == used + 2 * model.kv_heads);
  for (size_t b = 0; b < seqs.size(); ++b) {
    const auto slice = [&](const std::vector<float>& x) {
      return std::span<const float>(x).subspan(b * per_sequence, per_sequence);
    };
    REQUIRE(single.append_layer(seqs[b], 1, std::span<const int32_t>(positions).subspan(b * tokens, tokens), slice(k),
                                slice(v)) == status::success);
  }
  CHECK(batch.tables() == single.tables());
  CHECK(paged_fixtures::take_dump(batch, seqs) == paged_fixtures::take_dump(single, seqs));
  CHECK(batch.head_length(9, 1, 1) == 8);
  CHECK(batch.head_length(9, 0, 1) == 6);
  CHECK(cache_invariants::check_tables(batch.tables()).empty());
}

TEST_CASE("apply compacts with MoveCache moves, carries positions and metrics, frees trailing blocks", "[cpu][cache]") {
  const attention_shape one{1, 1, 1, 2};
  auto cache = make_cache<paged_cache<float>>({one, 4, 8, 1, 16});
  REQUIRE(cache.add_sequence(5) == status::success);
  std::vector<float> k(20), v(20);
  std::iota(k.begin(), k.end(), 0.f);
  std::iota(v.begin(), v.end(), 100.f);
  REQUIRE(cache.append(5, iota_positions(0, 10), k, v) == status::success);
  CHECK(cache.pool().used_blocks == 3);
  const auto blocks_before = std::vector<int32_t>(cache.head_blocks(5, 0, 0).begin(), cache.head_blocks(5, 0, 0).end());

  eviction_plan plan(1, 1);
  const std::vector<int32_t> kept{0, 3, 8, 9};
  plan.set_head(0, 0, 10, kept);
  const std::vector<int32_t> lengths{10};
  plan.metrics = ragged_rows(1, 1, lengths);
  for (int32_t j = 0; j < 10; ++j) plan.metrics.row(0, 0)[static_cast<size_t>(j)] = 0.5f * static_cast<float>(j);
  REQUIRE(cache.apply(5, plan) == status::success);

  // Holes 1 and 2 take the tail survivors 9 and 8, highest first.
  std::vector<int32_t> p(4);
  std::vector<float> keys(8), values(8), m(4);
  REQUIRE(cache.read_head(5, 0, 0, p, keys, m) == status::success);
  REQUIRE(cache.read_values(5, 0, 0, values) == status::success);
  CHECK(p == std::vector<int32_t>{0, 9, 8, 3});
  CHECK(m == std::vector<float>{0.f, 4.5f, 4.f, 1.5f});
  CHECK(keys == std::vector<float>{0, 1, 18, 19, 16, 17, 6, 7});
  CHECK(values == std::vector<float>{100, 101, 118, 119, 116, 117, 106, 107});
  // Two trailing blocks went back; the first block stayed where it was.
  CHECK(cache.pool().used_blocks == 1);
  CHECK(cache.head_blocks(5, 0, 0)[0] == blocks_before[0]);
  CHECK(cache.usage(5) == memory_usage{4, 1, cache.pool().bytes_per_block});
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("memory accounting shows what an eviction gave back", "[cpu][cache]") {
  auto cache = make_cache<paged_cache<bfloat16>>(small_config(4, 64));
  REQUIRE(cache.add_sequence(1) == status::success);
  fill(cache, 1, 0, 40, 2);
  const memory_usage before = cache.usage(1);
  const pool_usage pool_before = cache.pool();
  CHECK(before.blocks == 2 * 2 * 10);
  REQUIRE(cpu::compress(streaming_llm({.budget = token_budget::of_tokens(8), .sinks = 2}), cache, 1, model, {}) ==
          status::success);
  const memory_usage after = cache.usage(1);
  CHECK(after.tokens == 2 * 2 * 8);
  CHECK(after.blocks == 2 * 2 * 2);
  CHECK(before.bytes - after.bytes == 2 * 2 * 8 * cache.pool().bytes_per_block);
  CHECK(cache.pool().free_bytes() - pool_before.free_bytes() == before.bytes - after.bytes);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("KV-Compress's block-granular plan frees whole blocks", "[cpu][cache]") {
  const attention_shape shape{3, 4, 2, 8};
  auto cache = make_cache<paged_cache<float>>({shape, 4, 256, 1, 128});
  auto reference = fixtures::make_cache(shape, 64, 8, 7);
  REQUIRE(cache.add_sequence(0) == status::success);
  const auto [k, v] = paged_fixtures::dense_rows(reference.cache, 64);
  REQUIRE(cache.append(0, iota_positions(0, 64), k, v) == status::success);
  const auto p = kv_compress({.budget = token_budget::of_tokens(16), .block_size = 4, .protected_window = 5});
  REQUIRE(cpu::compress(p, cache, 0, shape, reference.observation()) == status::success);
  REQUIRE(cpu::compress(p, reference.cache, 0, shape, reference.observation()) == status::success);
  int64_t tokens = 0;
  for (int32_t l = 0; l < shape.layers; ++l)
    for (int32_t h = 0; h < shape.kv_heads; ++h) {
      const int32_t n = cache.head_length(0, l, h);
      CHECK(n == reference.cache.head_length(0, l, h));
      CHECK(n % 4 == 0);  // whole blocks only: every evicted token freed memory
      tokens += n;
    }
  CHECK(tokens == 16 * 6);
  CHECK(cache.pool().used_blocks == tokens / 4);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("pool exhaustion is a clear error and leaves the cache exactly as it was", "[cpu][cache]") {
  auto cache = make_cache<paged_cache<float>>(small_config(4, 10));
  REQUIRE(cache.add_sequence(0) == status::success);
  REQUIRE(cache.add_sequence(1) == status::success);
  fill(cache, 0, 0, 8, 1);  // 2 blocks x 4 heads = 8 of 10
  const paged_cache<float> before = cache;
  const std::vector<int64_t> seqs{0, 1};
  std::mt19937 rng(9);
  const auto k = gaussian(rng, 2 * 3 * 2 * 8), v = gaussian(rng, 2 * 3 * 2 * 8);
  const status s = cache.append(1, iota_positions(0, 3), k, v);  // needs 4 blocks, 2 free
  CHECK(s == status::pool_exhausted);
  CHECK(to_string(s).find("exhausted") != std::string_view::npos);
  CHECK(cache.tables() == before.tables());
  CHECK(paged_fixtures::take_dump(cache, seqs) == paged_fixtures::take_dump(before, seqs));
  CHECK(cache.pool().free_blocks() == 2);
  // Freeing a sequence makes room.
  REQUIRE(cache.free_sequence(0) == status::success);
  CHECK(cache.append(1, iota_positions(0, 3), k, v) == status::success);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("sequences of a batch share one pool and are compressed independently", "[cpu][cache]") {
  auto cache = make_cache<paged_cache<float>>(small_config(4, 128, 3, 64));
  const std::vector<int64_t> ids{7, 1000000000000LL, 3};
  const std::vector<int32_t> lengths{40, 24, 56};
  for (size_t i = 0; i < ids.size(); ++i) {
    REQUIRE(cache.add_sequence(ids[i]) == status::success);
    fill(cache, ids[i], 0, lengths[i], static_cast<uint32_t>(i + 1));
  }
  const std::vector<int64_t> others{ids[0], ids[2]};
  const auto untouched = paged_fixtures::take_dump(cache, others);
  // Sequence 2 alone, with its own budget.
  std::mt19937 rng(4);
  const auto queries = gaussian(rng, static_cast<size_t>(model.layers) * 4 * model.q_heads * model.head_dim);
  const auto obs_positions = iota_positions(20, 4);
  REQUIRE(cpu::compress(snapkv({.budget = token_budget::of_tokens(10), .window = 4}), cache, ids[1], model,
                        {queries, obs_positions}) == status::success);
  CHECK(paged_fixtures::take_dump(cache, others) == untouched);
  CHECK(cache.usage(ids[1]).tokens == 4 * 10);
  // The others, with different budgets and policies.
  REQUIRE(cpu::compress(streaming_llm({.budget = token_budget::of_tokens(12), .sinks = 4}), cache, ids[0], model, {}) ==
          status::success);
  REQUIRE(cpu::compress(h2o({.budget = token_budget::of_tokens(20), .recent = 4}), cache, ids[2], model, {}) ==
          status::success);
  CHECK(cache.usage(ids[0]).tokens == 4 * 12);
  CHECK(cache.usage(ids[2]).tokens == 4 * 20);
  CHECK(cache.pool().used_blocks == cache.usage(ids[0]).blocks + cache.usage(ids[1]).blocks + cache.usage(ids[2]).blocks);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
}

TEST_CASE("fp16 and bf16 stores round K/V to nearest even and read them back as fp32", "[cpu][cache]") {
  const attention_shape one{1, 1, 1, 4};
  const std::vector<float> k{1.f / 3.f, 65519.f, -1e-8f, 3.14159265f}, v{1e5f, -2.5f, 0.1f, 1.f + 1.f / 1024.f};
  auto check = [&](auto tag) {
    using T = decltype(tag);
    auto cache = make_cache<paged_cache<T>>({one, 2, 2, 1, 4});
    REQUIRE(cache.add_sequence(0) == status::success);
    REQUIRE(cache.append(0, iota_positions(0, 1), k, v) == status::success);
    std::vector<int32_t> p(1);
    std::vector<float> keys(4), values(4), m(1);
    REQUIRE(cache.read_head(0, 0, 0, p, keys, m) == status::success);
    REQUIRE(cache.read_values(0, 0, 0, values) == status::success);
    for (size_t c = 0; c < 4; ++c) {
      CHECK(keys[c] == paged_fixtures::stored<T>(k[c]));
      CHECK(values[c] == paged_fixtures::stored<T>(v[c]));
    }
  };
  check(float16{});
  check(bfloat16{});
  CHECK(paged_fixtures::stored<float16>(65519.f) == 65504.f);
  CHECK(std::isinf(paged_fixtures::stored<float16>(1e5f)));
  CHECK(paged_fixtures::stored<bfloat16>(1.f + 1.f / 1024.f) == 1.f);
}

TEST_CASE("a compile-time head dim gives the same cache as a run-time one", "[cpu][cache]") {
  auto fixed = make_cache<paged_cache<float, 8>>(small_config());
  auto dynamic = make_cache<paged_cache<float>>(small_config());
  REQUIRE(dynamic.add_sequence(0) == status::success);
  REQUIRE(fixed.add_sequence(0) == status::success);
  fill(fixed, 0, 0, 30, 5);
  fill(dynamic, 0, 0, 30, 5);
  const auto p = ada_kv({.budget = token_budget::of_tokens(10), .window = 4});
  std::mt19937 rng(6);
  const auto queries = gaussian(rng, static_cast<size_t>(model.layers) * 4 * model.q_heads * model.head_dim);
  const auto positions = iota_positions(26, 4);
  REQUIRE(cpu::compress(p, fixed, 0, model, {queries, positions}) == status::success);
  REQUIRE(cpu::compress(p, dynamic, 0, model, {queries, positions}) == status::success);
  const std::vector<int64_t> seqs{0};
  CHECK(paged_fixtures::take_dump(fixed, seqs) == paged_fixtures::take_dump(dynamic, seqs));
  CHECK(fixed.head_dim() == 8);
}

TEST_CASE("paged decode attention equals attend_head on the gathered head", "[cpu][cache][decode]") {
  auto cache = make_cache<paged_cache<float>>(small_config());
  REQUIRE(cache.add_sequence(0) == status::success);
  fill(cache, 0, 0, 23, 8);
  // Scatter the slots first, so the table walk matters.
  REQUIRE(cpu::compress(streaming_llm({.budget = token_budget::of_tokens(13), .sinks = 3}), cache, 0, model, {}) ==
          status::success);
  std::mt19937 rng(10);
  const auto q = gaussian(rng, static_cast<size_t>(model.q_heads) * model.head_dim);
  for (const auto acc : {decode_accumulation::sum, decode_accumulation::squared_sum})
    for (const auto reduce : {gqa_reduce::mean, gqa_reduce::max, gqa_reduce::sum}) {
      CAPTURE(static_cast<int>(acc), static_cast<int>(reduce));
      const int32_t layer = 1;
      std::vector<float> out(q.size()), expected(q.size()), scratch;
      std::vector<std::vector<float>> metrics_before(2), expected_metrics(2);
      std::vector<std::vector<float>> keys(2), values(2);
      for (int32_t h = 0; h < 2; ++h) {
        const auto n = static_cast<size_t>(cache.head_length(0, layer, h));
        std::vector<int32_t> p(n);
        keys[h].resize(n * 8);
        values[h].resize(n * 8);
        metrics_before[h].resize(n);
        REQUIRE(cache.read_head(0, layer, h, p, keys[h], metrics_before[h]) == status::success);
        REQUIRE(cache.read_values(0, layer, h, values[h]) == status::success);
        expected_metrics[h] = metrics_before[h];
        REQUIRE(cpu::attend_head(std::span<const float>(q).subspan(static_cast<size_t>(h) * 16, 16), 2, 8, keys[h],
                                 values[h], std::span<float>(expected).subspan(static_cast<size_t>(h) * 16, 16), acc,
                                 reduce, expected_metrics[h], scratch) == status::success);
      }
      REQUIRE(cpu::decode_attention(cache, 0, layer, model.q_heads, q, out, acc, reduce, scratch) == status::success);
      CHECK(out == expected);
      for (int32_t h = 0; h < 2; ++h) {
        const auto n = static_cast<size_t>(cache.head_length(0, layer, h));
        std::vector<int32_t> p(n);
        std::vector<float> k(n * 8), m(n);
        REQUIRE(cache.read_head(0, layer, h, p, k, m) == status::success);
        CHECK(m == expected_metrics[h]);
      }
    }
}

TEST_CASE("key re-rotation runs on the paged cache as on the dense cache", "[cpu][cache]") {
  auto p = streaming_llm({.budget = token_budget::of_tokens(6), .sinks = 2});
  p.positions = position_mode::rerotate;
  auto dense = fixtures::make_cache(model, 20, 0, 11);
  auto cache = make_cache<paged_cache<float>>(small_config());
  REQUIRE(cache.add_sequence(0) == status::success);
  const auto [k, v] = paged_fixtures::dense_rows(dense.cache, 20);
  REQUIRE(cache.append(0, iota_positions(0, 20), k, v) == status::success);
  REQUIRE(cpu::compress(p, dense.cache, 0, model, {}) == status::success);
  REQUIRE(cpu::compress(p, cache, 0, model, {}) == status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      std::vector<int32_t> pos(6);
      std::vector<float> keys(48), m(6);
      REQUIRE(cache.read_head(0, l, h, pos, keys, m) == status::success);
      const auto dk = dense.cache.keys(0, l, h);
      const auto dp = dense.cache.positions(0, l, h);
      CHECK(pos == std::vector<int32_t>(dp.begin(), dp.end()));
      CHECK(keys == std::vector<float>(dk.begin(), dk.end()));
    }
}

TEST_CASE("freeing a sequence returns every block, and its id can come back", "[cpu][cache]") {
  auto cache = make_cache<paged_cache<float>>(small_config());
  REQUIRE(cache.add_sequence(9) == status::success);
  fill(cache, 9, 0, 17, 3);
  CHECK(cache.pool().used_blocks == 4 * 5);
  REQUIRE(cache.free_sequence(9) == status::success);
  CHECK_FALSE(cache.contains(9));
  CHECK(cache.pool().used_blocks == 0);
  CHECK(cache.usage(9) == memory_usage{});
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
  REQUIRE(cache.add_sequence(9) == status::success);
  CHECK(cache.head_length(9, 0, 0) == 0);
}

TEST_CASE("block tables find every live id and no freed one through any churn of adds and frees",
          "[cpu][cache]") {
  // The id index is open addressing with deletions that shift entries back. Its 2-128
  // entries make probe runs collide and wrap often; small ids, multiples of 2^32 and ids
  // near INT64_MAX come and go.
  for (const int32_t rows : {1, 3, 8, 64}) {
    block_tables t;
    REQUIRE(block_tables::create({model, 4, 8, rows, 16}, 0, t) == status::success);
    std::mt19937_64 rng(static_cast<uint64_t>(rows));
    std::vector<int64_t> pool_of_ids;
    for (int64_t i = 0; i < 2 * rows; ++i) {
      pool_of_ids.push_back(i);
      pool_of_ids.push_back((i + 1) << 32);
      pool_of_ids.push_back(std::numeric_limits<int64_t>::max() - i);
    }
    std::map<int64_t, int32_t> live;  // id -> row
    for (int step = 0; step < 4000; ++step) {
      const int64_t id = pool_of_ids[rng() % pool_of_ids.size()];
      if (live.count(id)) {
        REQUIRE(t.free_sequence(id) == status::success);
        live.erase(id);
      } else if (static_cast<int32_t>(live.size()) < rows) {
        REQUIRE(t.add_sequence(id) == status::success);
        live[id] = t.sequence_slot(id);
      } else {
        REQUIRE(t.add_sequence(id) == status::pool_exhausted);
      }
      for (const int64_t other : pool_of_ids) {
        const auto it = live.find(other);
        REQUIRE(t.sequence_slot(other) == (it == live.end() ? -1 : it->second));
        if (it != live.end()) REQUIRE(t.sequence_id(it->second) == other);
      }
    }
  }
}

TEST_CASE("a batch that names every row once is accepted, and a repeat anywhere in it is refused", "[cpu][cache]") {
  constexpr int32_t rows = 16;
  block_tables t;
  REQUIRE(block_tables::create({model, 4, 8 * rows, rows, 4}, 0, t) == status::success);
  std::vector<int64_t> seqs;
  for (int64_t s = 0; s < rows; ++s) {
    REQUIRE(t.add_sequence(100 + s) == status::success);
    seqs.push_back(100 + s);
  }
  const auto noop = [] { return status::success; };
  std::vector<int64_t> slots(static_cast<size_t>(rows) * model.kv_heads);
  // Twice over: the second batch must not see the first one's marks as repeats.
  REQUIRE(t.append(seqs, 0, 1, 1, slots, noop) == status::success);
  REQUIRE(t.append(seqs, 0, 1, 1, slots, noop) == status::success);
  std::vector<int64_t> repeated(seqs);
  repeated.back() = seqs.front();
  CHECK(t.append(repeated, 0, 1, 1, slots, noop) == status::invalid_argument);
  std::vector<int32_t> kept;  // [seq][layer][head]: layer 0 holds 2 tokens a head, layer 1 none
  for (int32_t s = 0; s < rows; ++s)
    for (int32_t l = 0; l < model.layers; ++l) kept.insert(kept.end(), static_cast<size_t>(model.kv_heads), l == 0 ? 1 : 0);
  CHECK(t.truncate(repeated, kept) == status::invalid_argument);
  CHECK(t.truncate(seqs, kept) == status::success);
  CHECK(t.length(seqs.back(), 0, 0) == 1);
}

TEST_CASE("batch marks find every repeat and no false one across epoch wraps", "[cpu][cache]") {
  // block_tables' uint32_t epoch wraps after 2^32 batches; an 8-bit one runs the same code
  // through the wrap every 255 batches (epochs 1 to 255: 0 is what unnamed rows hold). Row 0
  // is named every 255th batch only, so each time it comes back its mark holds the epoch
  // current again: without the clear at the wrap it would look named already.
  constexpr int32_t rows = 5;
  constexpr int32_t period = 255;
  detail::batch_marks<uint8_t> marks(rows);
  std::mt19937 rng(7);
  std::uniform_int_distribution<int32_t> pick(1, rows - 1), size(0, 2 * rows);
  for (int32_t batch = 0; batch < 4 * period + 3; ++batch) {
    CAPTURE(batch);
    marks.begin_batch();
    if (batch % period == 0) REQUIRE(marks.first_visit(0));
    std::set<int32_t> named{batch % period == 0 ? 0 : -1};
    for (int32_t i = size(rng); i > 0; --i) {
      const int32_t row = pick(rng);
      REQUIRE(marks.first_visit(row) == named.insert(row).second);
    }
  }
}
