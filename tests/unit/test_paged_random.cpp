// Seeded random operations on the paged cache (add, free, prefill chunks, decode tokens,
// single-layer appends to one sequence or a batch, compression with each of the six presets,
// arbitrary and corrupted plans, batch truncates, decode attention that accumulates metrics,
// key rewrites, bad calls), each followed by the full invariant check
// (tests/support/cache_invariants.hpp) against an independent model, and for every failed
// call a check that nothing changed.
//
// The CI tier runs 20,000 operations per configuration (well under a second each); the hidden
// tier runs 1,000,000 (`kvtrim_unit_tests "[.slow]"`; tagged [.slow] only, so that "[cpu]" and
// "[cache]" do not select it). A failing run names its seed; reproduce it with
//   KVTRIM_RANDOM_SEED=<seed> KVTRIM_RANDOM_OPS=<count> kvtrim_unit_tests "<test name>"
#include <catch2/catch.hpp>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <map>
#include <random>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;

namespace {
const attention_shape model{2, 4, 2, 8};
// 48 blocks of 4 tokens for up to 3 sequences of 40 tokens per head: the pool runs out often.
const paged_cache_config config{model, 4, 48, 3, 40};
constexpr int64_t max_id = 4;  // ids 0..4: some calls name sequences that do not exist

//! Seed and operation count, overridable from the environment to reproduce a run.
std::pair<uint64_t, int64_t> settings(uint64_t seed, int64_t ops) {
  if (const char* s = std::getenv("KVTRIM_RANDOM_SEED")) seed = std::strtoull(s, nullptr, 10);
  if (const char* s = std::getenv("KVTRIM_RANDOM_OPS")) ops = std::strtoll(s, nullptr, 10);
  return {seed, ops};
}

template <class Cache>
class random_run {
 public:
  using T = typename Cache::element_type;

  //! `extra` runs after every operation (the device mirror check); "" means it holds.
  random_run(Cache& cache, uint64_t seed, std::function<std::string()> extra = {})
      : cache_(cache), model_(model), rng_(seed), extra_(std::move(extra)) {}

  //! Runs `ops` operations; returns "" or the first violation, with the operation index.
  std::string run(int64_t ops) {
    for (int64_t i = 0; i < ops; ++i) {
      const block_tables before = cache_.tables();
      mismatch_.clear();
      const std::string op = step();
      std::string e = mismatch_;
      if (e.empty() && last_status_ != status::success && !(cache_.tables() == before))
        e = "a failed call changed the tables";
      if (e.empty()) e = cache_invariants::check_tables(cache_.tables());
      if (e.empty()) e = cache_invariants::check_contents(cache_, model_);
      if (e.empty() && extra_) e = extra_();
      if (!e.empty()) return "operation " + std::to_string(i) + " (" + op + ", " + std::string(to_string(last_status_)) + "): " + e;
    }
    return {};
  }
  [[nodiscard]] int64_t successes() const { return successes_; }
  [[nodiscard]] int64_t compressions() const { return compressions_; }
  [[nodiscard]] int64_t truncates() const { return truncates_; }
  [[nodiscard]] int64_t exhaustions() const { return exhaustions_; }
  [[nodiscard]] int64_t evicted() const { return evicted_; }

 private:
  template <class I>
  I uniform(I lo, I hi) {
    return std::uniform_int_distribution<I>(lo, hi)(rng_);
  }
  bool chance(double p) { return std::bernoulli_distribution(p)(rng_); }

  //! A live sequence, or (rarely, or when none is alive) any id.
  int64_t pick_sequence() {
    const auto& seqs = model_.sequences();
    if (seqs.empty() || chance(0.03)) return uniform<int64_t>(0, max_id);
    auto it = seqs.begin();
    std::advance(it, uniform<size_t>(0, seqs.size() - 1));
    return it->first;
  }

