// libFuzzer target: the input bytes become a paged cache (element type, shape, block size,
// pool) and a sequence of operations on it: add and free sequences, prefill chunks and decode
// tokens (all layers, one layer, or one layer of a batch), compression with each of the six
// presets and fuzzed parameters (valid or not: budgets, ratios, windows, sinks, kernels,
// betas, alphas, block sizes, RoPE), hand-made eviction plans (valid or corrupted), batch
// truncates (valid or not), decode attention with accumulation, key rewrites, re-rotation and
// reads with outputs of any size. A second mode drives the block pool alone.
//
// After every operation: the cache's metadata invariants (tests/support/cache_invariants.hpp),
// the device mirror where there is one, the memory accounting, and every head's contents slot
// by slot against an independent model (NaN-aware). Every call's status must be the one the
// model predicts; a failed call must leave everything exactly as it was (strong guarantee);
// a successful compression must keep every protected token and never report `invalid_plan`
// (a policy producing a plan its own store refuses). Any violation prints what happened and
// aborts, which libFuzzer reports as a crash and the replay test (replay_main.cpp) as a
// failure. scripts/fuzz builds and runs it; docs/reliability.md says how long it ran.
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <span>
#include <string>
#include <vector>

#include "cache_invariants.hpp"
#include "kvtrim/kvtrim.hpp"
#include "paged_fixtures.hpp"

using namespace kvtrim;

namespace {

[[noreturn]] void fail(const std::string& what) {
  std::fprintf(stderr, "fuzz_cache_ops: %s\n", what.c_str());
  std::fflush(stderr);
  std::abort();
}

//! Reads the input as a stream of decisions; past its end every read gives 0.
class byte_source {
 public:
  byte_source(const uint8_t* data, size_t size) : data_(data), size_(size) {}
  [[nodiscard]] bool empty() const noexcept { return pos_ >= size_; }
  uint8_t byte() noexcept { return pos_ < size_ ? data_[pos_++] : 0; }
  uint16_t u16() noexcept { return static_cast<uint16_t>(byte() | (byte() << 8)); }
  //! A value in [lo, hi] (hi - lo < 65536).
  int32_t range(int32_t lo, int32_t hi) noexcept {
    const auto span = static_cast<uint32_t>(static_cast<int64_t>(hi) - lo + 1);
    const uint32_t raw = span <= 256 ? byte() : u16();
    return static_cast<int32_t>(lo + static_cast<int64_t>(raw % span));
  }
  bool chance(uint8_t in256) noexcept { return byte() < in256; }
  //! Mostly a value in [lo, hi]; one time in eight an edge of int32.
  int32_t int32_edge(int32_t lo, int32_t hi) noexcept {
    const uint8_t b = byte();
    if (b < 224) return static_cast<int32_t>(lo + static_cast<int64_t>(b % static_cast<uint32_t>(static_cast<int64_t>(hi) - lo + 1)));
    static constexpr int32_t edges[32] = {0, -1, 1, 2, std::numeric_limits<int32_t>::max(),
                                          std::numeric_limits<int32_t>::min(),
                                          std::numeric_limits<int32_t>::max() - 1,
                                          std::numeric_limits<int32_t>::min() + 1, 1 << 30, -(1 << 30), 1 << 16,
                                          65535, 255, 256, 127, -128, 3, 4, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64,
                                          1000, 1 << 24, (1 << 24) + 1, -2};
    return edges[b - 224];
  }
  //! A float: mostly moderate, sometimes NaN, infinities, huge, tiny or out of (0, 1].
  float real() noexcept {
    static constexpr float table[16] = {0.f, 0.1f, 0.5f, 1.f, 1.5f, -0.5f, 1e-30f, 1e30f,
                                        std::numeric_limits<float>::quiet_NaN(),
                                        std::numeric_limits<float>::infinity(),
                                        -std::numeric_limits<float>::infinity(), 0.2f, 0.9f, 0.25f, 2.f, -1.f};
    const uint8_t b = byte();
    if (b < 128) return static_cast<float>(b) / 127.f;
    return table[b % 16];
  }

 private:
  const uint8_t* data_;
  size_t size_;
  size_t pos_ = 0;
};

//! Deterministic values from a seed the input chooses, with an optional special value.
class value_source {
 public:
  explicit value_source(uint64_t seed) : state_(seed * 0x9e3779b97f4a7c15ull + 1) {}
  float normal() noexcept {  // sum of uniforms: roughly N(0, 1), cheap and portable
    float s = 0.f;
    for (int i = 0; i < 4; ++i) s += static_cast<float>(next() >> 40) / static_cast<float>(1ull << 24);
    return (s - 2.f) * 1.7f;
  }

