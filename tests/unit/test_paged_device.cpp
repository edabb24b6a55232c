// The device variant of the paged cache, run through its host fallback mover over host
// memory standing in for device buffers: the pool and the table mirror live in the caller's
// buffers, and the mirror follows the host tables after every operation.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <span>
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
const paged_cache_config config{model, 4, 40, 2, 32};

template <kv_element T>
std::vector<T> to_storage(const std::vector<float>& x) {
  std::vector<T> out(x.size());
  std::transform(x.begin(), x.end(), out.begin(), [](float f) { return from_float<T>(f); });
  return out;
}

//! Adds `seqs` to a host and a device cache, each with the same `tokens` random tokens.
template <kv_element T, class Host, class Device>
void fill_both(Host& host, Device& device, const std::vector<int64_t>& seqs, int32_t tokens, std::mt19937& rng) {
  for (const int64_t seq : seqs) {
    REQUIRE(host.add_sequence(seq) == status::success);
    REQUIRE(device.add_sequence(seq) == status::success);
    const size_t count = static_cast<size_t>(model.layers) * tokens * model.kv_heads * model.head_dim;
    const auto k = gaussian<T>(rng, count), v = gaussian<T>(rng, count);
    REQUIRE(host.append(seq, iota_positions(0, tokens), k, v) == status::success);
    REQUIRE(device.append(seq, iota_positions(0, tokens), to_storage<T>(k), to_storage<T>(v)) == status::success);
  }
}
}  // namespace

TEST_CASE("the device cache writes its pool and table mirror into the caller's buffers", "[cpu][cache][device]") {
  paged_fixtures::device_memory<bfloat16> memory(config);
  device_paged_cache<bfloat16> cache;
  REQUIRE(device_paged_cache<bfloat16>::create(config, device_storage<bfloat16>{memory.buffers(), host_mover{}}, cache) ==
          status::success);
  // create() initialised the mirror: no blocks, no tokens.
  CHECK(std::all_of(memory.tables.begin(), memory.tables.end(), [](int32_t b) { return b == block_tables::no_block; }));
  CHECK(std::all_of(memory.lengths.begin(), memory.lengths.end(), [](int32_t n) { return n == 0; }));

  REQUIRE(cache.add_sequence(12) == status::success);
  std::mt19937 rng(2);
  const size_t count = static_cast<size_t>(model.layers) * 9 * model.kv_heads * model.head_dim;
  const auto k = gaussian<bfloat16>(rng, count), v = gaussian<bfloat16>(rng, count);
  const auto k16 = to_storage<bfloat16>(k), v16 = to_storage<bfloat16>(v);
  REQUIRE(cache.append(12, iota_positions(0, 9), k16, v16) == status::success);
  CHECK(cache_invariants::check_mirror(cache.tables(), memory.tables, memory.lengths).empty());

  // Token 5 of head (1, 0) is where the mirror says, in the caller's key buffer.
  const int32_t row = cache.tables().sequence_slot(12);
  const size_t head = (static_cast<size_t>(row) * model.layers + 1) * model.kv_heads + 0;
  CHECK(memory.lengths[head] == 9);
  const int32_t block = memory.tables[head * config.max_blocks_per_head() + 5 / 4];
  const size_t slot = static_cast<size_t>(block) * 4 + 5 % 4;
  const size_t src = ((1 * 9 + 5) * static_cast<size_t>(model.kv_heads) + 0) * model.head_dim;
  for (size_t c = 0; c < 8; ++c) CHECK(to_float(memory.keys[slot * 8 + c]) == k[src + c]);
  CHECK(memory.positions[slot] == 5);

  // Compression: planned on the host through read_head, applied through the mover.
  const auto p = kv_compress({.budget = token_budget::of_tokens(4), .block_size = 4, .protected_window = 2});
  cpu::compression_result planned;
  REQUIRE(cpu::plan(p, cache, 12, model, {}, 0, model.layers, planned) == status::success);
  const int64_t before = cache.pool().used_blocks;
  REQUIRE(cache.apply(12, planned.plan) == status::success);
  CHECK(cache.pool().used_blocks < before);
  CHECK(cache_invariants::check_mirror(cache.tables(), memory.tables, memory.lengths).empty());
  CHECK(cache_invariants::check_tables(cache.tables()).empty());

  REQUIRE(cache.free_sequence(12) == status::success);
  CHECK(cache_invariants::check_mirror(cache.tables(), memory.tables, memory.lengths).empty());
  CHECK(std::all_of(memory.lengths.begin(), memory.lengths.end(), [](int32_t n) { return n == 0; }));
}

