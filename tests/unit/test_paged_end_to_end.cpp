// End to end on the CPU, for every preset and every store: prefill -> compress -> decode
// steps (appends, attention that accumulates metrics, scheduled eviction) -> compress again.
// The kept K/V must be exactly what the policy chose, and every store must hold exactly what
// the dense reference cache holds, slot by slot.
#include <catch2/catch.hpp>

#include <algorithm>
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
const attention_shape model{3, 4, 2, 8};
constexpr int32_t prompt = 48, steps = 8, window = 4, capacity = 128;

auto presets() {
  const token_budget c = token_budget::of_tokens(16);
  return std::make_tuple(streaming_llm({.budget = c, .sinks = 2}), h2o({.budget = c, .recent = window}),
                         snapkv({.budget = c, .window = window}), pyramidkv({.budget = c, .window = window}),
                         ada_kv({.budget = c, .window = window}),
                         kv_compress({.budget = c, .block_size = 4, .protected_window = window + 1}));
}
constexpr const char* preset_names[] = {"streaming_llm", "h2o", "snapkv", "pyramidkv", "ada_kv", "kv_compress"};

//! The K/V every token was appended with, by (layer, head, position).
struct originals {
  std::vector<float> prompt_k, prompt_v;  // [L][prompt][H][d]
  std::vector<float> decode_k, decode_v;  // [steps][L][H][d]

  [[nodiscard]] std::span<const float> key(int32_t l, int32_t h, int32_t p) const { return row(prompt_k, decode_k, l, h, p); }
  [[nodiscard]] std::span<const float> value(int32_t l, int32_t h, int32_t p) const { return row(prompt_v, decode_v, l, h, p); }

 private:
  static std::span<const float> row(const std::vector<float>& pre, const std::vector<float>& dec, int32_t l, int32_t h, int32_t p) {
    const size_t d = model.head_dim, heads = model.kv_heads;
    if (p < prompt) return {pre.data() + ((static_cast<size_t>(l) * prompt + p) * heads + h) * d, d};
    return {dec.data() + ((static_cast<size_t>(p - prompt) * model.layers + l) * heads + h) * d, d};
  }
};

struct head_contents {
  std::vector<int32_t> positions;
  std::vector<float> keys, values, metrics;
};

template <class Store>
head_contents read(const Store& store, int32_t l, int32_t h) {
  const auto n = static_cast<size_t>(store.head_length(0, l, h));
  head_contents c{std::vector<int32_t>(n), std::vector<float>(n * model.head_dim), std::vector<float>(n * model.head_dim),
                  std::vector<float>(n)};
  REQUIRE(store.read_head(0, l, h, c.positions, c.keys, c.metrics) == status::success);
  REQUIRE(store.read_values(0, l, h, c.values) == status::success);
  return c;
}

//! Every head of `store` equals the reference's, slot by slot.
template <class Store>
void require_same(const Store& store, const dense_cache& ref) {
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(l, h);
      const head_contents c = read(store, l, h);
      const auto p = ref.positions(0, l, h);
      const auto k = ref.keys(0, l, h), v = ref.values(0, l, h);
      const auto m = ref.metrics(0, l, h);
      REQUIRE(c.positions == std::vector<int32_t>(p.begin(), p.end()));
      REQUIRE(c.keys == std::vector<float>(k.begin(), k.end()));
      REQUIRE(c.values == std::vector<float>(v.begin(), v.end()));
      REQUIRE(c.metrics == std::vector<float>(m.begin(), m.end()));
    }
  if constexpr (requires { store.pool(); }) {
    CHECK(store.pool().used_blocks == store.usage(0).blocks);
    CHECK(cache_invariants::check_tables(store.tables()).empty());
  }
}

//! Compresses `store` and the reference with `p`, and checks that each head kept exactly the
//! tokens the plan chose, with their original K/V.
template <class Store, class Policy>
void compress_and_check(Store& store, dense_cache& ref, const Policy& p, const cpu::observation& obs, const originals& o) {
  std::vector<std::vector<int32_t>> slot_positions;
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) slot_positions.push_back(read(store, l, h).positions);
  cpu::compression_result chosen;
  REQUIRE(cpu::plan(p, store, 0, model, obs, 0, model.layers, chosen) == status::success);
  REQUIRE(cpu::compress(p, store, 0, model, obs) == status::success);
  REQUIRE(cpu::compress(p, ref, 0, model, obs) == status::success);
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) {
      CAPTURE(l, h);
      const auto& before = slot_positions[static_cast<size_t>(l) * model.kv_heads + h];
      std::vector<int32_t> expected;
      for (const int32_t s : chosen.plan.kept(l, h)) expected.push_back(before[static_cast<size_t>(s)]);
      std::sort(expected.begin(), expected.end());
      const head_contents c = read(store, l, h);
      std::vector<int32_t> kept = c.positions;
      std::sort(kept.begin(), kept.end());
      REQUIRE(kept == expected);
      for (size_t j = 0; j < c.positions.size(); ++j) {
        const auto k = o.key(l, h, c.positions[j]), v = o.value(l, h, c.positions[j]);
        REQUIRE(std::equal(k.begin(), k.end(), c.keys.begin() + static_cast<std::ptrdiff_t>(j * model.head_dim)));
        REQUIRE(std::equal(v.begin(), v.end(), c.values.begin() + static_cast<std::ptrdiff_t>(j * model.head_dim)));
      }
    }
  require_same(store, ref);
}

