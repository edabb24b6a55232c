// Budget allocators: the reference formulas, their regimes and quirks.
#include <catch2/catch.hpp>

#include <algorithm>
#include <numeric>
#include <vector>

#include "kvtrim/kvtrim.hpp"

using namespace kvtrim;

TEST_CASE("pyramid integer form reproduces KVCache-Factory's per-layer budgets", "[cpu][budget]") {
  // Golden cases: C 64 and C 128 with w 8, beta 20, 5 layers, n 512 / 300.
  const std::vector<int32_t> c64{110, 83, 56, 29, 2}, c128{234, 177, 120, 63, 6};
  for (int32_t l = 0; l < 5; ++l) {
    CAPTURE(l);
    CHECK(pyramid_integer_select(l, 5, 64, 8, 512, 20) == c64[static_cast<size_t>(l)]);
    CHECK(pyramid_integer_select(l, 5, 128, 8, 300, 20) == c128[static_cast<size_t>(l)]);
    CHECK(pyramid_integer_select(l, 5, 200, 8, 300, 20) == 192);  // C <= n < 2(C - w): uniform
    CHECK(pyramid_integer_select(l, 5, 400, 8, 300, 20) == 392);  // n < C: more than the 292 candidates
  }
}

TEST_CASE("pyramid integer form clips the bottom layer to the prefix", "[cpu][budget]") {
  // n 240, C 128, w 8: max_num = 234 >= n - w = 232, so max 232, min 2(C-w) - 232 = 8, step 56.
  CHECK(pyramid_integer_select(0, 5, 128, 8, 240, 20) == 232);
  CHECK(pyramid_integer_select(4, 5, 128, 8, 240, 20) == 8);
  // One layer: no step.
  CHECK(pyramid_integer_select(0, 1, 64, 8, 512, 20) == 110);
}

TEST_CASE("pyramid real form follows kvpress", "[cpu][budget]") {
  // n 1000, keep 0.5, w 8, beta 20, 4 layers: min 25, max 975, step 316.67.
  CHECK(pyramid_real_keep(0, 4, 0.5f, 8, 1000, 20) == 975);
  CHECK(pyramid_real_keep(1, 4, 0.5f, 8, 1000, 20) == 658);
  CHECK(pyramid_real_keep(2, 4, 0.5f, 8, 1000, 20) == 342);
  CHECK(pyramid_real_keep(3, 4, 0.5f, 8, 1000, 20) == 25);
  // min 25 < w 64: falls back to the uniform ratio.
  CHECK(pyramid_real_keep(0, 4, 0.5f, 64, 1000, 20) == 500);
  // 448.5 - 31 * 14.0967741935... is 11.5 in Python (the product rounded first) and rounds
  // to 12; an FMA gives 11.4999999999999751 and 11, as nvcc's did on the device.
  CHECK(pyramid_real_keep(31, 32, 0.25f, 8, 920, 20) == 12);
}

TEST_CASE("pyramid real form keeps no candidate where it keeps fewer than the protected tokens", "[cpu][budget]") {
  // ratio 0.05 of 100 tokens keeps 5, below the 8 protected: the window stays, nothing else.
  const pyramid_budget real{.budget = token_budget::of_ratio(0.05f), .form = pyramid_form::real};
  for (int32_t layer = 0; layer < 4; ++layer) CHECK(real.nominal_select(layer, 4, 100, 8) == 0);
  // Ada-KV over that base: the layer's total is 0, not negative (it indexed before its scores).
  adaptive_budget<pyramid_budget> ada;
  ada.base = real;
  candidate_table t(1, 2);
  for (int32_t h = 0; h < 2; ++h) {
    auto& c = t.at(0, h);
    c.length = 100;
    c.next_position = 100;
    for (int32_t j = 0; j < 8; ++j) c.protected_slots.push_back(92 + j);
    for (int32_t j = 0; j < 92; ++j) c.ranked.push_back({static_cast<float>(j % 7), j, j});
    std::sort(c.ranked.begin(), c.ranked.end(), ranks_before);
  }
  std::vector<int32_t> select(2, -1);
  REQUIRE(ada.allocate(t, {0, 4, {}}, select) == status::success);
  CHECK(select == std::vector<int32_t>{0, 0});
}