TEST_CASE("the device cache holds what the host cache holds after the same operations", "[cpu][cache][device]") {
  paged_fixtures::device_memory<float16> memory(config);
  device_paged_cache<float16, 8> device;
  REQUIRE(device_paged_cache<float16, 8>::create(config, device_storage<float16>{memory.buffers(), host_mover{}}, device) ==
          status::success);
  auto host = paged_fixtures::make_cache<paged_cache<float16, 8>>(config);
  std::mt19937 rng(4);
  const std::vector<int64_t> seqs{0, 1};
  fill_both<float16>(host, device, seqs, 20, rng);
  const auto queries = gaussian(rng, static_cast<size_t>(model.layers) * 4 * model.q_heads * model.head_dim, 2.f);
  const auto observed = iota_positions(16, 4);
  const auto p = ada_kv({.budget = token_budget::of_tokens(7), .window = 3});
  REQUIRE(cpu::compress(p, host, 1, model, {queries, observed}) == status::success);
  cpu::compression_result planned;
  REQUIRE(cpu::plan(p, device, 1, model, {queries, observed}, 0, model.layers, planned) == status::success);
  REQUIRE(device.apply(1, planned.plan) == status::success);
  CHECK(paged_fixtures::take_dump(device, seqs) == paged_fixtures::take_dump(host, seqs));
  CHECK(device.tables() == host.tables());
  CHECK(device.pool() == host.pool());
}

TEST_CASE("truncate keeps each head's first slots, frees the rest and updates the mirror once",
          "[cpu][cache][device]") {
  paged_fixtures::device_memory<float> memory(config);
  struct journal_seen {
    int updates = 0;
    size_t table_writes = 0;
    std::vector<metadata_clear> clears;
  };
  struct counting_mover : host_mover {
    journal_seen* seen;
    status write_metadata(const metadata_params& p) const {
      ++seen->updates;
      seen->table_writes += p.table_writes.size();
      seen->clears.insert(seen->clears.end(), p.table_clears.begin(), p.table_clears.end());
      return host_mover::write_metadata(p);
    }
  };
  journal_seen seen;
  using cache_t = device_paged_cache<float, dynamic_head_dim, counting_mover>;
  cache_t device;
  REQUIRE(cache_t::create(config, device_storage<float, counting_mover>{memory.buffers(), counting_mover{{}, &seen}},
                          device) == status::success);
  auto host = paged_fixtures::make_cache<paged_cache<float>>(config);
  std::mt19937 rng(5);
  const std::vector<int64_t> seqs{3, 8};
  fill_both<float>(host, device, seqs, 13, rng);
  // [seq][layer][head]: 13 tokens (4 blocks of 4) down to 13, 9, 4, 1 / 2, 5, 8, 12.
  const std::vector<int32_t> lengths{13, 9, 4, 1, 2, 5, 8, 12};
  seen = {};
  REQUIRE(device.truncate(seqs, lengths) == status::success);
  CHECK(seen.updates == 1);  // one mirror update for the whole batch
  // Freed blocks travel as one run per head that freed any (all but the first), not an
  // entry each: 15 blocks in 7 runs, each starting where the head's kept blocks end.
  CHECK(seen.table_writes == 0);
  REQUIRE(seen.clears.size() == 7);
  // (sequence, head of its [L][H]) of each run, and the blocks that head keeps.
  const std::vector<std::tuple<int64_t, int64_t, int64_t>> runs{{3, 1, 3}, {3, 2, 1}, {3, 3, 1}, {8, 0, 1},
                                                                {8, 1, 2}, {8, 2, 2}, {8, 3, 3}};
  const int64_t max_blocks = config.max_blocks_per_head();
  int64_t freed = 0;
  for (size_t i = 0; i < runs.size(); ++i) {
    const auto [seq, head, kept] = runs[i];
    const int64_t row = device.tables().sequence_slot(seq);
    CHECK(seen.clears[i].first == (row * model.layers * model.kv_heads + head) * max_blocks + kept);
    CHECK(seen.clears[i].count == 4 - kept);
    freed += seen.clears[i].count;
  }
  CHECK(freed == 15);

  // The host cache applying the same prefixes as plans ends in the same state.
  for (size_t b = 0; b < seqs.size(); ++b) {
    eviction_plan plan(model.layers, model.kv_heads);
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h)
        plan.set_head(l, h, 13, iota_positions(0, lengths[(b * model.layers + l) * model.kv_heads + h]));
    REQUIRE(host.apply(seqs[b], plan) == status::success);
  }
  CHECK(device.tables() == host.tables());
  CHECK(paged_fixtures::take_dump(device, seqs) == paged_fixtures::take_dump(host, seqs));
  CHECK(device.head_length(8, 0, 0) == 2);
  CHECK(device.pool().used_blocks == 4 + 3 + 1 + 1 + 1 + 2 + 2 + 3);
  CHECK(cache_invariants::check_mirror(device.tables(), memory.tables, memory.lengths).empty());
  CHECK(cache_invariants::check_tables(device.tables()).empty());
}