 private:
  uint64_t next() noexcept {  // splitmix64
    uint64_t z = (state_ += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  uint64_t state_;
};

//! `count` values; the input may plant NaN, an infinity or a huge value in them.
std::vector<float> values(byte_source& in, size_t count, float scale = 1.f) {
  value_source v(in.byte());
  std::vector<float> out(count);
  for (float& x : out) x = scale * v.normal();
  const uint8_t special = in.byte();
  if (special < 24 && count > 0) {
    static constexpr float bad[4] = {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                                     -std::numeric_limits<float>::infinity(), 3e38f};
    out[in.byte() % count] = bad[special % 4];
  }
  return out;
}

bool same_float(float a, float b) noexcept {
  return (std::isnan(a) && std::isnan(b)) || std::bit_cast<uint32_t>(a) == std::bit_cast<uint32_t>(b);
}
bool same_floats(std::span<const float> a, std::span<const float> b) noexcept {
  return a.size() == b.size() && std::equal(a.begin(), a.end(), b.begin(), same_float);
}

std::string name(status s) { return std::string(to_string(s)); }

//! What the stores refuse as a token position.
bool bad_position(int32_t p) noexcept { return p < 0 || p > max_position; }

//! KVTRIM_FUZZ_VERBOSE=1 prints every operation and its status (to reproduce a finding).
bool verbose() {
  static const bool on = std::getenv("KVTRIM_FUZZ_VERBOSE") != nullptr;
  return on;
}

// ---- the cache run

template <class Cache>
class cache_run {
 public:
  using T = typename Cache::element_type;
  using source_t = typename Cache::source_type;

  cache_run(Cache& cache, byte_source& in, const paged_cache_config& config,
            std::function<std::string()> mirror = {})
      : cache_(cache), in_(in), config_(config), shape_(config.shape), model_(config.shape),
        mirror_(std::move(mirror)) {}

  void run() {
    check("create");
    for (int ops = 0; ops < 256 && !in_.empty(); ++ops) {
      const block_tables before = cache_.tables();
      const std::string op = step();
      if (verbose()) std::fprintf(stderr, "  %s -> %s\n", op.c_str(), name(got_).c_str());
      if (got_ != want_) fail(op + ": got " + name(got_) + ", expected " + name(want_));
      if (got_ != status::success && !(cache_.tables() == before)) fail(op + ": failed with " + name(got_) + " but changed the tables");
      check(op);
    }
  }

 private:
  // ---- invariants after every operation
  void check(const std::string& op) {
    std::string e = cache_invariants::check_tables(cache_.tables());
    if (e.empty() && mirror_) e = mirror_();
    if (e.empty()) e = contents();
    if (e.empty()) e = accounting();
    if (!e.empty()) fail(op + " (" + name(got_) + "): " + e);
  }

  std::string contents() {
    for (int32_t row = 0; row < config_.max_sequences; ++row) {
      const int64_t id = cache_.tables().sequence_id(row);
      if (id != block_tables::no_sequence && !model_.contains(id)) return "the cache holds a sequence the model freed";
    }
    const auto d = static_cast<size_t>(shape_.head_dim);
    for (const auto& [seq, heads] : model_.sequences()) {
      if (!cache_.contains(seq)) return "sequence " + std::to_string(seq) + " is missing";
      for (int32_t l = 0; l < shape_.layers; ++l)
        for (int32_t h = 0; h < shape_.kv_heads; ++h) {
          const cache_invariants::head_state& want = model_.head(seq, l, h);
          const size_t n = want.size();
          if (static_cast<size_t>(cache_.head_length(seq, l, h)) != n) return "a head has the wrong length";
          std::vector<int32_t> p(n);
          std::vector<float> k(n * d), v(n * d), m(n);
          if (cache_.read_head(seq, l, h, p, k, m) != status::success || cache_.read_values(seq, l, h, v) != status::success)
            return "reading a head failed";
          if (p != want.positions) return "positions differ from the model";
          if (!same_floats(m, want.metrics)) return "metrics differ from the model";
          if (!same_floats(k, want.keys) || !same_floats(v, want.values)) return "K or V differ from the model";
        }
    }
    return {};
  }

  std::string accounting() {
    int64_t used = 0;
    const int64_t block_bytes = slot_bytes<T>(shape_.head_dim) * config_.block_size;
    for (const auto& [seq, heads] : model_.sequences()) {
      memory_usage want;
      for (const auto& s : heads) {
        const auto n = static_cast<int32_t>(s.size());
        want.tokens += n;
        want.blocks += blocks_for(n, config_.block_size);
      }
      want.bytes = want.blocks * block_bytes;
      if (!(cache_.usage(seq) == want)) return "usage() of a sequence differs from its heads";
      used += want.blocks;
    }
    const pool_usage pool = cache_.pool();
    if (pool.used_blocks != used || pool.total_blocks != config_.num_blocks || pool.bytes_per_block != block_bytes)
      return "pool() differs from what the sequences hold";
    if (!(cache_.usage(-5) == memory_usage{})) return "usage() of an unknown sequence is not zero";
    return {};
  }

  // ---- choices
  int64_t pick_sequence() {
    const auto& seqs = model_.sequences();
    const uint8_t b = in_.byte();
    if (b < 200 && !seqs.empty()) {
      auto it = seqs.begin();
      std::advance(it, b % seqs.size());
      return it->first;
    }
    static constexpr int64_t ids[12] = {0, 1, 2, 3, 4, 5, -1, std::numeric_limits<int64_t>::max(),
                                        std::numeric_limits<int64_t>::min(), int64_t{1} << 40, 7, 100};
    return ids[b % 12];
  }

  //! Records a call's status and the model's prediction; returns the operation's name.
  std::string done(const std::string& op, status got, status want) {
    got_ = got;
    want_ = want;
    return op;
  }

  std::string step() {
    const uint8_t op = in_.byte();
    switch (op % 16) {
      case 0: case 1: return add();
      case 2: return free();
      case 3: return append(false);
      // The batch append came last: it takes the top sixteenth of a second append byte, so the
      // inputs in tests/fuzz/regressions/ still replay the sessions that found their bugs.
      case 4: return op < 240 ? append(false) : append_batch();
      case 5: return append(true);
      case 6: case 7: case 8: return compress();
      case 9: return apply();
      case 10: case 11: return attend();
      case 12: return rewrite();
      case 13: return read();
      case 14: return rerotate();
      default: return truncate();
    }
  }

  std::string add() {
    const int64_t id = pick_sequence();
    status want = status::success;
    if (id < 0 || model_.contains(id)) want = status::invalid_argument;
    else if (static_cast<int32_t>(model_.sequences().size()) == config_.max_sequences) want = status::pool_exhausted;
    const status got = cache_.add_sequence(id);
    if (got == status::success) {
      model_.add(id);
      next_[id] = 0;
    }
    return done("add_sequence", got, want);
  }

  std::string free() {
    const int64_t id = pick_sequence();
    const status want = model_.contains(id) ? status::success : status::unknown_sequence;
    const status got = cache_.free_sequence(id);
    if (got == status::success) {
      model_.free(id);
      next_.erase(id);
    }
    return done("free_sequence", got, want);
  }

  std::vector<int32_t> positions_for(int64_t seq, int32_t tokens) {
    const int64_t start = next_.count(seq) ? next_[seq] : 0;
    std::vector<int32_t> p(static_cast<size_t>(std::max(tokens, 0)));
    const uint8_t mode = in_.byte();
    for (size_t i = 0; i < p.size(); ++i) {
      const int64_t want = start + static_cast<int64_t>(i);
      p[i] = want > std::numeric_limits<int32_t>::max() ? std::numeric_limits<int32_t>::max() : static_cast<int32_t>(want);
    }
    if (mode >= 200 && !p.empty()) p[in_.byte() % p.size()] = in_.int32_edge(0, 100);  // anything, even negative
    return p;
  }

  template <class V>
  static std::vector<source_t> to_source(const V& v) {
    std::vector<source_t> out(v.size());
    for (size_t i = 0; i < v.size(); ++i) out[i] = from_float<source_t>(v[i]);
    return out;
  }
  //! What the store holds for value x (fp32 in the host cache, T in the device cache).
  static float stored(float x) { return to_float(from_float<T>(to_float(from_float<source_t>(x)))); }

  //! The model side of a successful append to `seq`: the values as the store holds them, and
  //! the sequence's next position past those appended.
  void model_append(int64_t seq, int32_t first, int32_t layers, std::span<const int32_t> positions,
                    std::span<const float> k, std::span<const float> v) {
    std::vector<float> ks(k.size()), vs(v.size());
    std::transform(k.begin(), k.end(), ks.begin(), stored);
    std::transform(v.begin(), v.end(), vs.begin(), stored);
    model_.append(seq, first, layers, positions, ks, vs);
    for (const int32_t p : positions) next_[seq] = std::max<int64_t>(next_[seq], static_cast<int64_t>(p) + 1);
  }

  std::string append(bool one_layer) {
    const int64_t seq = pick_sequence();
    const int32_t layer = one_layer ? in_.int32_edge(-1, shape_.layers) : 0;
    const int32_t tokens = in_.chance(8) ? 0 : in_.range(1, 12);
    const int32_t layers = one_layer ? 1 : shape_.layers;
    const auto positions = positions_for(seq, tokens);
    const size_t count = static_cast<size_t>(layers) * static_cast<size_t>(tokens) * shape_.kv_heads * shape_.head_dim;
    std::vector<float> k = values(in_, count), v = values(in_, count);
    const uint8_t sizes = in_.byte();
    if (sizes < 8) k.push_back(0.f);
    else if (sizes < 16 && !v.empty()) v.pop_back();

    status want = status::success;
    const bool bad_layer = one_layer && (layer < 0 || layer >= shape_.layers);
    if (bad_layer) {
      want = model_.contains(seq) ? status::invalid_argument : status::unknown_sequence;
    } else if (!model_.contains(seq)) {
      want = status::unknown_sequence;
    } else if (tokens == 0 || std::any_of(positions.begin(), positions.end(), bad_position)) {
      want = status::invalid_argument;
    } else if (k.size() != count || v.size() != count) {
      want = status::shape_mismatch;
    } else {
      int64_t needed = 0;
      for (int32_t l = 0; l < layers; ++l)
        for (int32_t h = 0; h < shape_.kv_heads; ++h) {
          const auto n = static_cast<int32_t>(model_.head(seq, one_layer ? layer : l, h).size());
          if (n + tokens > config_.max_tokens_per_head) want = status::invalid_argument;
          needed += blocks_for(n + tokens, config_.block_size) - blocks_for(n, config_.block_size);
        }
      if (want == status::success && needed > cache_.pool().free_blocks()) want = status::pool_exhausted;
    }
    const auto ks = to_source(k), vs = to_source(v);
    const status got = one_layer ? cache_.append_layer(seq, layer, positions, ks, vs) : cache_.append(seq, positions, ks, vs);
    if (got == status::success) model_append(seq, one_layer ? layer : 0, layers, positions, k, v);
    return done(one_layer ? "append_layer" : "append", got, want);
  }

  //! One layer of a batch of 0-3 sequences in one call (a decode step's tokens), each
  //! continuing from its own next position. The batch may name an unknown sequence or one
  //! twice; the positions may not divide among it; the data may be a value short or long.
  std::string append_batch() {
    std::vector<int64_t> seqs(static_cast<size_t>(in_.range(0, 3)));
    for (int64_t& seq : seqs) seq = pick_sequence();
    const int32_t layer = in_.int32_edge(-1, shape_.layers);
    const int32_t tokens = in_.chance(8) ? 0 : in_.range(1, 4);
    std::vector<int32_t> positions;  // [B][t]
    for (const int64_t seq : seqs) {
      const auto p = positions_for(seq, tokens);
      positions.insert(positions.end(), p.begin(), p.end());
    }
    if (in_.chance(8)) positions.push_back(0);  // one too many: divides among a batch of one only
    const size_t row = static_cast<size_t>(shape_.kv_heads) * static_cast<size_t>(shape_.head_dim);
    std::vector<float> k = values(in_, positions.size() * row), v = values(in_, positions.size() * row);
    const uint8_t sizes = in_.byte();
    if (sizes < 8) k.push_back(0.f);
    else if (sizes < 16 && !v.empty()) v.pop_back();

    // The cache's order of checks (docs/errors.md): an empty batch, the layer, unknown
    // sequences, the positions, the data's size, a sequence named twice, then each head's
    // room and the pool.
    const size_t batch = seqs.size();
    const bool all_known = std::all_of(seqs.begin(), seqs.end(), [&](int64_t s) { return model_.contains(s); });
    const size_t per = batch == 0 ? 0 : positions.size() / batch;  // tokens per sequence
    status want = status::success;
    if (batch == 0) {
      want = positions.empty() && k.empty() && v.empty() ? status::success : status::shape_mismatch;
    } else if (layer < 0 || layer >= shape_.layers) {
      want = all_known ? status::invalid_argument : status::unknown_sequence;
    } else if (!all_known) {
      want = status::unknown_sequence;
    } else if (positions.empty()) {
      want = status::invalid_argument;
    } else if (positions.size() % batch != 0) {
      want = status::shape_mismatch;
    } else if (std::any_of(positions.begin(), positions.end(), bad_position)) {
      want = status::invalid_argument;
    } else if (k.size() != positions.size() * row || v.size() != k.size()) {
      want = status::shape_mismatch;
    } else if (std::set<int64_t>(seqs.begin(), seqs.end()).size() != batch) {
      want = status::invalid_argument;
    } else {
      int64_t needed = 0;
      for (const int64_t seq : seqs)
        for (int32_t h = 0; h < shape_.kv_heads; ++h) {
          const auto n = static_cast<int32_t>(model_.head(seq, layer, h).size());
          if (n + static_cast<int64_t>(per) > config_.max_tokens_per_head) want = status::invalid_argument;
          needed += blocks_for(n + static_cast<int32_t>(per), config_.block_size) - blocks_for(n, config_.block_size);
        }
      if (want == status::success && needed > cache_.pool().free_blocks()) want = status::pool_exhausted;
    }
    const auto ks = to_source(k), vs = to_source(v);
    const status got = cache_.append_layer(seqs, layer, positions, ks, vs);
    if (got == status::success)
      for (size_t b = 0; b < batch; ++b)
        model_append(seqs[b], layer, 1, std::span<const int32_t>(positions).subspan(b * per, per),
                     std::span<const float>(k).subspan(b * per * row, per * row),
                     std::span<const float>(v).subspan(b * per * row, per * row));
    return done("append_layer batch", got, want);
  }

  // ---- compression

  token_budget budget() {
    if (in_.chance(200)) return token_budget::of_tokens(in_.int32_edge(0, 40));
    return token_budget::of_ratio(in_.real());
  }
  int32_t small(int32_t hi) { return in_.int32_edge(0, hi); }
  int32_t kernel() {
    static constexpr int32_t kernels[12] = {1, 3, 5, 7, 7, 7, 0, 2, -1, 9, 15, std::numeric_limits<int32_t>::max()};
    return kernels[in_.byte() % 12];
  }
  pooling pool() { return static_cast<pooling>(in_.byte() % 3); }
  //! pyramid_budget::context: mostly 0 (the head's length), else a prompt length or an edge.
  int32_t context() { return in_.chance(64) ? in_.int32_edge(0, 64) : 0; }
  gqa_reduce reduce() { return in_.chance(16) ? gqa_reduce::per_query_head : static_cast<gqa_reduce>(in_.byte() % 3); }

  //! The shared fields of every policy: position mode, RoPE, schedule.
  template <class P>
  void extras(P& p) {
    if (in_.chance(32)) {
      p.positions = position_mode::rerotate;
      static constexpr float thetas[6] = {10000.f, 500000.f, 1.f, 0.f, -1.f, std::numeric_limits<float>::quiet_NaN()};
      p.rope.theta = thetas[in_.byte() % 6];
      p.rope.pairing = in_.chance(128) ? rope_pairing::interleaved : rope_pairing::rotate_half;
    }
    if (in_.chance(8)) p.schedule.interval = in_.int32_edge(-2, 3);
  }

  std::string compress() {
    switch (in_.byte() % 7) {
      case 0: {
        auto p = streaming_llm({.budget = budget(), .sinks = small(6), .per_query_head = in_.chance(32)});
        extras(p);
        return run_policy("streaming_llm", p);
      }
      case 1: {
        auto p = h2o({.budget = budget(), .recent = small(6), .reduce = reduce(),
                      .norm = in_.chance(128) ? accumulation_norm::sum : accumulation_norm::norm_sum});
        extras(p);
        return run_policy("h2o", p);
      }
      case 2: {
        auto p = snapkv({.budget = budget(), .window = small(6), .pool = pool(), .kernel = kernel(), .reduce = reduce()});
        extras(p);
        return run_policy("snapkv", p);
      }
      case 3: {
        auto p = pyramidkv({.budget = budget(), .window = small(6), .beta = in_.int32_edge(1, 24),
                            .form = in_.chance(64) ? pyramid_form::real : pyramid_form::integer, .pool = pool(),
                            .kernel = kernel(), .reduce = reduce(), .context = context()});
        extras(p);
        return run_policy("pyramidkv", p);
      }
      case 4: {
        const ada_kv_options o{.budget = budget(), .window = small(6), .alpha = in_.real(), .normalize = in_.chance(64),
                               .skip_layers = small(3), .pool = pool(), .kernel = kernel(), .reduce = reduce()};
        auto p = ada_kv(o);
        extras(p);
        return run_policy("ada_kv", p);
      }
      case 5: {
        const ada_kv_options o{.budget = budget(), .window = small(6), .alpha = in_.real(), .normalize = in_.chance(64),
                               .skip_layers = small(3), .pool = pool(), .kernel = kernel(), .reduce = reduce()};
        auto p = ada_pyramidkv(o, in_.int32_edge(1, 24));
        p.allocator.base.context = context();
        extras(p);
        return run_policy("ada_pyramidkv", p);
      }
      default: {
        const int32_t bs = in_.chance(160) ? config_.block_size : in_.int32_edge(1, 8);
        auto p = kv_compress({.budget = budget(), .block_size = bs, .protected_window = small(8), .sinks = small(3),
                              .kernel = kernel(), .buffer = small(3)});
        extras(p);
        return run_policy("kv_compress", p);
      }
    }
  }

  //! Runs `p` on a sequence through cpu::compress (or compress_layer, for per-layer
  //! allocators); cpu::plan on the untouched cache predicts the outcome. The device cache
  //! (host memory only for the CPU backend) applies the planned result itself.
  template <class P>
  std::string run_policy(const std::string& policy_name, const P& p) {
    const int64_t seq = pick_sequence();
    attention_shape model = shape_;
    if (in_.chance(6)) model.head_dim += 1;
    if (in_.chance(6)) model.q_heads = in_.int32_edge(0, 7);
    const bool by_layer = P::allocator_type::scope == allocation_scope::per_layer && in_.chance(64);
    const int32_t layer = by_layer ? in_.int32_edge(0, shape_.layers - 1) : 0;
    // Observation: the last `rows` positions, sometimes more rows than tokens, odd positions,
    // NaN in the queries or a buffer of the wrong size.
    const int64_t next = next_.count(seq) ? next_[seq] : 0;
    int32_t rows = in_.range(0, 6);
    std::vector<int32_t> positions(static_cast<size_t>(rows));
    for (int32_t r = 0; r < rows; ++r)
      positions[static_cast<size_t>(r)] =
          static_cast<int32_t>(std::clamp<int64_t>(next - rows + r, 0, std::numeric_limits<int32_t>::max()));
    if (in_.chance(16) && rows > 0) positions[in_.byte() % positions.size()] = in_.int32_edge(-4, 100);
    // What compress_layer expects, and what is allocated (a fuzzed Hq may be huge).
    const size_t per_layer = static_cast<size_t>(rows) * static_cast<size_t>(std::max(model.q_heads, 0)) *
                             static_cast<size_t>(model.head_dim);
    const size_t allocated = static_cast<size_t>(rows) * static_cast<size_t>(std::clamp(model.q_heads, 0, 64)) *
                             static_cast<size_t>(model.head_dim) * static_cast<size_t>(by_layer ? 1 : model.layers);
    std::vector<float> queries = values(in_, allocated, 2.f);
    if (in_.chance(8)) queries.push_back(1.f);

    cpu::compression_result planned;
    status want;
    if (!by_layer) {
      want = cpu::plan(p, cache_, seq, model, {queries, positions}, 0, model.layers, planned);
    } else if (const status v = p.validate(model); v != status::success) {
      want = v;
    } else if (layer < 0 || layer >= model.layers) {
      want = status::invalid_argument;
    } else if (queries.size() != per_layer) {
      want = status::shape_mismatch;
    } else {  // compress_layer's own widening: this layer's queries, zeros elsewhere
      std::vector<float> all(per_layer * static_cast<size_t>(model.layers), 0.f);
      std::copy(queries.begin(), queries.end(), all.begin() + static_cast<std::ptrdiff_t>(per_layer * static_cast<size_t>(layer)));
      want = cpu::plan(p, cache_, seq, model, {all, positions}, layer, 1, planned);
    }

    // Protected positions of every head, to check that they survive.
    std::vector<std::vector<int32_t>> protected_positions;
    if (want == status::success)
      for (int32_t l = 0; l < shape_.layers; ++l)
        for (int32_t h = 0; h < shape_.kv_heads; ++h) {
          std::vector<int32_t> keep;
          if (!by_layer || l == layer) {
            const auto& pos = model_.head(seq, l, h).positions;
            int64_t nxt = 0;
            for (const int32_t x : pos) nxt = std::max<int64_t>(nxt, int64_t{x} + 1);
            const auto next32 = static_cast<int32_t>(std::min<int64_t>(nxt, std::numeric_limits<int32_t>::max()));
            for (const int32_t x : pos)
              if (p.protect.contains(x, next32)) keep.push_back(x);
          }
          protected_positions.push_back(std::move(keep));
        }

    status got = want;
    if constexpr (Cache::memory == memory_space::host) {
      if constexpr (P::allocator_type::scope == allocation_scope::per_layer) {
        got = by_layer ? cpu::compress_layer(p, cache_, seq, model, layer, queries, positions)
                       : cpu::compress(p, cache_, seq, model, {queries, positions});
      } else {
        got = cpu::compress(p, cache_, seq, model, {queries, positions});
      }
    } else if (want == status::success) {
      got = cache_.apply(seq, planned.plan);
    }
    if (got == status::invalid_plan || want == status::invalid_plan)
      fail("compress " + policy_name + ": the policy produced a plan the store refuses (invalid_plan)");
    if (got == status::success && want == status::success) {
      model_.apply(seq, planned.plan);
      if (p.positions == position_mode::rerotate && Cache::memory == memory_space::host) rerotate_model(seq, p.rope);
      size_t i = 0;
      for (int32_t l = 0; l < shape_.layers; ++l)
        for (int32_t h = 0; h < shape_.kv_heads; ++h, ++i) {
          if (p.positions == position_mode::rerotate) continue;  // positions are renumbered
          const auto& pos = model_.head(seq, l, h).positions;
          for (const int32_t x : protected_positions[i])
            if (std::find(pos.begin(), pos.end(), x) == pos.end())
              fail("compress " + policy_name + ": protected position " + std::to_string(x) + " was evicted");
        }
    }
    return done(("compress " + policy_name + (by_layer ? " (one layer)" : "")), got, want);
  }

  //! cpu::rerotate on the model: keys turned to ranks 0..n-1 of the position order.
  void rerotate_model(int64_t seq, const rope_config& rope) {
    const auto d = static_cast<size_t>(shape_.head_dim);
    for (int32_t l = 0; l < shape_.layers; ++l)
      for (int32_t h = 0; h < shape_.kv_heads; ++h) {
        cache_invariants::head_state& s = model_.head(seq, l, h);
        std::vector<int32_t> order(s.size());
        std::iota(order.begin(), order.end(), 0);
        std::sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return s.positions[a] < s.positions[b]; });
        std::vector<float> keys = s.keys;
        std::vector<int32_t> positions = s.positions;
        for (size_t rank = 0; rank < order.size(); ++rank) {
          const auto slot = static_cast<size_t>(order[rank]);
          rotate_key(keys.data() + slot * d, shape_.head_dim, static_cast<int32_t>(rank) - positions[slot], rope);
          positions[slot] = static_cast<int32_t>(rank);
        }
        for (float& x : keys) x = to_float(from_float<T>(x));
        model_.rewrite(seq, l, h, positions, keys);
      }
  }