TEST_CASE("pyramid context freezes the pyramid of a prompt of that length", "[cpu][budget]") {
  // C 35, w 8, beta 20, 5 layers, a 512-token prompt: min 1, max 53, step 13.
  pyramid_budget p{.budget = token_budget::of_tokens(35), .beta = 20, .form = pyramid_form::integer};
  p.context = 512;
  const std::vector<int32_t> full{53, 40, 27, 14, 1};  // the prompt's selections: cap - w
  for (int32_t l = 0; l < 5; ++l) {
    CAPTURE(l);
    CHECK(p.nominal_select(l, 5, 512, 8) == full[static_cast<size_t>(l)]);
    CHECK(p.nominal_select(l, 5, 4096, 8) == full[static_cast<size_t>(l)]);  // a longer head: the same cap
    // A 40-token head keeps min(40, cap): everything below layer 2.
    CHECK(p.nominal_select(l, 5, 40, 8) == std::min(32, full[static_cast<size_t>(l)]));
  }
  // Sized from its own length, the same 40-token head is in the uniform regime (C <= n < 2 (C - w)).
  p.context = 0;
  for (int32_t l = 0; l < 5; ++l) CHECK(p.nominal_select(l, 5, 40, 8) == 27);
  // A context below C is uniform too: every layer caps at C.
  p.context = 20;
  for (int32_t l = 0; l < 5; ++l) CHECK(p.nominal_select(l, 5, 40, 8) == 27);

  // The real form: keep 0.5 of a 1000-token prompt, w 8, 4 layers keeps 975, 658, 342, 25.
  pyramid_budget r{.budget = token_budget::of_ratio(0.5f), .beta = 20, .form = pyramid_form::real, .context = 1000};
  CHECK(r.nominal_select(0, 4, 600, 8) == 592);  // capped by the head's 600 tokens
  CHECK(r.nominal_select(1, 4, 600, 8) == 592);  // 658 capped too
  CHECK(r.nominal_select(2, 4, 600, 8) == 334);
  CHECK(r.nominal_select(3, 4, 600, 8) == 17);
  r.context = 0;  // from the head's 600 tokens: min 15, max 585
  CHECK(r.nominal_select(3, 4, 600, 8) == 7);

  // allocate() clips to the candidates: two layers of one 40-token head, nothing protected.
  const pyramid_budget two{.budget = token_budget::of_tokens(16), .beta = 20, .context = 100};  // min 0, max 32
  candidate_table t(2, 1);
  for (int32_t l = 0; l < 2; ++l) {
    auto& c = t.at(l, 0);
    c.length = c.next_position = 40;
    for (int32_t j = 0; j < 40; ++j) c.ranked.push_back({1.f, j, j});
  }
  std::vector<int32_t> select(2);
  REQUIRE(two.allocate(t, {0, 2, {}}, select) == status::success);
  CHECK(select == std::vector<int32_t>{32, 1});  // layer 1's pyramid share is 0: a head keeps at least one
}

TEST_CASE("Ada-KV safeguard rounds in float32, half to even", "[cpu][budget]") {
  CHECK(adaptive_safeguard(56, 58, 0.2f) == 56);  // 44.8 + int(11.6) = 55.8
  CHECK(adaptive_safeguard(5, 4, 0.5f) == 4);     // 2.5 + 2 = 4.5 -> 4
  CHECK(adaptive_safeguard(7, 4, 0.5f) == 6);     // 3.5 + 2 = 5.5 -> 6
  CHECK(adaptive_safeguard(0, 96, 0.2f) == 19);   // a head that earned nothing keeps the floor
}

namespace {
//! One layer with the given ranked scores per head (positions 0.., no protected tokens).
candidate_table table_of(const std::vector<std::vector<float>>& heads, int32_t layers = 1) {
  candidate_table t(layers, static_cast<int32_t>(heads.size()));
  for (int32_t l = 0; l < layers; ++l)
    for (size_t h = 0; h < heads.size(); ++h) {
      auto& c = t.at(l, static_cast<int32_t>(h));
      c.length = static_cast<int32_t>(heads[h].size());
      c.next_position = c.length;
      for (int32_t j = 0; j < c.length; ++j) c.ranked.push_back({heads[h][static_cast<size_t>(j)], j, j});
      std::sort(c.ranked.begin(), c.ranked.end(), ranks_before);
    }
  return t;
}
//! Ada-KV's counts for a one-layer table: `base` tokens per head, safeguard `alpha`.
std::vector<int32_t> ada_counts(const candidate_table& t, int32_t base, float alpha) {
  adaptive_budget<> ada;
  ada.base.budget = token_budget::of_tokens(base);
  ada.alpha = alpha;
  std::vector<int32_t> select(static_cast<size_t>(t.heads()));
  REQUIRE(ada.allocate(t, {0, 1, {}}, select) == status::success);
  return select;
}
}  // namespace