template <class Store, class Policy>
void end_to_end(Store& store, const Policy& p) {
  using T = typename Store::element_type;
  std::mt19937 rng(17);
  dense_cache ref(model, 1, capacity);
  originals o;
  const size_t prompt_rows = static_cast<size_t>(model.layers) * prompt * model.kv_heads * model.head_dim;
  o.prompt_k = gaussian<T>(rng, prompt_rows);
  o.prompt_v = gaussian<T>(rng, prompt_rows);
  const auto positions = iota_positions(0, prompt);
  REQUIRE(store.append(0, positions, o.prompt_k, o.prompt_v) == status::success);
  paged_fixtures::append_dense(ref, 0, positions, o.prompt_k, o.prompt_v);

  // Prefill compression with the last `window` prompt queries.
  const auto queries = gaussian(rng, static_cast<size_t>(model.layers) * window * model.q_heads * model.head_dim, 2.f);
  const auto observed = iota_positions(prompt - window, window);
  compress_and_check(store, ref, p, {queries, observed}, o);

  // Decode: append each layer's token, attend (accumulating what the metric asks for), and
  // evict when the schedule says so.
  const size_t width = static_cast<size_t>(model.kv_heads) * model.head_dim;
  o.decode_k = gaussian<T>(rng, static_cast<size_t>(steps) * model.layers * width);
  o.decode_v = gaussian<T>(rng, o.decode_k.size());
  std::vector<float> step_queries;  // [steps][L][Hq][d]
  std::vector<float> out(static_cast<size_t>(model.q_heads) * model.head_dim), ref_out(out.size()), scratch;
  for (int32_t step = 1; step <= steps; ++step) {
    const int32_t pos = prompt + step - 1;
    const std::vector<int32_t> at{pos};
    for (int32_t l = 0; l < model.layers; ++l) {
      const size_t row = (static_cast<size_t>(step - 1) * model.layers + l) * width;
      const std::span<const float> k(o.decode_k.data() + row, width), v(o.decode_v.data() + row, width);
      REQUIRE(store.append_layer(0, l, at, k, v) == status::success);
      REQUIRE(ref.append(0, l, pos, k, v) == status::success);
      const auto q = gaussian(rng, out.size(), 2.f);
      step_queries.insert(step_queries.end(), q.begin(), q.end());
      REQUIRE(cpu::decode_attention(store, 0, l, model.q_heads, q, out, p.metric.decode(), decode_reduce(p.metric),
                                    scratch) == status::success);
      REQUIRE(cpu::decode_attention(ref, 0, l, model.q_heads, q, ref_out, p.metric.decode(), decode_reduce(p.metric),
                                    scratch) == status::success);
      REQUIRE(out == ref_out);
    }
    if (p.schedule.after_decode_step(step)) {
      REQUIRE(cpu::compress(p, store, 0, model, {}) == status::success);
      REQUIRE(cpu::compress(p, ref, 0, model, {}) == status::success);
    }
    require_same(store, ref);
  }

  // Compress again, observing the last `window` decode queries ([L][rows][Hq][d]).
  std::vector<float> late(static_cast<size_t>(model.layers) * window * out.size());
  for (int32_t r = 0; r < window; ++r)
    for (int32_t l = 0; l < model.layers; ++l) {
      const size_t src = (static_cast<size_t>(steps - window + r) * model.layers + l) * out.size();
      std::copy_n(step_queries.begin() + static_cast<std::ptrdiff_t>(src), out.size(),
                  late.begin() + static_cast<std::ptrdiff_t>((static_cast<size_t>(l) * window + r) * out.size()));
    }
  compress_and_check(store, ref, p, {late, iota_positions(prompt + steps - window, window)}, o);
}

template <class Make>
void for_each_preset(Make&& make) {
  std::apply([&](const auto&... p) {
    size_t i = 0;
    (
        [&] {
          const char* preset = preset_names[i++];
          CAPTURE(preset);
          make(p);
        }(),
        ...);
  }, presets());
}

template <class Cache>
void paged_end_to_end(int32_t block_size) {
  CAPTURE(block_size);
  for_each_preset([&](const auto& p) {
    auto cache = paged_fixtures::make_cache<Cache>({model, block_size, 3 * 2 * capacity / block_size, 1, capacity});
    REQUIRE(cache.add_sequence(0) == status::success);
    end_to_end(cache, p);
  });
}

template <kv_element T>
void dense_view_end_to_end() {
  for_each_preset([&](const auto& p) {
    paged_fixtures::engine_buffers<T> buffers(model, 1, capacity);
    const auto layers = buffers.layers();
    dense_view<T> view;
    REQUIRE(dense_view<T>::create(model, 1, capacity, layers, view) == status::success);
    end_to_end(view, p);
  });
}
}  // namespace

TEST_CASE("end to end: every preset on the fp32 paged cache, block sizes 1, 4 and 16", "[cpu][cache][e2e]") {
  paged_end_to_end<paged_cache<float>>(1);
  paged_end_to_end<paged_cache<float>>(4);
  paged_end_to_end<paged_cache<float>>(16);
}

TEST_CASE("end to end: every preset on the fp16 paged cache", "[cpu][cache][e2e]") {
  paged_end_to_end<paged_cache<float16>>(4);
}

TEST_CASE("end to end: every preset on the bf16 paged cache with a static head dim", "[cpu][cache][e2e]") {
  paged_end_to_end<paged_cache<bfloat16, 8>>(16);
}

TEST_CASE("end to end: every preset on the dense view, fp32 and fp16", "[cpu][cache][e2e]") {
  dense_view_end_to_end<float>();
  dense_view_end_to_end<float16>();
}
