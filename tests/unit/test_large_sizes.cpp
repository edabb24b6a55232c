// Offsets and sizes that pass 2^31 elements are 64-bit (design.md, docs/reliability.md):
//  - computed: block tables whose slots lie past 2^31 (a block of 2^20 tokens), the slot
//    mapping of an append, the compaction moves and metric writes of an apply, memory
//    accounting and buffer sizes of a terabyte pool, all without allocating the pool;
//  - real: a device-layout cache whose K/V pool holds 2^32 fp16 elements (8 GiB each),
//    mapped without reserving memory (MAP_NORESERVE), so only the pages the test touches are
//    committed: append, read, compaction and rewrite through the host mover at element
//    offsets past 2^31.
#include <catch2/catch.hpp>

#include <sys/mman.h>

#include <cstdint>
#include <limits>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;

namespace {
constexpr int64_t two_31 = int64_t{1} << 31;

//! A caller's buffer mapped without reserving memory; pages are committed when touched.
struct sparse_buffer {
  explicit sparse_buffer(size_t bytes) : size(bytes) {
    void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    data = p == MAP_FAILED ? nullptr : p;
  }
  ~sparse_buffer() {
    if (data) munmap(data, size);
  }
  sparse_buffer(const sparse_buffer&) = delete;
  sparse_buffer& operator=(const sparse_buffer&) = delete;
  void* data = nullptr;
  size_t size = 0;
};
}  // namespace

TEST_CASE("large sizes: buffer sizes and accounting of a terabyte pool are exact", "[cpu][large]") {
  // 4096 heads, one block of 2^20 tokens each, d = 128, fp16: 2^32 slots, 2^39 K elements.
  const paged_cache_config c{{1, 4096, 4096, 128}, 1 << 20, 4096, 1, 1 << 20};
  REQUIRE(c.validate() == status::success);
  const paged_buffer_sizes s = buffer_sizes<float16>(c);
  CHECK(s.keys == size_t{1} << 40);
  CHECK(s.values == size_t{1} << 40);
  CHECK(s.positions == size_t{1} << 34);
  CHECK(s.metrics == size_t{1} << 34);
  CHECK(s.block_tables == 4096 * sizeof(int32_t));
  CHECK(s.lengths == 4096 * sizeof(int32_t));
  CHECK(s.total() == (size_t{1} << 41) + (size_t{1} << 35) + 2 * 4096 * sizeof(int32_t));
  CHECK(slot_bytes<float16>(128) * c.block_size == int64_t{520} << 20);
  // A single head of up to 2^31 - 1 tokens: its table length needs no 64-bit sum to stay exact.
  const paged_cache_config longest{{1, 1, 1, 128}, 16, 1, 1, std::numeric_limits<int32_t>::max()};
  CHECK(longest.max_blocks_per_head() == 1 << 27);
}

TEST_CASE("large sizes: slot mapping, compaction moves and metric slots past 2^31 are exact", "[cpu][large]") {
  const int32_t heads = 4096, bs = 1 << 20;
  const paged_cache_config c{{1, heads, heads, 128}, bs, heads, 1, bs};
  const int64_t block_bytes = slot_bytes<float16>(128) * bs;
  block_tables t;
  REQUIRE(block_tables::create(c, block_bytes, t) == status::success);
  REQUIRE(t.add_sequence(0) == status::success);

  // Three tokens to every head: head h takes block h; its slots are h * 2^20 + 0..2.
  std::vector<int64_t> slots(static_cast<size_t>(3) * heads);  // [1 layer][3 tokens][H]
  REQUIRE(t.append(0, 0, 1, 3, slots, [] { return status::success; }) == status::success);
  int64_t largest = 0;
  for (int32_t tok = 0; tok < 3; ++tok)
    for (int32_t h = 0; h < heads; ++h) {
      const int64_t slot = slots[static_cast<size_t>(tok) * heads + static_cast<size_t>(h)];
      const int64_t block = t.blocks(0, 0, h)[0];
      REQUIRE(slot == block * bs + tok);
      largest = std::max(largest, slot);
    }
  CHECK(largest == (int64_t{heads} - 1) * bs + 2);
  CHECK(largest > two_31);
  CHECK(largest * 128 > 255 * two_31);  // the element offset of its key row
  CHECK(t.physical_slot(t.blocks(0, 0, heads - 1), 2) == largest);

  // Keep slots 0 and 2 of every head, with metrics: one move (2 -> 1) per head.
  eviction_plan plan(1, heads);
  const std::vector<int32_t> lengths(static_cast<size_t>(heads), 3);
  for (int32_t h = 0; h < heads; ++h) plan.set_head(0, h, 3, std::vector<int32_t>{0, 2});
  plan.metrics = ragged_rows(1, heads, lengths);
  compaction_steps steps;
  bool checked = false;
  REQUIRE(t.apply(0, plan, steps, [&](const compaction_steps& s) {
    REQUIRE(s.moves.size() == static_cast<size_t>(heads));
    REQUIRE(s.metric_slots.size() == static_cast<size_t>(3) * heads);
    for (int32_t h = 0; h < heads; ++h) {
      const int64_t base = static_cast<int64_t>(t.blocks(0, 0, h)[0]) * bs;
      CHECK(s.moves[static_cast<size_t>(h)].dst == base + 1);
      CHECK(s.moves[static_cast<size_t>(h)].src == base + 2);
      for (int32_t j = 0; j < 3; ++j) CHECK(s.metric_slots[static_cast<size_t>(h) * 3 + static_cast<size_t>(j)] == base + j);
    }
    CHECK(s.moves.back().src > two_31);
    checked = true;
    return status::success;
  }) == status::success);
  CHECK(checked);
  CHECK(t.length(0, 0, heads - 1) == 2);

  // Accounting in bytes: 4096 blocks of 520 MiB.
  const memory_usage u = t.usage(0);
  CHECK(u.tokens == int64_t{2} * heads);
  CHECK(u.blocks == heads);
  CHECK(u.bytes == int64_t{heads} * block_bytes);
  CHECK(u.bytes > int64_t{1} << 41);
  CHECK(t.pool_state().used_bytes() == u.bytes);
  CHECK(cache_invariants::check_tables(t).empty());
}