TEST_CASE("Ada-KV gives heads with concentrated attention less and the rest more", "[cpu][budget]") {
  // Head 0 has two strong tokens, head 1 is flat: with base 4 per head, the global top-8
  // takes head 0's two strong tokens and six of head 1's.
  const auto t = table_of({{9, 8, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f, 0.1f}, {1, 1, 1, 1, 1, 1, 1, 1}});
  CHECK(ada_counts(t, 4, 0.f) == std::vector<int32_t>{2, 6});
  // alpha 0.5: floor int(4 * 0.5) = 2, b = round(n (1 - 0.5) + 2)
  CHECK(ada_counts(t, 4, 0.5f) == std::vector<int32_t>{3, 5});
}

TEST_CASE("Ada-KV leaves a layer alone when the base exceeds the candidates", "[cpu][budget]") {
  const auto t = table_of({{3, 2, 1}, {1, 2, 3}});
  CHECK(ada_counts(t, 8, 0.2f) == std::vector<int32_t>{3, 3});
}

TEST_CASE("Ada-KV shares a layer's total between heads an earlier compression left unequal", "[cpu][budget]") {
  // Base 4 per head: head 0 has 3 candidates, head 1 has 9. Together they hold more than the
  // layer's 8, so the global top-8 decides: head 0's three strong tokens and five of head 1's.
  const auto t = table_of({{9, 8, 7}, {1, 1, 1, 1, 1, 1, 1, 1, 1}});
  CHECK(ada_counts(t, 4, 0.f) == std::vector<int32_t>{3, 5});
  // A head that earns more than the safeguard lets it hold keeps what it has: alpha 0.5 gives
  // round(3 * 0.5 + 2) = 4 for head 0's 3 candidates; head 1 round(5 * 0.5 + 2) = 4 (half to even).
  CHECK(ada_counts(t, 4, 0.5f) == std::vector<int32_t>{3, 4});
}

TEST_CASE("global block budget evicts the cheapest whole blocks across heads and layers", "[cpu][budget]") {
  // Two heads of 8 tokens, block size 2, budget 4 tokens per head: 8 blocks -> 4, evict 4.
  // Head 0 scores 0..7, head 1 scores 10..17: the cheapest blocks are head 0's, but a head
  // without protected tokens keeps at least one token, so its last block stays and the
  // fourth block comes from head 1.
  std::vector<float> a(8), b(8);
  std::iota(a.begin(), a.end(), 0.f);
  std::iota(b.begin(), b.end(), 10.f);
  const auto t = table_of({a, b});
  global_block_budget g{.budget = token_budget::of_tokens(4), .block_size = 2, .pending_tokens = 1};
  CHECK(g.blocks_to_evict(t, {}) == 4);
  std::vector<int32_t> select(2);
  REQUIRE(g.allocate(t, {0, 1, {}}, select) == status::success);
  CHECK(select == std::vector<int32_t>{2, 6});
}

TEST_CASE("global block budget frees the partial block first", "[cpu][budget]") {
  // 7 tokens, block size 4: blocks of 4 + 3 hanging. Budget 4: 2 blocks -> 1, so the 3
  // lowest tokens go (the hanging block), and the head ends with one full block.
  const auto t = table_of({{5, 6, 7, 8, 1, 2, 3}});
  global_block_budget g{.budget = token_budget::of_tokens(4), .block_size = 4, .pending_tokens = 1};
  std::vector<int32_t> select(1);
  REQUIRE(g.allocate(t, {0, 1, {}}, select) == status::success);
  CHECK(select[0] == 4);
}

TEST_CASE("global block budget in ratio mode follows _schedule_seq_evictions", "[cpu][budget]") {
  // Golden synth: n 1024, 4 layers x 2 heads, block 16, protected 32 (31 cached + pending),
  // rate 0.25 -> 372 blocks.
  std::vector<std::vector<float>> heads(2, std::vector<float>(1024 - 31, 1.f));
  auto t = table_of(heads, 4);
  for (int32_t l = 0; l < 4; ++l)
    for (int32_t h = 0; h < 2; ++h) {
      t.at(l, h).length = 1024;
      t.at(l, h).next_position = 1024;
    }
  global_block_budget g{.budget = token_budget::of_ratio(0.25f), .block_size = 16, .pending_tokens = 1};
  CHECK(g.blocks_to_evict(t, {.sinks = 0, .recent = 31}) == 372);
}

TEST_CASE("uniform budget: heads within budget keep everything, ratios keep at least one", "[cpu][budget]") {
  const auto t = table_of({{1, 2, 3}});
  uniform_budget u{token_budget::of_tokens(5)};
  std::vector<int32_t> select(1);
  REQUIRE(u.allocate(t, {0, 1, {}}, select) == status::success);
  CHECK(select[0] == 3);
  u.budget = token_budget::of_ratio(0.01f);
  REQUIRE(u.allocate(t, {0, 1, {}}, select) == status::success);
  CHECK(select[0] == 1);
}
