// Bad inputs of the CUDA backend's entry points: each is refused with its status before any
// launch or copy, so these tests need no GPU and run wherever the backend compiles (CI
// included). Device pointers are stand-ins that are never dereferenced; the device cache of
// the last tests keeps its "device" buffers in host memory with the host mover.
#include <catch2/catch.hpp>

#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <vector>

#include "kvtrim/cuda.cuh"

namespace {

namespace kv = kvtrim;
namespace cu = kvtrim::cuda;
using kv::status;

std::string name(status s) { return std::string(kv::to_string(s)); }

//! A non-null address of type U* that nothing reads.
template <class U>
U* stand_in() {
  alignas(256) static unsigned char storage[256];
  return reinterpret_cast<U*>(storage);
}

//! A valid view: 2 layers, 2 KV heads, head dim 16, block size 16.
template <kv::kv_element T = float>
cu::paged_view<T> view() {
  cu::paged_view<T> v;
  v.keys = v.values = stand_in<T>();
  v.positions = stand_in<int32_t>();
  v.metrics = stand_in<float>();
  v.block_tables = v.lengths = stand_in<const int32_t>();
  v.layers = 2;
  v.heads = 2;
  v.head_dim = 16;
  v.block_size = 16;
  v.max_blocks_per_head = 4;
  return v;
}

cu::decode_arguments<float> decode() {
  cu::decode_arguments<float> a;
  a.pool = view();
  a.rows = stand_in<const int32_t>();
  a.batch = 1;
  a.q_heads = 8;
  a.max_length = 64;
  a.q = stand_in<const float>();
  a.out = stand_in<float>();
  return a;
}

template <kv::kv_element T = float>
cu::window_score_arguments<T> window() {
  cu::window_score_arguments<T> a;
  a.pool = view<T>();
  a.rows = stand_in<const int32_t>();
  a.batch = 1;
  a.layer_count = 2;
  a.q_heads = 8;
  a.window = 4;
  a.queries = stand_in<const float>();
  a.query_positions = stand_in<const int32_t>();
  a.stride = 64;
  a.scores = stand_in<float>();
  return a;
}

cu::plan_arguments<float> plan() {
  cu::plan_arguments<float> a;
  a.pool = view();
  a.rows = stand_in<const int32_t>();
  a.batch = 1;
  a.layer_count = 2;
  a.scores = stand_in<const float>();
  a.budget.budget = kv::token_budget::of_tokens(8);
  a.stride = 64;
  a.keep = stand_in<int32_t>();
  a.kept = stand_in<uint8_t>();
  a.head_index = stand_in<int64_t>();
  a.new_metrics = stand_in<float>();
  a.error = stand_in<int32_t>();
  return a;
}

const kv::attention_shape model{2, 8, 2, 16};

template <class Policy>
cu::compress_arguments<Policy, float> compression(const Policy& policy) {
  cu::compress_arguments<Policy, float> a;
  a.policy = policy;
  a.model = model;
  a.pool = view();
  a.rows = stand_in<const int32_t>();
  a.batch = 1;
  a.obs = {stand_in<const float>(), stand_in<const int32_t>(), 4};
  a.stride = 64;
  a.keep = stand_in<int32_t>();
  a.error = stand_in<int32_t>();
  return a;
}

const kv::snapkv_policy small_snapkv = kv::snapkv({.budget = kv::token_budget::of_tokens(16), .window = 4});

}  // namespace