  //! Records the outcome, and a mismatch if it differs from what the model predicts.
  std::string expect(std::string name, status got, status want) {
    last_status_ = got;
    if (got == status::success) ++successes_;
    if (got == status::pool_exhausted) ++exhaustions_;
    if (got != want) mismatch_ = "expected " + std::string(to_string(want));
    return name;
  }

  //! K/V as append() takes them: fp32 for the host cache, T for the device cache.
  template <class V>
  static std::vector<typename Cache::source_type> source(const V& values) {
    std::vector<typename Cache::source_type> out(values.size());
    for (size_t i = 0; i < values.size(); ++i) out[i] = from_float<typename Cache::source_type>(values[i]);
    return out;
  }

  std::string step() {
    const int kind = uniform(0, 99);
    if (kind < 8) return add();
    if (kind < 12) return free();
    if (kind < 27) return append(uniform(1, 10), -1);
    if (kind < 45) return append(1, -1);
    if (kind < 48) return append(uniform(1, 4), uniform(0, model.layers - 1));
    if (kind < 52) return append_batch(uniform(1, 3), uniform(0, model.layers - 1));
    if (kind < 64) return compress();
    if (kind < 70) return truncate();
    if (kind < 80) return random_plan();
    if (kind < 92) return attend();
    if (kind < 96) return rewrite();
    return bad_call();
  }

  std::string add() {
    const int64_t id = uniform<int64_t>(-1, max_id);
    const status want = id < 0 || model_.contains(id) ? status::invalid_argument
                        : static_cast<int32_t>(model_.sequences().size()) == config.max_sequences ? status::pool_exhausted
                                                                                                  : status::success;
    const status got = cache_.add_sequence(id);
    if (got == status::success) {
      model_.add(id);
      next_[id] = 0;
    }
    return expect("add", got, want);
  }

  std::string free() {
    const int64_t id = uniform<int64_t>(0, max_id);
    const status want = model_.contains(id) ? status::success : status::unknown_sequence;
    const status got = cache_.free_sequence(id);
    if (got == status::success) model_.free(id);
    return expect("free", got, want);
  }

  //! `tokens` tokens to every layer (layer < 0) or to one layer.
  std::string append(int32_t tokens, int32_t layer) {
    const int64_t seq = pick_sequence();
    const int32_t first = layer < 0 ? 0 : layer, layers = layer < 0 ? model.layers : 1;
    const size_t count = static_cast<size_t>(layers) * tokens * model.kv_heads * model.head_dim;
    const auto k = paged_fixtures::gaussian<T>(rng_, count), v = paged_fixtures::gaussian<T>(rng_, count);
    const int32_t start = model_.contains(seq) ? next_[seq] : 0;
    const auto positions = paged_fixtures::iota_positions(start, tokens);
    status want = status::success;
    if (!model_.contains(seq)) {
      want = status::unknown_sequence;
    } else {
      int64_t needed = 0;
      for (int32_t l = first; l < first + layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h) {
          const auto n = static_cast<int32_t>(model_.head(seq, l, h).size());
          if (n + tokens > config.max_tokens_per_head) want = status::invalid_argument;
          needed += blocks_for(n + tokens, config.block_size) - blocks_for(n, config.block_size);
        }
      if (want == status::success && needed > cache_.pool().free_blocks()) want = status::pool_exhausted;
    }
    const auto ks = source(k), vs = source(v);
    const status got = layer < 0 ? cache_.append(seq, positions, ks, vs) : cache_.append_layer(seq, layer, positions, ks, vs);
    if (got == status::success) {
      model_.append(seq, first, layers, positions, k, v);
      next_[seq] = start + tokens;
    }
    return expect(layer < 0 ? "append" : "append_layer", got, want);
  }