TEST_CASE("large sizes: a cache whose K/V pool holds 2^32 elements, at offsets past 2^31", "[cpu][large]") {
  // 64 heads, one block of 2^19 tokens each, d = 128: keys [64][2^19][128] fp16 = 8 GiB,
  // mapped without reserving memory. Head h writes at element offset h * 2^26 (head 63:
  // 4.2e9, past 2^31 and near 2^32).
  const int32_t heads = 64, bs = 1 << 19, d = 128;
  const paged_cache_config c{{1, heads, heads, d}, bs, heads, 1, bs};
  const paged_buffer_sizes sizes = buffer_sizes<float16>(c);
  REQUIRE(sizes.keys == size_t{1} << 33);
  sparse_buffer keys(sizes.keys), values(sizes.values), positions(sizes.positions), metrics(sizes.metrics);
  REQUIRE((keys.data && values.data && positions.data && metrics.data));
  std::vector<int32_t> tables(sizes.block_tables / sizeof(int32_t)), lengths(sizes.lengths / sizeof(int32_t));
  const device_buffers<float16> buffers{{static_cast<float16*>(keys.data), static_cast<float16*>(values.data),
                                         static_cast<int32_t*>(positions.data), static_cast<float*>(metrics.data),
                                         tables.data(), lengths.data()},
                                        sizes};
  device_paged_cache<float16> cache;
  REQUIRE(device_paged_cache<float16>::create(c, device_storage<float16>{buffers, host_mover{}}, cache) == status::success);
  REQUIRE(cache.add_sequence(7) == status::success);

  // Token t of head h holds K = h + t / 4, V = -(h + t / 4) in every dimension (exact in fp16).
  const int32_t tokens = 3;
  std::vector<float16> k(static_cast<size_t>(tokens) * heads * d), v(k.size());  // [1][t][H][d]
  for (int32_t t = 0; t < tokens; ++t)
    for (int32_t h = 0; h < heads; ++h)
      for (int32_t x = 0; x < d; ++x) {
        const size_t i = (static_cast<size_t>(t) * heads + static_cast<size_t>(h)) * d + static_cast<size_t>(x);
        k[i] = from_float<float16>(static_cast<float>(h) + static_cast<float>(t) / 4.f);
        v[i] = from_float<float16>(-(static_cast<float>(h) + static_cast<float>(t) / 4.f));
      }
  REQUIRE(cache.append(7, paged_fixtures::iota_positions(100, tokens), k, v) == status::success);
  const int64_t last_row = static_cast<int64_t>(cache.head_blocks(7, 0, heads - 1)[0]) * bs * d;
  CHECK(last_row > two_31);
  // The K element the host mover wrote for head 63, token 2, read straight from the buffer.
  CHECK(to_float(static_cast<const float16*>(keys.data)[last_row + 2 * d + 5]) == 63.5f);

  const auto check_head = [&](int32_t h, const std::vector<int32_t>& want_tokens) {
    const size_t n = want_tokens.size();
    std::vector<int32_t> p(n);
    std::vector<float> kk(n * d), vv(n * d), m(n);
    REQUIRE(cache.read_head(7, 0, h, p, kk, m) == status::success);
    REQUIRE(cache.read_values(7, 0, h, vv) == status::success);
    for (size_t j = 0; j < n; ++j) {
      const float want = static_cast<float>(h) + static_cast<float>(want_tokens[j]) / 4.f;
      CHECK(p[j] == 100 + want_tokens[j]);
      CHECK(kk[j * d] == want);
      CHECK(kk[j * d + d - 1] == want);
      CHECK(vv[j * d + 3] == -want);
    }
  };
  check_head(0, {0, 1, 2});
  check_head(heads - 1, {0, 1, 2});

  // Compaction through the host mover: keep tokens 0 and 2, so token 2 moves into slot 1.
  eviction_plan plan(1, heads);
  for (int32_t h = 0; h < heads; ++h) plan.set_head(0, h, tokens, std::vector<int32_t>{0, 2});
  REQUIRE(cache.apply(7, plan) == status::success);
  check_head(heads - 1, {0, 2});
  check_head(heads / 2, {0, 2});

  // Key re-rotation writes back at the same offsets.
  const std::vector<int32_t> new_positions{0, 1};
  std::vector<float> new_keys(static_cast<size_t>(2) * d, 1.5f);
  REQUIRE(cache.rewrite_head(7, 0, heads - 1, new_positions, new_keys) == status::success);
  CHECK(to_float(static_cast<const float16*>(keys.data)[last_row + d + 7]) == 1.5f);
  CHECK(cache_invariants::check_tables(cache.tables()).empty());
  CHECK(cache_invariants::check_mirror(cache.tables(), tables, lengths).empty());
  REQUIRE(cache.free_sequence(7) == status::success);
  CHECK(cache.pool().used_blocks == 0);
}