TEST_CASE("cuda bad input: decode_arguments are refused before any launch", "[cuda]") {
  REQUIRE(name(cu::can_implement(decode())) == name(status::success));
  const auto refused = [](const cu::decode_arguments<float>& a, status expected) {
    CHECK(name(cu::can_implement(a)) == name(expected));
    CHECK(name(cu::decode_attention(a, stand_in<void>(), nullptr)) == name(expected));
  };
  auto a = decode();
  SECTION("a null pool pointer") { a.pool.keys = nullptr; refused(a, status::invalid_argument); }
  SECTION("a negative batch") { a.batch = -1; refused(a, status::invalid_argument); }
  SECTION("a layer past the pool") { a.layer = 2; refused(a, status::invalid_argument); }
  SECTION("query heads not a multiple of the KV heads") { a.q_heads = 3; refused(a, status::invalid_group); }
  SECTION("a group above eight") { a.q_heads = 18; refused(a, status::not_supported); }
  SECTION("a head dim above 256") { a.pool.head_dim = 257; refused(a, status::not_supported); }
  SECTION("max_length below one") { a.max_length = 0; refused(a, status::invalid_argument); }
  SECTION("a split size that is negative or not a multiple of 32") {
    for (const int32_t split : {-32, -1, 1, 33, 100}) {
      CAPTURE(split);
      a.split_tokens = split;
      refused(a, status::invalid_argument);
    }
    a.split_tokens = 64;
    CHECK(name(cu::can_implement(a)) == name(status::success));
  }
  SECTION("null rows, queries or outputs") {
    a.rows = nullptr;
    refused(a, status::invalid_argument);
    a = decode();
    a.out = nullptr;
    refused(a, status::invalid_argument);
  }
  SECTION("accumulation with one metric per query head") {
    a.accumulate = kv::decode_accumulation::sum;
    a.reduce = kv::gqa_reduce::per_query_head;
    refused(a, status::not_supported);
  }
  SECTION("no workspace") { CHECK(name(cu::decode_attention(a, nullptr, nullptr)) == name(status::invalid_argument)); }
  SECTION("an empty batch is a no-op") {
    a.batch = 0;
    CHECK(name(cu::decode_attention(a, nullptr, nullptr)) == name(status::success));
  }
}

TEST_CASE("cuda bad input: window_score_arguments are refused before any launch", "[cuda]") {
  REQUIRE(name(cu::can_implement(window())) == name(status::success));
  const auto refused = [](const cu::window_score_arguments<float>& a, status expected) {
    CHECK(name(cu::can_implement(a)) == name(expected));
    CHECK(name(cu::window_scores(a, stand_in<void>(), nullptr)) == name(expected));
  };
  auto a = window();
  SECTION("no window rows") { a.window = 0; refused(a, status::window_too_large); }
  SECTION("a head dim above 256") { a.pool.head_dim = 257; refused(a, status::not_supported); }
  SECTION("query heads not a multiple of the KV heads") { a.q_heads = 7; refused(a, status::invalid_group); }
  SECTION("layers past the pool") { a.first_layer = 1; refused(a, status::invalid_argument); }
  SECTION("a zero stride") { a.stride = 0; refused(a, status::invalid_argument); }
  SECTION("null scores") { a.scores = nullptr; refused(a, status::invalid_argument); }
  SECTION("an even pooling kernel") {
    a.metric.pool = kv::pooling::max;
    a.metric.kernel = 4;
    refused(a, status::invalid_pool_kernel);
  }
  SECTION("no workspace") { CHECK(name(cu::window_scores(a, nullptr, nullptr)) == name(status::invalid_argument)); }
  SECTION("more slots to pool than the position sort takes (2^31 - 1)") {
    a.metric.pool = kv::pooling::max;
    a.metric.kernel = 7;
    a.stride = 1 << 30;  // 1 sequence x 2 layers x 2 heads x 2^30 slots
    refused(a, status::not_supported);
  }
  SECTION("an unknown window_math") {
    a.math = static_cast<cu::window_math>(7);
    refused(a, status::invalid_argument);
  }
  SECTION("tensor-core math on fp32 keys") {
    a.math = cu::window_math::tensor_cores;
    refused(a, status::not_supported);
  }
  SECTION("more sequences x layers than a grid dimension (65,535)") {
    a.batch = 32768;  // x 2 layers
    refused(a, status::not_supported);
  }
}