  //! `tokens` tokens to one layer of a batch of 1-3 sequences (sometimes unknown or repeated)
  //! in one call, each continuing from its own next position.
  std::string append_batch(int32_t tokens, int32_t layer) {
    std::vector<int64_t> seqs(static_cast<size_t>(uniform(1, 3)));
    for (int64_t& seq : seqs) seq = pick_sequence();
    const size_t per_sequence = static_cast<size_t>(tokens) * model.kv_heads * model.head_dim;
    const auto k = paged_fixtures::gaussian<T>(rng_, seqs.size() * per_sequence);
    const auto v = paged_fixtures::gaussian<T>(rng_, k.size());
    std::vector<int32_t> positions;  // [B][t]
    status want = status::success;
    int64_t needed = 0;
    for (size_t b = 0; b < seqs.size(); ++b) {
      const int64_t seq = seqs[b];
      const int32_t start = model_.contains(seq) ? next_[seq] : 0;
      for (int32_t t = 0; t < tokens; ++t) positions.push_back(start + t);
      if (!model_.contains(seq)) {
        want = status::unknown_sequence;
        continue;
      }
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        const auto n = static_cast<int32_t>(model_.head(seq, layer, h).size());
        if (n + tokens > config.max_tokens_per_head) needed = -1;
        if (needed >= 0) needed += blocks_for(n + tokens, config.block_size) - blocks_for(n, config.block_size);
      }
    }
    // The cache's order of checks: unknown sequences, then one named twice, a head that
    // would overflow, and the pool.
    const bool repeated = std::set<int64_t>(seqs.begin(), seqs.end()).size() != seqs.size();
    if (want == status::success && (repeated || needed < 0)) want = status::invalid_argument;
    if (want == status::success && needed > cache_.pool().free_blocks()) want = status::pool_exhausted;
    const status got = cache_.append_layer(seqs, layer, positions, source(k), source(v));
    if (got == status::success)
      for (size_t b = 0; b < seqs.size(); ++b) {
        model_.append(seqs[b], layer, 1, std::span<const int32_t>(positions).subspan(b * tokens, tokens),
                      std::span<const float>(k).subspan(b * per_sequence, per_sequence),
                      std::span<const float>(v).subspan(b * per_sequence, per_sequence));
        next_[seqs[b]] += tokens;
      }
    return expect("append_layer batch", got, want);
  }

  //! One of the six presets with a random budget; the plan is computed first, then
  //! cpu::compress must do exactly that (or fail the same way, changing nothing). The device
  //! cache applies the plan itself, as cpu::compress reads host stores only.
  std::string compress() {
    const int64_t seq = pick_sequence();
    const int32_t budget = uniform(4, 20), window = uniform(0, 5), rows = uniform(0, 4);
    const int32_t next = model_.contains(seq) ? next_[seq] : 0;
    const int32_t observed = next >= rows ? rows : 0;
    std::vector<float> queries = paged_fixtures::gaussian(rng_, static_cast<size_t>(model.layers) * observed * model.q_heads * model.head_dim, 2.f);
    const auto positions = paged_fixtures::iota_positions(next - observed, observed);
    const cpu::observation obs{queries, positions};
    const token_budget b = token_budget::of_tokens(budget);
    switch (uniform(0, 5)) {
      case 0: return run_policy("streaming_llm", streaming_llm({.budget = b, .sinks = window}), seq, obs);
      case 1: return run_policy("h2o", h2o({.budget = b, .recent = window}), seq, obs);
      case 2: return run_policy("snapkv", snapkv({.budget = b, .window = window}), seq, obs);
      case 3: return run_policy("pyramidkv", pyramidkv({.budget = b, .window = window}), seq, obs);
      case 4: return run_policy("ada_kv", ada_kv({.budget = b, .window = window}), seq, obs);
      default:
        return run_policy("kv_compress",
                          kv_compress({.budget = b, .block_size = config.block_size, .protected_window = window + 1}),
                          seq, obs);
    }
  }

