// The device-side entry points allocate nothing and never synchronise, so an engine can
// capture them in a CUDA graph: captured and replayed, they give what an eager launch gives.
// The compression step is Ada-KV's (window scores, both sorts, compaction), with both window
// maths.
#include "parity_support.cuh"

#include <cstring>
#include <type_traits>

namespace {

using namespace kvtrim_test;
namespace kv = kvtrim;

//! A stream, and a graph captured on it by `record(stream)`.
struct captured_graph {
  cudaStream_t stream = nullptr;
  cudaGraphExec_t exec = nullptr;

  captured_graph() { REQUIRE(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking) == cudaSuccess); }
  ~captured_graph() {
    if (exec) cudaGraphExecDestroy(exec);
    cudaStreamDestroy(stream);
  }
  captured_graph(const captured_graph&) = delete;
  captured_graph& operator=(const captured_graph&) = delete;

  template <class F>
  void capture(F&& record) {
    cudaGraph_t graph = nullptr;
    REQUIRE(cudaStreamBeginCapture(stream, cudaStreamCaptureModeGlobal) == cudaSuccess);
    const status s = record(stream);
    REQUIRE(cudaStreamEndCapture(stream, &graph) == cudaSuccess);
    require_ok(s);
    REQUIRE(cudaGraphInstantiate(&exec, graph, 0) == cudaSuccess);
    cudaGraphDestroy(graph);
  }
  void replay() {
    REQUIRE(cudaGraphLaunch(exec, stream) == cudaSuccess);
    REQUIRE(cudaStreamSynchronize(stream) == cudaSuccess);
  }
};

//! Launches `launch(eager, stream)` on the default stream, then captures `launch(graph, s)` in a
//! graph and replays it.
template <class Args, class Launch>
void eager_then_replay(const Args& eager, const Args& graph, Launch&& launch) {
  require_ok(launch(eager, cudaStream_t{}));
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  captured_graph g;
  g.capture([&](cudaStream_t s) { return launch(graph, s); });
  g.replay();
}

template <class U>
bool same_bytes(const std::vector<U>& a, const std::vector<U>& b) {
  return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(U)) == 0;
}

//! Two identical device caches: one for the eager run, one for the graph. Their pools start
//! zeroed, so whole buffers compare equal where no token was ever written. `rows` holds the
//! mirror row of each sequence on the device (the same in both caches).
template <kv::kv_element T>
struct identical_pair {
  twin_caches<T> eager, graph;
  device_memory rows;
  identical_pair(const kv::paged_cache_config& c, const std::vector<int64_t>& seqs, int32_t tokens)
      : eager(c), graph(c), rows(seqs.size() * sizeof(int32_t)) {
    for (auto* t : {&eager, &graph}) {
      for (const device_memory* m : {&t->keys, &t->values, &t->positions, &t->metrics})
        REQUIRE(cudaMemset(m->template as<void>(), 0, m->bytes()) == cudaSuccess);
      std::mt19937 rng(7);
      for (const int64_t s : seqs) {
        require_ok(t->device.add_sequence(s));
        require_ok(t->host.add_sequence(s));
        t->append(s, 0, tokens - static_cast<int32_t>(s), rng);
      }
    }
    std::vector<int32_t> slots;
    for (const int64_t s : seqs) slots.push_back(eager.device.tables().sequence_slot(s));
    upload(rows, slots);
  }
};

//! `n` standard normal values from `seed`.
std::vector<float> gaussian(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.f, 1.f);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

}  // namespace

TEMPLATE_TEST_CASE("decode attention captured in a CUDA graph matches the eager launch", "[cuda]", float,
                   kv::bfloat16) {
  const int32_t d = GENERATE(8, 128);
  CAPTURE(d);
  const kv::attention_shape shape{2, 8, 2, d};
  const kv::paged_cache_config config{shape, 16, 2 * 2 * 2 * (300 / 16 + 2), 2, 300};
  const std::vector<int64_t> seqs{1, 2};
  identical_pair<TestType> pair(config, seqs, 260);
  const size_t width = seqs.size() * static_cast<size_t>(shape.q_heads) * d;
  const std::vector<float> q = gaussian(width, 3);
  device_memory dq(width * sizeof(float)), out_eager(width * sizeof(float)), out_graph(width * sizeof(float));
  upload(dq, q);

  const auto arguments = [&](twin_caches<TestType>& c, float* out) {
    kv::cuda::decode_arguments<TestType> a;
    a.pool = kv::cuda::make_view(c.device.buffers(), c.config);
    a.rows = pair.rows.template as<int32_t>();
    a.batch = static_cast<int32_t>(seqs.size());
    a.layer = 1;
    a.q_heads = shape.q_heads;
    a.max_length = config.max_tokens_per_head;
    a.q = dq.as<float>();
    a.out = out;
    a.accumulate = kv::decode_accumulation::sum;  // the metric update is part of the graph
    a.reduce = kv::gqa_reduce::mean;
    return a;
  };
  const auto eager_args = arguments(pair.eager, out_eager.as<float>());
  const auto graph_args = arguments(pair.graph, out_graph.as<float>());
  device_memory ws(kv::cuda::workspace_size(eager_args));

  eager_then_replay(eager_args, graph_args, [&](const auto& a, cudaStream_t s) {
    return kv::cuda::decode_attention(a, ws.as<void>(), s);
  });

  CHECK(same_bytes(download(out_eager.as<float>(), width), download(out_graph.as<float>(), width)));
  const size_t slots = static_cast<size_t>(config.num_blocks) * config.block_size;
  CHECK(same_bytes(download(eager_args.pool.metrics, slots), download(graph_args.pool.metrics, slots)));
}