TEST_CASE("cuda bad input: tensor-core window scores need 16-byte aligned keys", "[cuda]") {
  auto a = window<kv::bfloat16>();
  a.math = cu::window_math::tensor_cores;
  REQUIRE(name(cu::can_implement(a)) == name(status::success));
  a.pool.keys += 1;  // 2 bytes past an aligned address: its cp.async copies would fault
  CHECK(name(cu::can_implement(a)) == name(status::not_supported));
  CHECK(name(cu::window_scores(a, stand_in<void>(), nullptr)) == name(status::not_supported));
  a.math = cu::window_math::exact;
  CHECK(name(cu::can_implement(a)) == name(status::success));  // the fp32 path reads elements
}

TEST_CASE("cuda bad input: tensor-core window scores need bf16 keys and a head dim of 8k up to 128", "[cuda]") {
  auto a = window<kv::bfloat16>();
  a.math = cu::window_math::tensor_cores;
  REQUIRE(name(cu::can_implement(a)) == name(status::success));
  const int32_t d = GENERATE(12, 136, 256);
  CAPTURE(d);
  a.pool.head_dim = d;
  CHECK(name(cu::can_implement(a)) == name(status::not_supported));
  CHECK(name(cu::window_scores(a, stand_in<void>(), nullptr)) == name(status::not_supported));
  a.math = cu::window_math::exact;
  CHECK(name(cu::can_implement(a)) == name(status::success));  // the fp32 path takes them
}

TEST_CASE("cuda bad input: plan_arguments are refused before any launch", "[cuda]") {
  REQUIRE(name(cu::can_implement(plan())) == name(status::success));
  const auto refused = [](const cu::plan_arguments<float>& a, status expected) {
    CHECK(name(cu::can_implement(a)) == name(expected));
    CHECK(name(cu::plan(a, stand_in<void>(), nullptr)) == name(expected));
  };
  auto a = plan();
  SECTION("an evictor block size below one") { a.evictor.block_size = 0; refused(a, status::invalid_argument); }
  SECTION("more heads than a grid dimension") { a.batch = 20000; refused(a, status::not_supported); }
  SECTION("a KV-Compress budget over a subset of the layers") {
    a.budget.type = cu::device_budget::kind::global_blocks;
    a.first_layer = 1;
    a.layer_count = 1;
    refused(a, status::invalid_argument);
  }
  SECTION("a KV-Compress block size below one") {
    a.budget.type = cu::device_budget::kind::global_blocks;
    a.budget.block_size = 0;
    refused(a, status::invalid_argument);
  }
  SECTION("window scores without a score buffer") { a.scores = nullptr; refused(a, status::invalid_argument); }
  SECTION("accumulated metrics without a buffer for the new ones") {
    a.source = cu::score_source::accumulated;
    a.new_metrics = nullptr;
    refused(a, status::invalid_argument);
  }
  SECTION("no workspace") { CHECK(name(cu::plan(a, nullptr, nullptr)) == name(status::invalid_argument)); }
}