  template <class Policy>
  std::string run_policy(const char* name, const Policy& p, int64_t seq, const cpu::observation& obs) {
    cpu::compression_result planned;
    const status want = cpu::plan(p, cache_, seq, model, obs, 0, model.layers, planned);
    status got = want;
    if constexpr (Cache::memory == memory_space::host) {
      got = cpu::compress(p, cache_, seq, model, obs);
    } else if (want == status::success) {  // the device cache's fallback: plan on the host, apply through the mover
      got = cache_.apply(seq, planned.plan);
    }
    if (got == status::success) {
      for (int32_t l = 0; l < model.layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h)
          evicted_ += planned.plan.length_before(l, h) - planned.plan.kept_count(l, h);
      model_.apply(seq, planned.plan);
      ++compressions_;
    }
    return expect(std::string("compress ") + name, got, want);
  }

  //! A random prefix of every head of a batch of 1-3 sequences (the commit of a device
  //! compression); sometimes an unknown or repeated sequence, a bad length or a wrong count.
  std::string truncate() {
    std::vector<int64_t> seqs(static_cast<size_t>(uniform(1, 3)));
    for (int64_t& seq : seqs) seq = pick_sequence();
    std::vector<int32_t> lengths;
    status want = status::success;  // the first refusal in truncate's order of checks
    for (size_t b = 0; b < seqs.size(); ++b) {
      const bool known = model_.contains(seqs[b]);
      const bool repeated = std::find(seqs.begin(), seqs.begin() + static_cast<ptrdiff_t>(b), seqs[b]) !=
                            seqs.begin() + static_cast<ptrdiff_t>(b);
      if (want == status::success && !known) want = status::unknown_sequence;
      if (want == status::success && repeated) want = status::invalid_argument;
      for (int32_t l = 0; l < model.layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h) {
          const auto n = known ? static_cast<int32_t>(model_.head(seqs[b], l, h).size()) : 0;
          int32_t length = n == 0 ? 0 : uniform(1, n);
          if (chance(0.02)) length = n + 1;
          if (n > 0 && chance(0.02)) length = 0;
          if (want == status::success && (length > n || length < std::min(n, 1))) want = status::invalid_argument;
          lengths.push_back(length);
        }
    }
    if (chance(0.03)) {
      lengths.pop_back();
      want = status::shape_mismatch;
    }
    const status got = cache_.truncate(seqs, lengths);
    if (got == status::success) {
      const auto* length = lengths.data();
      for (const int64_t seq : seqs) {
        eviction_plan plan(model.layers, model.kv_heads);
        for (int32_t l = 0; l < model.layers; ++l)
          for (int32_t h = 0; h < model.kv_heads; ++h) {
            const auto n = static_cast<int32_t>(model_.head(seq, l, h).size());
            plan.set_head(l, h, n, paged_fixtures::iota_positions(0, *length));
            evicted_ += n - *length++;
          }
        model_.apply(seq, plan);
      }
      ++truncates_;
    }
    return expect("truncate", got, want);
  }