  std::string rerotate() {
    if constexpr (Cache::memory == memory_space::host) {
      const int64_t seq = pick_sequence();
      rope_config rope;
      static constexpr float thetas[5] = {10000.f, 1.f, 0.f, -3.f, std::numeric_limits<float>::infinity()};
      rope.theta = thetas[in_.byte() % 5];
      rope.pairing = in_.chance(128) ? rope_pairing::interleaved : rope_pairing::rotate_half;
      status want = rope.validate(shape_.head_dim);
      if (want == status::success && !model_.contains(seq)) want = status::unknown_sequence;
      const status got = cpu::rerotate(cache_, seq, rope);
      if (got == status::success) rerotate_model(seq, rope);
      return done("rerotate", got, want);
    } else {
      return append(false);
    }
  }

  // ---- hand-made plans

  //! Keeps a prefix of every head of a batch of sequences (the commit of a device
  //! compression). The batch may name an unknown sequence or one twice; a length may be
  //! above its head's or empty a non-empty head; the lengths may be too few or too many.
  std::string truncate() {
    std::vector<int64_t> seqs(static_cast<size_t>(in_.range(0, 3)));
    for (int64_t& seq : seqs) seq = pick_sequence();
    std::vector<int32_t> lengths;
    status want = status::success;  // the first refusal in truncate's order of checks
    for (size_t b = 0; b < seqs.size(); ++b) {
      const auto earlier = seqs.begin() + static_cast<ptrdiff_t>(b);
      const bool known = model_.contains(seqs[b]);
      if (want == status::success && !known) want = status::unknown_sequence;
      if (want == status::success && std::find(seqs.begin(), earlier, seqs[b]) != earlier) want = status::invalid_argument;
      for (int32_t l = 0; l < shape_.layers; ++l)
        for (int32_t h = 0; h < shape_.kv_heads; ++h) {
          const auto n = known ? static_cast<int32_t>(model_.head(seqs[b], l, h).size()) : 0;
          int32_t length = n == 0 ? 0 : in_.range(1, n);
          const uint8_t corruption = in_.byte();
          if (corruption < 4) length = n + 1;                  // above the head
          else if (corruption < 8 && n > 0) length = 0;        // empties it
          else if (corruption < 10) length = in_.int32_edge(-3, -1);
          if (want == status::success && (length > n || length < std::min(n, 1))) want = status::invalid_argument;
          lengths.push_back(length);
        }
    }
    const uint8_t count = in_.byte();
    if (count < 6) {
      lengths.push_back(0);
      want = status::shape_mismatch;
    } else if (count < 12 && !lengths.empty()) {
      lengths.pop_back();
      want = status::shape_mismatch;
    }
    const status got = cache_.truncate(seqs, lengths);
    if (got == status::success) {
      const int32_t* length = lengths.data();
      for (const int64_t seq : seqs) {
        eviction_plan plan(shape_.layers, shape_.kv_heads);
        for (int32_t l = 0; l < shape_.layers; ++l)
          for (int32_t h = 0; h < shape_.kv_heads; ++h) {
            std::vector<int32_t> kept(static_cast<size_t>(*length++));
            std::iota(kept.begin(), kept.end(), 0);
            plan.set_head(l, h, static_cast<int32_t>(model_.head(seq, l, h).size()), kept);
          }
        model_.apply(seq, plan);
      }
    }
    return done("truncate", got, want);
  }