TEST_CASE("cuda bad input: compaction, moves, append and the sort are refused before any launch", "[cuda]") {
  cu::compaction_arguments<float> c{view(), stand_in<const int64_t>(), stand_in<const uint8_t>(),
                                    stand_in<const int32_t>(), 4, 64, nullptr};
  REQUIRE(name(cu::can_implement(c)) == name(status::success));
  CHECK(name(cu::compact(c, nullptr, nullptr)) == name(status::invalid_argument));  // no workspace
  c.heads = 70000;
  CHECK(name(cu::compact(c, stand_in<void>(), nullptr)) == name(status::invalid_argument));
  c.heads = 4;
  c.kept = nullptr;
  CHECK(name(cu::compact(c, stand_in<void>(), nullptr)) == name(status::invalid_argument));

  cu::move_arguments<float> m{view(), stand_in<const kv::physical_move>(), nullptr, 8, 1};
  REQUIRE(name(cu::can_implement(m)) == name(status::success));
  m.segments = 70000;
  CHECK(name(cu::move_slots(m, nullptr, nullptr)) == name(status::invalid_argument));
  m.segments = 1;
  m.moves = nullptr;
  CHECK(name(cu::move_slots(m, nullptr, nullptr)) == name(status::invalid_argument));
  m.stride = 0;  // nothing to move: a no-op
  CHECK(name(cu::move_slots(m, nullptr, nullptr)) == name(status::success));

  cu::append_arguments<float> p;
  p.pool = view();
  p.keys = p.values = stand_in<const float>();
  p.slots = stand_in<const int64_t>();
  p.positions = stand_in<const int32_t>();
  p.rows = 8;
  p.heads = 2;
  p.tokens = 4;
  REQUIRE(name(cu::can_implement(p)) == name(status::success));
  p.heads = 0;
  CHECK(name(cu::append(p, nullptr, nullptr)) == name(status::invalid_argument));
  p.heads = 2;
  p.slots = nullptr;
  CHECK(name(cu::append(p, nullptr, nullptr)) == name(status::invalid_argument));
  p.rows = 0;  // nothing to write: a no-op
  CHECK(name(cu::append(p, nullptr, nullptr)) == name(status::success));

  cu::radix_sort_arguments r{};
  r.items = int64_t{std::numeric_limits<int32_t>::max()} + 1;
  CHECK(name(cu::radix_sort(r, nullptr, nullptr)) == name(status::not_supported));
  r.items = 8;
  r.end_bit = 65;
  CHECK(name(cu::radix_sort(r, nullptr, nullptr)) == name(status::invalid_argument));
  r.end_bit = 0;
  CHECK(name(cu::radix_sort(r, nullptr, nullptr)) == name(status::invalid_argument));
  r.items = 0;  // nothing to sort: a no-op
  r.end_bit = 64;
  CHECK(name(cu::radix_sort(r, nullptr, nullptr)) == name(status::success));
}

TEST_CASE("cuda bad input: compress_arguments are refused before any launch", "[cuda]") {
  REQUIRE(name(cu::can_implement(compression(small_snapkv))) == name(status::success));
  auto a = compression(small_snapkv);
  const auto refused = [](const auto& args, status expected) {
    CHECK(name(cu::can_implement(args)) == name(expected));
    CHECK(name(cu::compress_on_device(args, stand_in<void>(), nullptr)) == name(expected));
    CHECK(cu::workspace_size(args) == 0);  // nothing to size for arguments that cannot run
  };
  SECTION("re-rotated positions") {
    a.policy.positions = kv::position_mode::rerotate;
    refused(a, status::not_supported);
  }
  SECTION("a budget below the protected window") {
    a.policy = kv::snapkv({.budget = kv::token_budget::of_tokens(2), .window = 4});
    refused(a, status::budget_below_protected);
  }
  SECTION("a pool whose heads are not the policy's stored heads") {
    a.pool.heads = 4;
    refused(a, status::shape_mismatch);
  }
  SECTION("window scores without window queries") {
    a.obs.rows = 0;
    refused(a, status::window_too_large);
  }
  SECTION("no buffer for the new lengths or the device error") {
    a.keep = nullptr;
    CHECK(name(cu::can_implement(a)) == name(status::invalid_argument));
    a = compression(small_snapkv);
    a.error = nullptr;
    CHECK(name(cu::compress_on_device(a, stand_in<void>(), nullptr)) == name(status::invalid_argument));
  }
  SECTION("Ada-KV with normalised scores") {
    auto policy = kv::ada_kv({.budget = kv::token_budget::of_tokens(16), .window = 4});
    policy.allocator.normalize = true;
    refused(compression(policy), status::not_supported);
  }
  SECTION("no workspace") {
    CHECK(name(cu::compress_on_device(a, nullptr, nullptr)) == name(status::invalid_argument));
  }
  SECTION("tensor-core window scores on fp32 keys") {
    a.math = cu::window_math::tensor_cores;
    refused(a, status::not_supported);
  }
  SECTION("a negative piece size") {
    a.piece_slots = -1;
    refused(a, status::invalid_argument);
  }
  SECTION("tensor-core math does not concern a policy without window scores") {
    auto positional = compression(kv::streaming_llm({.budget = kv::token_budget::of_tokens(16), .sinks = 4}));
    positional.obs.rows = 0;
    positional.math = cu::window_math::tensor_cores;
    CHECK(name(cu::can_implement(positional)) == name(status::success));
  }
}