  //! An arbitrary kept set per head, with metrics sometimes; sometimes corrupted.
  std::string random_plan() {
    const int64_t seq = pick_sequence();
    if (!model_.contains(seq)) {
      eviction_plan plan(model.layers, model.kv_heads);
      return expect("random plan", cache_.apply(seq, plan), status::unknown_sequence);
    }
    eviction_plan plan(model.layers, model.kv_heads);
    std::vector<int32_t> lengths, kept;
    const double keep = std::vector<double>{0.1, 0.5, 0.9}[uniform<size_t>(0, 2)];
    const int corruption = chance(0.15) ? uniform(1, 4) : 0;
    const int32_t bad_l = uniform(0, model.layers - 1), bad_h = uniform(0, model.kv_heads - 1);
    bool corrupted = false;
    for (int32_t l = 0; l < model.layers; ++l)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        const auto n = static_cast<int32_t>(model_.head(seq, l, h).size());
        kept.clear();
        for (int32_t s = 0; s < n; ++s)
          if (chance(keep)) kept.push_back(s);
        if (n > 0 && kept.empty()) kept.push_back(uniform(0, n - 1));
        int32_t length = n;
        if (l == bad_l && h == bad_h && corruption != 0) {
          if (corruption == 1) length = n + 1, corrupted = true;                   // lengths differ
          if (corruption == 2 && kept.size() > 1) std::swap(kept[0], kept[1]), corrupted = true;  // unsorted
          if (corruption == 3) kept.push_back(n), corrupted = true;               // out of range
          if (corruption == 4 && n > 0) kept.clear(), corrupted = true;           // empties a head
        }
        plan.set_head(l, h, length, kept);
        lengths.push_back(n);
      }
    if (chance(0.3)) {
      plan.metrics = ragged_rows(model.layers, model.kv_heads, lengths);
      for (int32_t l = 0; l < model.layers; ++l)
        for (int32_t h = 0; h < model.kv_heads; ++h)
          for (float& m : plan.metrics.row(l, h)) m = std::uniform_real_distribution<float>(0.f, 1.f)(rng_);
    }
    const status got = cache_.apply(seq, plan);
    if (got == status::success) model_.apply(seq, plan);
    return expect(corrupted ? "corrupted plan" : "random plan", got, corrupted ? status::invalid_plan : status::success);
  }

  //! Decode attention of one layer with a random accumulation; the model's expectation is
  //! attend_head over its own copy of each head. (The device cache has no CPU attention.)
  std::string attend() {
    if constexpr (Cache::memory == memory_space::host) {
      return attend_host();
    } else {
      return append(1, -1);
    }
  }

  std::string attend_host() {
    const int64_t seq = pick_sequence();
    const int32_t layer = uniform(0, model.layers - 1);
    const auto acc = static_cast<decode_accumulation>(uniform(0, 2));
    const auto reduce = static_cast<gqa_reduce>(uniform(0, 2));
    const auto q = paged_fixtures::gaussian(rng_, static_cast<size_t>(model.q_heads) * model.head_dim);
    std::vector<float> out(q.size()), expected(q.size()), scratch;
    status want = model_.contains(seq) ? status::success : status::unknown_sequence;
    if (want == status::success)
      for (int32_t h = 0; h < model.kv_heads; ++h)
        if (model_.head(seq, layer, h).size() == 0) want = status::empty_sequence;
    std::vector<std::vector<float>> metrics(static_cast<size_t>(model.kv_heads));
    const int32_t group = model.group();
    const size_t width = static_cast<size_t>(group) * model.head_dim;
    if (want == status::success)
      for (int32_t h = 0; h < model.kv_heads; ++h) {
        const cache_invariants::head_state& s = model_.head(seq, layer, h);
        metrics[static_cast<size_t>(h)] = s.metrics;
        throw_if_error(cpu::attend_head(std::span<const float>(q).subspan(h * width, width), group, model.head_dim, s.keys,
                                        s.values, std::span<float>(expected).subspan(h * width, width), acc, reduce,
                                        metrics[static_cast<size_t>(h)], scratch));
      }
    const status got = cpu::decode_attention(cache_, seq, layer, model.q_heads, q, out, acc, reduce, scratch);
    if (got == status::success) {
      if (out != expected) mismatch_ = "output differs from attend_head";
      for (int32_t h = 0; h < model.kv_heads; ++h) model_.set_metrics(seq, layer, h, metrics[static_cast<size_t>(h)]);
    }
    return expect("attend", got, want);
  }

  std::string rewrite() {
    const int64_t seq = pick_sequence();
    const int32_t l = uniform(0, model.layers - 1), h = uniform(0, model.kv_heads - 1);
    const size_t n = model_.contains(seq) ? model_.head(seq, l, h).size() : 0;
    std::vector<int32_t> positions = paged_fixtures::iota_positions(0, 100);  // n distinct positions below 100
    std::shuffle(positions.begin(), positions.end(), rng_);
    positions.resize(n);
    const auto keys = paged_fixtures::gaussian<T>(rng_, n * model.head_dim);
    const status got = cache_.rewrite_head(seq, l, h, positions, keys);
    if (got == status::success) model_.rewrite(seq, l, h, positions, keys);
    return expect("rewrite", got, model_.contains(seq) ? status::success : status::unknown_sequence);
  }

  //! Calls that must be refused: a head out of range, keys of the wrong size.
  std::string bad_call() {
    const int64_t seq = pick_sequence();
    if (!model_.contains(seq)) return expect("bad call", cache_.free_sequence(seq), status::unknown_sequence);
    if (chance(0.5)) {
      const std::vector<typename Cache::source_type> k(7);
      return expect("short keys", cache_.append(seq, paged_fixtures::iota_positions(0, 1), k, k), status::shape_mismatch);
    }
    std::vector<int32_t> p;
    std::vector<float> f;
    return expect("head out of range", cache_.rewrite_head(seq, model.layers, 0, p, f), status::invalid_argument);
  }

  Cache& cache_;
  cache_invariants::reference_model model_;
  std::mt19937_64 rng_;
  std::function<std::string()> extra_;
  std::map<int64_t, int32_t> next_;  // next position of each sequence
  status last_status_ = status::success;
  std::string mismatch_;  // set when a call's status differs from the model's prediction
  // evicted: tokens, by compressions and truncates
  int64_t successes_ = 0, compressions_ = 0, truncates_ = 0, exhaustions_ = 0, evicted_ = 0;
};