TEST_CASE("a batch append_layer is one data step and one mirror update", "[cpu][cache][device]") {
  struct step_counts {
    int tokens = 0, metadata = 0;
  };
  struct counting_mover : host_mover {
    step_counts* counts;
    status write_tokens(const token_write_params<float, float>& p) const {
      ++counts->tokens;
      return host_mover::write_tokens(p);
    }
    status write_metadata(const metadata_params& p) const {
      ++counts->metadata;
      return host_mover::write_metadata(p);
    }
  };
  paged_fixtures::device_memory<float> memory(config);
  step_counts counts;
  using cache_t = device_paged_cache<float, dynamic_head_dim, counting_mover>;
  cache_t device;
  REQUIRE(cache_t::create(config, device_storage<float, counting_mover>{memory.buffers(), counting_mover{{}, &counts}},
                          device) == status::success);
  auto host = paged_fixtures::make_cache<paged_cache<float>>(config);
  std::mt19937 rng(6);
  const std::vector<int64_t> seqs{5, 1};
  fill_both<float>(host, device, seqs, 7, rng);
  const size_t per_sequence = static_cast<size_t>(model.kv_heads) * model.head_dim;  // one token
  const auto k = gaussian(rng, 2 * per_sequence), v = gaussian(rng, k.size());
  const std::vector<int32_t> positions{7, 9};  // each sequence its own position
  counts = {};
  REQUIRE(device.append_layer(seqs, 0, positions, k, v) == status::success);
  CHECK(counts.tokens == 1);
  CHECK(counts.metadata == 1);
  for (size_t b = 0; b < seqs.size(); ++b)
    REQUIRE(host.append_layer(seqs[b], 0, std::span<const int32_t>(positions).subspan(b, 1),
                              std::span<const float>(k).subspan(b * per_sequence, per_sequence),
                              std::span<const float>(v).subspan(b * per_sequence, per_sequence)) == status::success);
  CHECK(device.tables() == host.tables());
  CHECK(paged_fixtures::take_dump(device, seqs) == paged_fixtures::take_dump(host, seqs));
  CHECK(cache_invariants::check_mirror(device.tables(), memory.tables, memory.lengths).empty());
}

TEST_CASE("the device cache reports the buffer sizes it needs", "[cpu][cache][device]") {
  const paged_buffer_sizes s = buffer_sizes<bfloat16>({{32, 32, 8, 128}, 16, 1000, 8, 4096});
  CHECK(s.keys == 1000u * 16 * 128 * 2);
  CHECK(s.values == s.keys);
  CHECK(s.positions == 1000u * 16 * 4);
  CHECK(s.metrics == 1000u * 16 * 4);
  CHECK(s.block_tables == 8u * 32 * 8 * 256 * 4);
  CHECK(s.lengths == 8u * 32 * 8 * 4);
  CHECK(s.total() == s.keys + s.values + s.positions + s.metrics + s.block_tables + s.lengths);
}