// A named namespace: its members are read only by concept checks, which nvcc's "never
// referenced" diagnostic does not count for entities of an unnamed namespace.
namespace engine_policy {

//! An engine's own allocator: the CPU backend runs it, the device has no form of it.
struct engine_allocator {
  using kvc_concept = kv::budget_allocator_tag;
  static constexpr kv::allocation_scope scope = kv::allocation_scope::per_layer;
  static constexpr bool needs_scores = false;
  [[nodiscard]] status validate(const kv::attention_shape&, const kv::protected_set&) const { return status::success; }
  [[nodiscard]] status allocate(const kv::candidate_table&, const kv::allocation_context&, std::span<int32_t>) const {
    return status::success;
  }
};

}  // namespace engine_policy

TEST_CASE("cuda::supports says which policies the device runs, before anything is allocated", "[cuda]") {
  const auto b = kv::token_budget::of_tokens(64);
  CHECK(name(cu::supports<float>(kv::streaming_llm({.budget = b, .sinks = 4}), model)) == name(status::success));
  CHECK(name(cu::supports<float>(kv::h2o({.budget = b, .recent = 8}), model)) == name(status::success));
  CHECK(name(cu::supports<float>(kv::snapkv({.budget = b, .window = 8}), model)) == name(status::success));
  CHECK(name(cu::supports<float>(kv::pyramidkv({.budget = b, .window = 8}), model)) == name(status::success));
  CHECK(name(cu::supports<float>(kv::ada_kv({.budget = b, .window = 8}), model)) == name(status::success));
  CHECK(name(cu::supports<float>(kv::kv_compress({.budget = b, .protected_window = 8}), model)) ==
        name(status::success));

  kv::policy<kv::window_attention, engine_policy::engine_allocator, kv::topk_evictor> custom;
  custom.metric = kv::snapkv({.budget = b, .window = 8}).metric;
  custom.protect = kv::snapkv({.budget = b, .window = 8}).protect;
  CHECK(name(cu::supports<float>(custom, model)) == name(status::not_supported));
  auto normalized = kv::ada_kv({.budget = b, .window = 8});
  normalized.allocator.normalize = true;
  CHECK(name(cu::supports<float>(normalized, model)) == name(status::not_supported));
  auto rerotating = kv::snapkv({.budget = b, .window = 8});
  rerotating.positions = kv::position_mode::rerotate;
  CHECK(name(cu::supports<float>(rerotating, model)) == name(status::not_supported));
  CHECK(name(cu::supports<float>(kv::snapkv({.budget = kv::token_budget::of_tokens(2), .window = 8}), model)) ==
        name(status::budget_below_protected));  // the policy's own validation
  const kv::attention_shape wide{2, 8, 2, 512};
  CHECK(name(cu::supports<float>(kv::snapkv({.budget = b, .window = 8}), wide)) ==
        name(status::not_supported));  // window scores take head dims up to 256
  CHECK(name(cu::supports<float>(kv::streaming_llm({.budget = b, .sinks = 4}), wide)) == name(status::success));

  const auto tc = cu::window_math::tensor_cores;
  CHECK(name(cu::supports<kv::bfloat16>(kv::snapkv({.budget = b, .window = 8}), model, tc)) == name(status::success));
  CHECK(name(cu::supports<float>(kv::snapkv({.budget = b, .window = 8}), model, tc)) == name(status::not_supported));
  CHECK(name(cu::supports<float>(kv::streaming_llm({.budget = b, .sinks = 4}), model, tc)) ==
        name(status::success));  // no window scores: the math does not apply
}