template <class Cache>
void run_host(uint64_t default_seed, int64_t default_ops, bool report) {
  const auto [seed, ops] = settings(default_seed, default_ops);
  CAPTURE(seed, ops);
  auto cache = paged_fixtures::make_cache<Cache>(config);
  random_run<Cache> run(cache, seed);
  const auto start = std::chrono::steady_clock::now();
  const std::string failure = run.run(ops);
  const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  INFO(failure);
  CHECK(failure.empty());
  // The run exercised what it is meant to.
  CHECK(run.successes() > ops / 3);
  CHECK(run.compressions() > ops / 50);
  CHECK(run.truncates() > ops / 200);
  CHECK(run.evicted() > ops);
  CHECK(run.exhaustions() > 0);
  if (report)
    WARN(ops << " operations with seed " << seed << " in " << seconds << " s (" << run.compressions()
             << " compressions and " << run.truncates() << " truncates evicting " << run.evicted() << " tokens, "
             << run.exhaustions() << " pool exhaustions)");
}
}  // namespace

TEST_CASE("random operations keep every invariant: fp32 paged cache", "[cpu][cache][random]") {
  run_host<paged_cache<float>>(20261122, 20000, false);
}

TEST_CASE("random operations keep every invariant: fp16 paged cache", "[cpu][cache][random]") {
  run_host<paged_cache<float16>>(7, 20000, false);
}

TEST_CASE("random operations keep every invariant: bf16 paged cache with a static head dim", "[cpu][cache][random]") {
  run_host<paged_cache<bfloat16, 8>>(11, 20000, false);
}

TEST_CASE("random operations keep every invariant: device cache, host mover, mirror checked", "[cpu][cache][random]") {
  const auto [seed, ops] = settings(13, 20000);
  CAPTURE(seed, ops);
  paged_fixtures::device_memory<float16> memory(config);
  device_paged_cache<float16> cache;
  REQUIRE(device_paged_cache<float16>::create(config, device_storage<float16>{memory.buffers(), host_mover{}}, cache) ==
          status::success);
  random_run<device_paged_cache<float16>> run(
      cache, seed, [&] { return cache_invariants::check_mirror(cache.tables(), memory.tables, memory.lengths); });
  const std::string failure = run.run(ops);
  INFO(failure);
  CHECK(failure.empty());
  CHECK(run.compressions() > ops / 50);
  CHECK(run.truncates() > ops / 200);
  CHECK(run.evicted() > ops);
}

TEST_CASE("a million random operations keep every invariant", "[.slow]") {
  run_host<paged_cache<float16>>(1000003, 1000000, true);
}
