// The planner's host arithmetic (ranking.cuh), so it needs no GPU: the keys of its second sort
// (group_key_format), which one device-wide sort must order as a segmented sort by group would,
// i.e. by (group, score bits, local), with each group's padding after its candidates and before
// the next group, for every size the planner accepts; and its workspace, which holds sort
// buffers only for the budgets that sort.
#include <catch2/catch.hpp>

#include <algorithm>
#include <cstdint>
#include <random>
#include <tuple>
#include <vector>

#include "kvtrim/cuda.cuh"

namespace {

namespace cu = kvtrim::cuda;

struct candidate {
  int64_t group;
  uint32_t score;
  uint32_t local;
  bool padding;
};

//! The order the segmented sort gives: group first (the segments), then the key.
bool before(const candidate& x, const candidate& y) {
  const auto rank = [](const candidate& c) {
    return std::make_tuple(c.group, c.padding, c.padding ? 0u : c.score, c.padding ? 0u : c.local);
  };
  return rank(x) < rank(y);
}

}  // namespace

TEST_CASE("second-sort keys sort as (group, score, local), padding last in its group", "[cuda]") {
  const int64_t groups = GENERATE(1, 2, 8, 256);
  const int64_t locals = GENERATE(int64_t{1}, int64_t{1000}, int64_t{8} * 131072);
  CAPTURE(groups, locals);
  const cu::detail::group_key_format f = cu::detail::group_key_format_of(groups, locals);
  CHECK(f.end_bit() <= 64);
  CHECK((int64_t{1} << f.local_bits) >= locals);
  CHECK((int64_t{1} << f.group_bits) >= groups);

  std::mt19937 rng(7);
  std::vector<candidate> items;
  for (int i = 0; i < 4000; ++i) {
    const auto g = std::uniform_int_distribution<int64_t>(0, groups - 1)(rng);
    // Scores from a few values so that ties on the score are common; all-ones is a NaN's.
    const auto score = std::uniform_int_distribution<uint32_t>(0, 3)(rng) * 0x40000000u +
                       std::uniform_int_distribution<uint32_t>(0, 2)(rng);
    const auto local = std::uniform_int_distribution<uint32_t>(0, static_cast<uint32_t>(locals - 1))(rng);
    items.push_back({g, score, local, i % 10 == 0});
  }
  const auto key = [&](const candidate& c) { return c.padding ? f.padding(c.group) : f.encode(c.group, c.score, c.local); };
  for (const candidate& c : items)
    if (!c.padding) CHECK(f.local_of(key(c)) == c.local);
  // Sorted by key, neighbours must be in the segmented sort's order (equal keys: equal ranks).
  std::vector<candidate> sorted = items;
  std::stable_sort(sorted.begin(), sorted.end(), [&](const candidate& x, const candidate& y) { return key(x) < key(y); });
  int out_of_order = 0, merged = 0;
  for (size_t i = 0; i + 1 < sorted.size(); ++i) {
    const candidate& x = sorted[i];
    const candidate& y = sorted[i + 1];
    out_of_order += before(y, x) ? 1 : 0;
    merged += key(x) == key(y) && before(x, y) ? 1 : 0;
  }
  CHECK(out_of_order == 0);
  CHECK(merged == 0);
  if (f.end_bit() < 64)
    for (const candidate& c : items) CHECK(key(c) >> f.end_bit() == 0);  // the sort reads end_bit bits only
}

TEST_CASE("second-sort keys fit 64 bits for every size the planner accepts", "[cuda]") {
  // can_implement bounds a plan's items, groups * locals, by 2^31 - 1: at the edges, group and
  // local bits stay within 32 and the keys within 64 bits.
  const int64_t most = (int64_t{1} << 31) - 1;
  for (const int64_t groups : {int64_t{1}, int64_t{2}, int64_t{3}, int64_t{5}, int64_t{65535}, int64_t{1} << 16, most}) {
    const int64_t locals = most / groups;
    const cu::detail::group_key_format f = cu::detail::group_key_format_of(groups, locals);
    CAPTURE(groups, locals, f.group_bits, f.local_bits);
    CHECK(f.group_bits + f.local_bits <= 32);
    CHECK(f.end_bit() <= 64);
    CHECK(f.local_of(f.encode(groups - 1, 0xfffffffeu, static_cast<uint32_t>(locals - 1))) == locals - 1);
    CHECK(f.encode(groups - 1, 0xfffffffeu, static_cast<uint32_t>(locals - 1)) < f.padding(groups - 1));
  }
}