  std::string apply() {
    const int64_t seq = pick_sequence();
    const bool known = model_.contains(seq);
    int32_t layers = shape_.layers, heads = shape_.kv_heads;
    const uint8_t shape_mode = in_.byte();
    if (shape_mode < 8) layers += 1;
    else if (shape_mode < 16) heads = std::max(0, heads - 1);
    eviction_plan plan(layers, heads);
    bool valid = layers == shape_.layers && heads == shape_.kv_heads;
    std::vector<int32_t> lengths;
    const uint8_t keep_rate = in_.byte();
    for (int32_t l = 0; l < layers; ++l)
      for (int32_t h = 0; h < heads; ++h) {
        const int32_t n = known && l < shape_.layers && h < shape_.kv_heads
                              ? static_cast<int32_t>(model_.head(seq, l, h).size()) : 0;
        std::vector<int32_t> kept;
        for (int32_t s = 0; s < n; ++s)
          if (in_.byte() <= keep_rate) kept.push_back(s);
        if (n > 0 && kept.empty()) kept.push_back(in_.range(0, n - 1));
        int32_t length = n;
        const uint8_t corruption = in_.byte();
        if (corruption < 4) length = n + 1, valid = false;                                 // stale length
        else if (corruption < 8 && kept.size() > 1) std::swap(kept[0], kept[1]), valid = false;  // unsorted
        else if (corruption < 12 && !kept.empty()) kept.push_back(kept.back()), valid = false;   // repeated
        else if (corruption < 16) kept.push_back(n + in_.range(0, 2)), valid = false;       // out of range
        else if (corruption < 20) kept.insert(kept.begin(), in_.int32_edge(-3, -1)), valid = false;  // negative
        else if (corruption < 24 && n > 0) kept.clear(), valid = false;                     // empties a head
        plan.set_head(l, h, length, kept);
        lengths.push_back(length);
      }
    const uint8_t metrics = in_.byte();
    if (metrics < 96) {
      std::vector<int32_t> rows = lengths;
      int32_t ml = layers, mh = heads;
      if (metrics < 6) {  // rows of another length
        if (!rows.empty()) rows[in_.byte() % rows.size()] += 1;
        valid = false;
      } else if (metrics < 12) {  // metrics of another [L][H] shape
        const uint8_t which = in_.byte() % 3;
        if (which == 0) ml = layers + 1;
        if (which == 1) ml = std::max(0, layers - 1);
        if (which == 2) mh = std::max(0, heads - 1);
        rows.assign(static_cast<size_t>(ml) * static_cast<size_t>(mh), 0);
        if (!rows.empty()) rows[in_.byte() % rows.size()] = in_.range(0, 3);
        // Metrics with no entries at all mean "no metrics", whatever their shape.
        const bool any = std::any_of(rows.begin(), rows.end(), [](int32_t n) { return n > 0; });
        if (any && (ml != layers || mh != heads)) valid = false;
      }
      plan.metrics = ragged_rows(ml, mh, rows);
      for (int32_t l = 0; l < ml; ++l)
        for (int32_t h = 0; h < mh; ++h) {
          const auto v = values(in_, plan.metrics.row(l, h).size());
          std::copy(v.begin(), v.end(), plan.metrics.row(l, h).begin());
        }
    }
    const status want = !known ? status::unknown_sequence : valid ? status::success : status::invalid_plan;
    const status got = cache_.apply(seq, plan);
    if (got == status::success) model_.apply(seq, plan);
    return done("apply", got, want);
  }