namespace {

//! A device_paged_cache whose "device" buffers are host vectors (host mover): sequence 1
//! holds 40 tokens in every head, sequence 2 none; two more rows free.
struct host_backed_cache {
  kv::paged_cache_config config{model_stored(), 16, 64, 4, 128};
  kv::paged_buffer_sizes sizes = kv::buffer_sizes<float>(config);
  std::vector<float> keys, values, metrics;
  std::vector<int32_t> positions, tables, lengths;
  kv::device_paged_cache<float> cache;

  static kv::attention_shape model_stored() { return {model.layers, model.q_heads, model.kv_heads, model.head_dim}; }

  host_backed_cache()
      : keys(sizes.keys), values(sizes.values), metrics(sizes.metrics), positions(sizes.positions),
        tables(sizes.block_tables), lengths(sizes.lengths) {
    const kv::device_buffers<float> b{{keys.data(), values.data(), positions.data(), metrics.data(), tables.data(),
                                       lengths.data()},
                                      sizes};
    REQUIRE(kv::device_paged_cache<float>::create(config, kv::device_storage<float>{b, kv::host_mover{}}, cache) ==
            status::success);
    REQUIRE(cache.add_sequence(1) == status::success);
    REQUIRE(cache.add_sequence(2) == status::success);
    const int32_t tokens = 40;
    std::vector<int32_t> pos(tokens);
    for (int32_t t = 0; t < tokens; ++t) pos[static_cast<size_t>(t)] = t;
    const std::vector<float> kvs(static_cast<size_t>(model.layers) * tokens * model.kv_heads * model.head_dim, 0.5f);
    REQUIRE(cache.append(1, pos, kvs, kvs) == status::success);
  }
};

}  // namespace