TEST_CASE("plan workspace: per-head budgets and Ada-KV select without sort buffers, KV-Compress sorts", "[cuda]") {
  cu::plan_arguments<float> a;
  a.pool.layers = 2;
  a.pool.heads = 4;
  a.pool.head_dim = 8;
  a.batch = 3;
  a.layer_count = 2;
  a.stride = 1000;
  const int64_t heads = 3 * 2 * 4, items = heads * 1000;
  const auto bytes = [](int64_t count, size_t size) { return cu::detail::align_up(static_cast<size_t>(count) * size); };
  // Rank keys, head bounds, four per-head and two per-group counters.
  const size_t selecting = bytes(items, 8) + 2 * bytes(heads, 8) + bytes(heads * 4, 4) + bytes(2 * 3, 4);  // groups: the 3 sequences
  for (const auto kind : {cu::device_budget::kind::uniform, cu::device_budget::kind::pyramid}) {
    a.budget.type = kind;
    CHECK(cu::workspace_size(a) == selecting);
  }
  // Ada-KV selects per layer (6 groups): its group counters and select state (a prefix, three
  // counters and 256 bins per group), no sort.
  a.budget.type = cu::device_budget::kind::adaptive;
  const size_t per_layer = bytes(items, 8) + 2 * bytes(heads, 8) + bytes(heads * 4, 4) + bytes(2 * 6, 4);
  CHECK(cu::workspace_size(a) == per_layer + bytes(6, 8) + bytes(6 * 3, 4) + bytes(6 * 256, 4));
  // KV-Compress: two key / value pairs for its sorts, and CUB's storage, which CUB sizes for
  // the device (none here: 0).
  a.budget.type = cu::device_budget::kind::global_blocks;
  CHECK(cu::workspace_size(a) >= selecting + 2 * bytes(items, 8) + 2 * bytes(items, 4));
}

TEST_CASE("Ada-KV group keys order candidates as (score desc, head), and their digits cover them", "[cuda]") {
  struct candidate {
    float score;
    int32_t head, position;
  };
  for (const int32_t heads : {1, 2, 8, 32, 65535}) {
    const int32_t head_bits = cu::detail::bits_for(heads);
    CAPTURE(heads);
    CHECK(8 * cu::detail::group_key_digits(heads) >= 32 + head_bits);
    CHECK(8 * (cu::detail::group_key_digits(heads) - 1) < 32 + head_bits);  // no digit of zeros only
    std::mt19937 rng(static_cast<uint32_t>(heads));
    std::uniform_int_distribution<int32_t> head_of(0, heads - 1), position_of(0, 1 << 20), pick(0, 5);
    const float scores[] = {-2.5f, -0.f, 0.f, 1e-30f, 0.25f, 7.f};  // -0 and +0 are one score
    std::vector<candidate> items;
    for (int i = 0; i < 150; ++i) items.push_back({scores[pick(rng)], head_of(rng), position_of(rng)});
    const auto key = [&](const candidate& c) {
      const uint64_t rank_key =
          static_cast<uint64_t>(~cu::detail::ordered_bits(c.score)) << 32 | static_cast<uint32_t>(c.position);
      return cu::detail::group_key(rank_key, c.head, head_bits);
    };
    for (const candidate& x : items)
      for (const candidate& y : items) {
        const bool better = x.score != y.score ? x.score > y.score : x.head < y.head;
        const bool same = x.score == y.score && x.head == y.head;
        CHECK((key(x) < key(y)) == better);
        CHECK((key(x) == key(y)) == same);
        CHECK((key(x) & cu::detail::low_bits(64 - 32 - head_bits)) == 0);  // zeros below the head
      }
  }
}

TEST_CASE("KV-Compress head-score keys sort each head protected first, then by score desc, padding last", "[cuda]") {
  const cu::detail::plan_layout l{.heads = 70};
  const int32_t bits = cu::detail::head_score_key_bits(l);
  CHECK(bits == 32 + 7);
  const auto rank_key = [](float score, int32_t position) {
    return static_cast<uint64_t>(~cu::detail::ordered_bits(score)) << 32 | static_cast<uint32_t>(position);
  };
  const uint64_t protected_key = 0, padding = ~uint64_t{0};
  for (const int64_t head : {int64_t{0}, int64_t{1}, int64_t{69}}) {
    CAPTURE(head);
    const uint64_t prot = cu::detail::head_score_key(head, protected_key);
    const uint64_t high = cu::detail::head_score_key(head, rank_key(3.f, 100));
    const uint64_t low = cu::detail::head_score_key(head, rank_key(-3.f, 5));
    const uint64_t pad = cu::detail::head_score_key(head, padding);
    CHECK(prot < high);
    CHECK(high < low);
    CHECK(low < pad);
    CHECK(cu::detail::head_score_key(head, rank_key(0.5f, 1)) == cu::detail::head_score_key(head, rank_key(0.5f, 9)));
    CHECK(pad < cu::detail::head_score_key(head + 1, protected_key));  // heads do not interleave
    CHECK((pad >> bits) == 0);                                          // within the sorted bits
    // The score comes back from the low 32 bits (global_keys_kernel).
    CHECK(cu::detail::from_ordered_bits(~static_cast<uint32_t>(low)) == -3.f);
  }
}