  // ---- decode attention

  std::string attend() {
    if constexpr (Cache::memory != memory_space::host) {
      return append(false);
    } else {
      const int64_t seq = pick_sequence();
      const int32_t layer = in_.int32_edge(0, shape_.layers - 1);
      int32_t q_heads = shape_.q_heads;
      if (in_.chance(24)) q_heads = in_.int32_edge(-1, 9);
      const auto acc = static_cast<decode_accumulation>(in_.byte() % 3);
      const auto red = static_cast<gqa_reduce>(in_.byte() % 4);
      // [Hq][d] as decode_attention expects it; what is allocated is capped (a fuzzed Hq may be huge).
      const size_t width = static_cast<size_t>(std::max(q_heads, 0)) * static_cast<size_t>(shape_.head_dim);
      const size_t allocated = static_cast<size_t>(std::clamp(q_heads, 0, 64)) * static_cast<size_t>(shape_.head_dim);
      std::vector<float> q = values(in_, allocated), out(allocated + (in_.chance(8) ? 1 : 0), -7.f);
      if (in_.chance(8)) q.push_back(0.f);

      status want = status::success;
      if (!model_.contains(seq)) want = status::unknown_sequence;
      else if (layer < 0 || layer >= shape_.layers) want = status::invalid_argument;
      else if (q_heads < shape_.kv_heads || q_heads % shape_.kv_heads != 0) want = status::invalid_group;
      else if (q.size() != width || out.size() != width) want = status::shape_mismatch;
      else
        for (int32_t h = 0; h < shape_.kv_heads; ++h)
          if (model_.head(seq, layer, h).size() == 0) want = status::empty_sequence;

      std::vector<float> expected(out.size(), -7.f), scratch;
      std::vector<std::vector<float>> metrics(static_cast<size_t>(shape_.kv_heads));
      if (want == status::success) {
        const int32_t group = q_heads / shape_.kv_heads;
        const size_t per_head = static_cast<size_t>(group) * shape_.head_dim;
        for (int32_t h = 0; h < shape_.kv_heads; ++h) {
          const auto& s = model_.head(seq, layer, h);
          metrics[static_cast<size_t>(h)] = s.metrics;
          const status e = cpu::attend_head(std::span<const float>(q).subspan(h * per_head, per_head), group,
                                            shape_.head_dim, s.keys, s.values,
                                            std::span<float>(expected).subspan(h * per_head, per_head), acc, red,
                                            metrics[static_cast<size_t>(h)], scratch);
          if (e != status::success) fail("attend_head on the model failed: " + name(e));
        }
      }
      const status got = cpu::decode_attention(cache_, seq, layer, q_heads, q, out, acc, red, scratch_);
      if (got == status::success && want == status::success) {
        if (!same_floats(out, expected)) fail("decode attention output differs from attend_head");
        for (int32_t h = 0; h < shape_.kv_heads; ++h) model_.set_metrics(seq, layer, h, metrics[static_cast<size_t>(h)]);
      }
      if (got != status::success && !std::all_of(out.begin(), out.end(), [](float x) { return x == -7.f; }))
        fail("a failed decode attention wrote its output");
      return done("decode_attention", got, want);
    }
  }