TEST_CASE("cuda bad input: compress and decode on a device cache refuse before touching it", "[cuda]") {
  host_backed_cache c;
  const kv::pool_usage before = c.cache.pool();
  const std::vector<int64_t> one{1}, unknown{9}, empty{2}, twice{1, 1}, apart{1, 2, 1};
  const cu::device_observation obs{stand_in<const float>(), stand_in<const int32_t>(), 4};
  void* ws = stand_in<void>();
  const size_t big = std::numeric_limits<size_t>::max();

  CHECK(name(cu::compress(small_snapkv, c.cache, std::span<const int64_t>{}, model, obs, nullptr, 0, nullptr)) ==
        name(status::success));  // an empty batch is a no-op
  CHECK(name(cu::compress(small_snapkv, c.cache, unknown, model, obs, ws, big, nullptr)) ==
        name(status::unknown_sequence));
  CHECK(name(cu::compress(small_snapkv, c.cache, empty, model, obs, ws, big, nullptr)) == name(status::empty_sequence));
  CHECK(name(cu::compress(small_snapkv, c.cache, twice, model, obs, ws, big, nullptr)) ==
        name(status::invalid_argument));  // two CTAs would compact one head
  CHECK(name(cu::compress(small_snapkv, c.cache, apart, model, obs, ws, big, nullptr)) ==
        name(status::invalid_argument));  // a repeat with another id between
  CHECK(name(cu::compress(small_snapkv, c.cache, one, model, {obs.queries, obs.positions, 41}, ws, big, nullptr)) ==
        name(status::window_too_large));  // 41 window rows, 40 tokens
  CHECK(name(cu::compress(small_snapkv, c.cache, one, model, obs, nullptr, 0, nullptr)) ==
        name(status::invalid_argument));  // no workspace
  CHECK(name(cu::compress(small_snapkv, c.cache, one, model, obs, ws, 16, nullptr)) ==
        name(status::invalid_argument));  // too small a workspace
  kv::snapkv_policy rerotating = small_snapkv;
  rerotating.positions = kv::position_mode::rerotate;
  CHECK(name(cu::compress(rerotating, c.cache, one, model, obs, ws, big, nullptr)) == name(status::not_supported));
  CHECK(cu::compress_workspace_size(rerotating, c.cache, model, 1, 4) == 0);
  CHECK(name(cu::compress(small_snapkv, c.cache, one, model, obs, ws, big, nullptr, cu::window_math::tensor_cores)) ==
        name(status::not_supported));  // fp32 keys
  CHECK(name(cu::compress(small_snapkv, c.cache, one, model, obs, ws, big, nullptr, cu::window_math::automatic, -1)) ==
        name(status::invalid_argument));  // a negative piece size
  CHECK(cu::compress_workspace_size(small_snapkv, c.cache, model, 1, 4, -1) == 0);

  const auto decode = [&](std::span<const int64_t> seqs, int32_t layer, size_t bytes) {
    return name(cu::decode_attention(c.cache, seqs, layer, model.q_heads, stand_in<const float>(), stand_in<float>(),
                                     kv::decode_accumulation::sum, kv::gqa_reduce::mean, ws, bytes, nullptr));
  };
  CHECK(decode(unknown, 0, big) == name(status::unknown_sequence));
  CHECK(decode(empty, 0, big) == name(status::empty_sequence));
  CHECK(decode(twice, 0, big) == name(status::invalid_argument));  // both would add to its slot metrics
  CHECK(decode(apart, 0, big) == name(status::invalid_argument));
  CHECK(decode(one, 2, big) == name(status::invalid_argument));  // a layer past the model
  CHECK(decode(one, 0, 16) == name(status::invalid_argument));   // too small a workspace

  // Nothing changed.
  for (int32_t l = 0; l < model.layers; ++l)
    for (int32_t h = 0; h < model.kv_heads; ++h) CHECK(c.cache.head_length(1, l, h) == 40);
  CHECK(c.cache.pool() == before);
}