namespace {

//! One compression step with `policy` (window rows_per_seq), eager on one cache and replayed
//! from a graph on its twin: the same lengths, K, V and positions, byte for byte.
template <class Policy, kv::kv_element TestType>
void check_compression_graph(const Policy& policy, int32_t d, kv::cuda::window_math math, int32_t rows_per_seq) {
  const kv::attention_shape model{2, 8, 2, d};
  const kv::paged_cache_config config{model, 16, 2 * 2 * 2 * (220 / 16 + 2), 2, 220};
  const std::vector<int64_t> seqs{1, 2};
  identical_pair<TestType> pair(config, seqs, 200);

  const size_t queries = seqs.size() * static_cast<size_t>(model.layers) * rows_per_seq * model.q_heads * d;
  const std::vector<float> q = gaussian(queries, 5);
  std::vector<int32_t> positions;
  for (const int64_t s : seqs)
    for (int32_t r = 0; r < rows_per_seq; ++r) positions.push_back(200 - static_cast<int32_t>(s) - rows_per_seq + r);
  device_memory dq(queries * sizeof(float)), dpos(positions.size() * sizeof(int32_t));
  upload(dq, q);
  upload(dpos, positions);
  const int64_t heads = static_cast<int64_t>(seqs.size()) * model.layers * model.kv_heads;
  device_memory keep_eager(heads * sizeof(int32_t)), keep_graph(heads * sizeof(int32_t)), error(2 * sizeof(int32_t));

  using args_t = kv::cuda::compress_arguments<Policy, TestType>;
  const auto arguments = [&](twin_caches<TestType>& c, int32_t* keep, int32_t* err) {
    args_t a;
    a.policy = policy;
    a.model = model;
    a.pool = kv::cuda::make_view(c.device.buffers(), c.config);
    a.rows = pair.rows.template as<int32_t>();
    a.batch = static_cast<int32_t>(seqs.size());
    a.obs = {dq.as<float>(), dpos.as<int32_t>(), rows_per_seq};
    a.stride = config.max_tokens_per_head;
    a.keep = keep;
    a.error = err;
    a.math = math;
    return a;
  };
  const args_t eager_args = arguments(pair.eager, keep_eager.as<int32_t>(), error.as<int32_t>());
  const args_t graph_args = arguments(pair.graph, keep_graph.as<int32_t>(), error.as<int32_t>() + 1);
  device_memory ws(kv::cuda::workspace_size(eager_args));

  eager_then_replay(eager_args, graph_args, [&](const auto& a, cudaStream_t s) {
    return kv::cuda::compress_on_device(a, ws.as<void>(), s);
  });

  const std::vector<int32_t> errors = download(error.as<int32_t>(), 2);
  CHECK(errors[0] == 0);
  CHECK(errors[1] == 0);
  CHECK(download(keep_eager.as<int32_t>(), static_cast<size_t>(heads)) ==
        download(keep_graph.as<int32_t>(), static_cast<size_t>(heads)));
  const size_t slots = static_cast<size_t>(config.num_blocks) * config.block_size;
  const size_t elements = slots * static_cast<size_t>(d);
  CHECK(same_bytes(download(eager_args.pool.keys, elements), download(graph_args.pool.keys, elements)));
  CHECK(same_bytes(download(eager_args.pool.values, elements), download(graph_args.pool.values, elements)));
  CHECK(same_bytes(download(eager_args.pool.positions, slots), download(graph_args.pool.positions, slots)));
}

}  // namespace

// Ada-KV ranks by sorting every head; SnapKV's per-head budget selects each head's kept slots.
TEMPLATE_TEST_CASE("a compression step captured in a CUDA graph matches the eager launch", "[cuda]", float,
                   kv::bfloat16) {
  const int32_t d = GENERATE(8, 128);
  const auto math = GENERATE(kv::cuda::window_math::exact, kv::cuda::window_math::tensor_cores);
  if (math == kv::cuda::window_math::tensor_cores && !std::is_same_v<TestType, kv::bfloat16>) return;  // bf16 keys only
  CAPTURE(d, static_cast<int>(math));
  SECTION("Ada-KV") {
    check_compression_graph<kv::ada_snapkv_policy, TestType>(
        kv::ada_kv({.budget = kv::token_budget::of_tokens(64), .window = 8}), d, math, 8);
  }
  SECTION("SnapKV") {
    check_compression_graph<kv::snapkv_policy, TestType>(
        kv::snapkv({.budget = kv::token_budget::of_tokens(64), .window = 8}), d, math, 8);
  }
}