  // ---- rewrite and read

  //! A sequence and a (layer, head), either possibly out of range, and the model's length of
  //! that head (0 when the sequence or the head does not exist).
  struct picked_head {
    int64_t seq;
    int32_t l, h;
    bool valid_head;
    size_t n;
  };
  picked_head pick_head() {
    const int64_t seq = pick_sequence();
    const int32_t l = in_.int32_edge(0, shape_.layers - 1), h = in_.int32_edge(0, shape_.kv_heads - 1);
    const bool valid_head = l >= 0 && l < shape_.layers && h >= 0 && h < shape_.kv_heads;
    return {seq, l, h, valid_head, model_.contains(seq) && valid_head ? model_.head(seq, l, h).size() : 0};
  }

  std::string rewrite() {
    const auto [seq, l, h, valid_head, n] = pick_head();
    const size_t np = n + (in_.chance(8) ? 1 : 0);
    std::vector<int32_t> positions(np);
    for (size_t i = 0; i < np; ++i) positions[i] = in_.chance(4) ? in_.int32_edge(-3, -1) : in_.range(0, 200);
    std::vector<float> keys = values(in_, n * shape_.head_dim + (in_.chance(8) ? 1 : 0));
    status want = status::success;
    if (!model_.contains(seq)) want = status::unknown_sequence;
    else if (!valid_head) want = status::invalid_argument;
    else if (np != n || keys.size() != n * shape_.head_dim) want = status::shape_mismatch;
    else if (std::any_of(positions.begin(), positions.end(), bad_position)) want = status::invalid_argument;
    const status got = cache_.rewrite_head(seq, l, h, positions, keys);
    if (got == status::success) {
      for (float& x : keys) x = to_float(from_float<T>(x));
      model_.rewrite(seq, l, h, positions, keys);
      for (const int32_t p : positions) next_[seq] = std::max<int64_t>(next_[seq], static_cast<int64_t>(p) + 1);
    }
    return done("rewrite_head", got, want);
  }