TEST_CASE("cuda bad input: the device session refuses bad limits, workspaces and batches", "[cuda]") {
  using session = cu::compression_session<kv::snapkv_policy, float, kv::dynamic_head_dim, kv::host_mover>;
  host_backed_cache c;
  void* ws = stand_in<void>();
  const size_t big = std::numeric_limits<size_t>::max();
  const size_t need = session::workspace_size(small_snapkv, c.cache, model, 1, 4);
  REQUIRE(need > 0);
  session s;
  const auto create = [&](const kv::snapkv_policy& p, int32_t max_batch, int32_t max_rows, void* w, size_t bytes) {
    return name(session::create(c.cache, model, p, max_batch, max_rows, w, bytes, nullptr, s));
  };
  kv::snapkv_policy rerotating = small_snapkv;
  rerotating.positions = kv::position_mode::rerotate;
  CHECK(create(rerotating, 1, 4, ws, big) == name(status::not_supported));
  CHECK(create(kv::snapkv({.budget = kv::token_budget::of_tokens(2), .window = 4}), 1, 4, ws, big) ==
        name(status::budget_below_protected));
  CHECK(create(small_snapkv, 0, 4, ws, big) == name(status::invalid_argument));   // no sequence a call
  CHECK(create(small_snapkv, 1, -1, ws, big) == name(status::invalid_argument));  // negative rows
  CHECK(create(small_snapkv, 1, 0, ws, big) == name(status::invalid_argument));   // window scores need rows
  CHECK(create(small_snapkv, 1, 4, nullptr, big) == name(status::invalid_argument));
  CHECK(create(small_snapkv, 1, 4, ws, need - 1) == name(status::invalid_argument));
  CHECK(session::workspace_size(small_snapkv, c.cache, model, 1, 4, -1) == 0);
  CHECK(name(session::create(c.cache, model, small_snapkv, 1, 4, ws, big, nullptr, s, -1)) ==
        name(status::invalid_argument));  // a negative piece size
  // Pieces of one (sequence, layer) need less than the default's one piece, and a workspace
  // sized for them is too small for the default.
  const size_t in_pieces = session::workspace_size(small_snapkv, c.cache, model, 1, 4, 1);
  CHECK(in_pieces < need);
  CHECK(name(session::create(c.cache, model, small_snapkv, 1, 4, ws, in_pieces, nullptr, s, 1)) ==
        name(status::success));
  CHECK(create(small_snapkv, 1, 4, ws, in_pieces) == name(status::invalid_argument));
  s = session{};
  CHECK(name(s.add_sequence(3)) == name(status::invalid_argument));  // never created

  REQUIRE(create(small_snapkv, 1, 4, ws, need) == name(status::success));
  const kv::pool_usage before = c.cache.pool();
  const std::vector<int64_t> one{1}, three{3}, both{3, 4}, twice{3, 3};
  const cu::device_observation obs{stand_in<const float>(), stand_in<const int32_t>(), 4};
  const cu::device_observation too_many_rows{obs.queries, obs.positions, 5};
  std::vector<int64_t> compressed{42};

  // Sequence 1 is in the cache but not in the session.
  const std::vector<float> token(static_cast<size_t>(model.kv_heads) * model.head_dim, 0.5f);
  const std::vector<int32_t> at{40};
  CHECK(name(s.append(one, 0, at, token, token)) == name(status::unknown_sequence));
  CHECK(name(s.finish_prefill(one, obs)) == name(status::unknown_sequence));
  CHECK(name(s.compress(one, obs)) == name(status::unknown_sequence));
  CHECK(name(s.attend(one, 0, stand_in<const float>(), stand_in<float>())) == name(status::unknown_sequence));
  CHECK(name(s.end_decode_step(one, obs, compressed)) == name(status::unknown_sequence));
  CHECK(compressed.empty());
  CHECK(name(s.free_sequence(1)) == name(status::unknown_sequence));
  CHECK(name(s.add_sequence(1)) == name(status::invalid_argument));  // the cache has it
  CHECK_FALSE(s.contains(1));
  CHECK(c.cache.head_length(1, 0, 0) == 40);

  REQUIRE(name(s.add_sequence(3)) == name(status::success));
  REQUIRE(name(s.add_sequence(4)) == name(status::success));
  CHECK(name(s.add_sequence(5)) == name(status::pool_exhausted));  // four rows
  CHECK_FALSE(s.contains(5));
  CHECK(name(s.end_decode_step(both, obs, compressed)) == name(status::invalid_argument));  // over max_batch 1
  CHECK(name(s.end_decode_step(twice, obs, compressed)) == name(status::invalid_argument));
  CHECK(name(s.end_decode_step(three, too_many_rows, compressed)) == name(status::invalid_argument));
  CHECK(s.decode_steps(3) == 0);  // refused steps are not counted
  CHECK(name(s.finish_prefill(three, obs)) == name(status::empty_sequence));
  CHECK(name(s.attend(three, 0, stand_in<const float>(), stand_in<float>())) == name(status::empty_sequence));
  // SnapKV compresses after prefill only: a decode step counts and launches nothing.
  REQUIRE(name(s.end_decode_step(three, obs, compressed)) == name(status::success));
  CHECK(compressed.empty());
  CHECK(s.decode_steps(3) == 1);
  CHECK(s.decode_steps(4) == 0);
  CHECK(s.decode_steps(9) == -1);
  CHECK(c.cache.pool() == before);

  REQUIRE(name(s.free_sequence(3)) == name(status::success));
  CHECK_FALSE(s.contains(3));
  CHECK_FALSE(c.cache.contains(3));
}