  std::string read() {
    const auto [seq, l, h, valid_head, n] = pick_head();
    const size_t d = static_cast<size_t>(shape_.head_dim);
    const uint8_t off = in_.byte();
    std::vector<int32_t> p(n + (off == 1 ? 1 : 0));
    std::vector<float> k(n * d + (off == 2 ? 1 : 0)), m(n - (off == 3 && n > 0 ? 1 : 0) + (off == 4 ? 1 : 0));
    status want = status::success;
    if (!model_.contains(seq)) want = status::unknown_sequence;
    else if (!valid_head) want = status::invalid_argument;
    else if (p.size() != n || k.size() != n * d || m.size() != n) want = status::shape_mismatch;
    if (in_.chance(128)) {
      std::vector<float> v(n * d + (off == 5 ? 1 : 0));
      if (want == status::shape_mismatch) want = status::success;
      if (want == status::success && v.size() != n * d) want = status::shape_mismatch;
      return done("read_values", cache_.read_values(seq, l, h, v), want);
    }
    return done("read_head", cache_.read_head(seq, l, h, p, k, m), want);
  }

  Cache& cache_;
  byte_source& in_;
  paged_cache_config config_;
  attention_shape shape_;
  cache_invariants::reference_model model_;
  std::function<std::string()> mirror_;
  std::map<int64_t, int64_t> next_;  // one past the newest position of each sequence
  std::vector<float> scratch_;
  status got_ = status::success, want_ = status::success;
};

// ---- setup

paged_cache_config decode_config(byte_source& in) {
  static constexpr int32_t dims[6] = {1, 2, 4, 6, 8, 3};
  paged_cache_config c;
  c.shape.layers = in.range(1, 3);
  c.shape.kv_heads = in.range(1, 3);
  c.shape.q_heads = c.shape.kv_heads * in.range(1, 3);
  c.shape.head_dim = dims[in.byte() % 6];
  c.block_size = in.range(1, 8);
  c.num_blocks = in.range(1, 64);
  c.max_sequences = in.range(1, 4);
  c.max_tokens_per_head = in.range(1, 48);
  return c;
}

//! One time in sixteen: a field made invalid, and create() must refuse it.
bool break_config(byte_source& in, paged_cache_config& c) {
  if (!in.chance(16)) return false;
  static constexpr int32_t bads[4] = {0, -1, -2, std::numeric_limits<int32_t>::min()};
  const int32_t bad = bads[in.byte() % 4];
  switch (in.byte() % 8) {
    case 0: c.block_size = bad; break;
    case 1: c.num_blocks = bad; break;
    case 2: c.max_sequences = bad; break;
    case 3: c.max_tokens_per_head = bad; break;
    case 4: c.shape.layers = bad; break;
    case 5: c.shape.head_dim = bad; break;
    case 6: c.shape.kv_heads = bad; break;
    default: c.shape.kv_heads = 2; c.shape.q_heads = 3; break;
  }
  return c.validate() != status::success;
}

template <class Cache>
void host_cache(byte_source& in) {
  paged_cache_config config = decode_config(in);
  const bool broken = break_config(in, config);
  Cache cache;
  const status s = Cache::create(config, cache);
  status want = config.validate();
  const int32_t static_dim = Cache{}.head_dim();  // 0 for a run-time head dim
  if (want == status::success && static_dim != 0 && config.shape.head_dim != static_dim) want = status::shape_mismatch;
  if (s != want) fail("create: got " + name(s) + ", expected " + name(want));
  if (s != status::success) {
    if (cache.contains(0) || cache.pool().total_blocks != 0) fail("a failed create changed its output");
    return;
  }
  if (broken) fail("create accepted an invalid config");
  cache_run<Cache> run(cache, in, config);
  run.run();
}

void device_cache(byte_source& in) {
  using cache_t = device_paged_cache<float16>;
  const paged_cache_config config = decode_config(in);
  paged_fixtures::device_memory<float16> memory(config);
  auto buffers = memory.buffers();
  status want = status::success;
  const uint8_t mode = in.byte();
  if (mode < 8) buffers.pointers.lengths = nullptr, want = status::invalid_argument;
  else if (mode < 16) buffers.bytes.keys -= 1, want = status::shape_mismatch;
  cache_t cache;
  const status s = cache_t::create(config, device_storage<float16>{buffers, host_mover{}}, cache);
  if (s != want) fail("device create: got " + name(s) + ", expected " + name(want));
  if (s != status::success) {
    if (memory.tables[0] != 12345 || cache.contains(0)) fail("a failed device create wrote something");
    return;
  }
  cache_run<cache_t> run(cache, in, config,
                         [&] { return cache_invariants::check_mirror(cache.tables(), memory.tables, memory.lengths); });
  run.run();
}

//! The block pool alone: allocations and releases (double frees, unknown blocks, repeats)
//! against a model of which blocks are out.
void pool_only(byte_source& in) {
  const int32_t blocks = in.range(0, 40);
  block_pool pool(blocks);
  std::vector<uint8_t> out(static_cast<size_t>(blocks), 0);
  for (int ops = 0; ops < 256 && !in.empty(); ++ops) {
    const block_pool before = pool;
    const int32_t free_count = blocks - static_cast<int32_t>(std::count(out.begin(), out.end(), 1));
    if (in.chance(128)) {
      std::vector<int32_t> got(static_cast<size_t>(in.range(0, 12)));
      const status want = static_cast<int32_t>(got.size()) > free_count ? status::pool_exhausted : status::success;
      const status s = pool.allocate(got);
      if (s != want) fail("pool allocate: got " + name(s) + ", expected " + name(want));
      if (s == status::success)
        for (const int32_t b : got) {
          if (b < 0 || b >= blocks || out[static_cast<size_t>(b)]) fail("pool allocate handed out a block in use");
          out[static_cast<size_t>(b)] = 1;
        }
      else if (!(pool == before)) fail("a failed allocate changed the pool");
    } else {
      std::vector<int32_t> list(static_cast<size_t>(in.range(0, 6)));
      for (int32_t& b : list) b = in.int32_edge(-1, blocks);
      std::vector<uint8_t> seen = out;
      bool ok = true;
      for (const int32_t b : list) {
        if (b < 0 || b >= blocks || !seen[static_cast<size_t>(b)]) ok = false;
        else seen[static_cast<size_t>(b)] = 0;
      }
      const status s = pool.release(list);
      if (s != (ok ? status::success : status::invalid_argument)) fail("pool release: got " + name(s));
      if (s == status::success) out = seen;
      else if (!(pool == before)) fail("a failed release changed the pool");
    }
    if (pool.capacity() != blocks || pool.used_count() != static_cast<int32_t>(std::count(out.begin(), out.end(), 1)))
      fail("pool counts differ from the model");
    for (int32_t b = 0; b < blocks; ++b)
      if (pool.in_use(b) != (out[static_cast<size_t>(b)] != 0)) fail("pool in_use differs from the model");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  byte_source in(data, size);
  switch (in.byte() % 6) {
    case 0: host_cache<paged_cache<float>>(in); break;
    case 1: host_cache<paged_cache<float16>>(in); break;
    case 2: host_cache<paged_cache<bfloat16, 4>>(in); break;
    case 3: device_cache(in); break;
    case 4: pool_only(in); break;
    default: host_cache<paged_cache<float>>(in); break;
  }
  return 0;
}
