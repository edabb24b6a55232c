// One layer's compression step (scores + budgets + plan + compaction, on the device, without
// the host commit) at the Llama-3-8B shape: B in {1, 8}, n in {4k, 32k, 128k}, for SnapKV
// (C = n / 16, w 32, k 7), Ada-KV (same budget) and KV-Compress (M = n / 16); window scores on
// fp32 CUDA cores (tc:0, window_math::exact) and with bf16x3 tensor-core MMAs (tc:1). Queries
// are random fp32 values, or with q16:1 random bf16 values, as a bf16 model's projections give
// them (and as the PyTorch peer's step takes them): their low bf16 terms are zero, so the
// tensor-core path needs one MMA per logit tile instead of three. The SnapKV window scores
// alone (bm_snapkv_window_scores) split a step's time into scoring and the rest (ranking,
// budgets, compaction). bm_snapkv_pieces sweeps the step's piece size (compress_arguments::
// piece_slots; 0: the library's): workspace against the time of a launch a piece.
#include "bench_support.cuh"

#include <memory>
#include <utility>

namespace {
using namespace kvtrim_bench;

constexpr int32_t window = 32;  //!< observation rows of every step

kvtrim::cuda::window_math math_of(const benchmark::State& state) {
  return state.range(2) != 0 ? kvtrim::cuda::window_math::tensor_cores : kvtrim::cuda::window_math::exact;
}

//! Rounds each value to the nearest bf16 value (kept in fp32).
__global__ void round_to_bf16_kernel(float* x, size_t count) {
  for (size_t i = blockIdx.x * static_cast<size_t>(blockDim.x) + threadIdx.x; i < count;
       i += static_cast<size_t>(gridDim.x) * blockDim.x)
    x[i] = kvtrim::to_float(kvtrim::from_float<kvtrim::bfloat16>(x[i]));
}

//! A layer cache of B sequences of n tokens, their last `window` queries (bf16 values with
//! `bf16_queries`) and positions, and their mirror rows, all on the device.
struct step_inputs {
  int32_t batch, n;
  layer_cache c;
  device_memory queries, positions, rows;

  step_inputs(int32_t b, int32_t tokens, bool bf16_queries)
      : batch(b), n(tokens), c(b, tokens),
        queries(static_cast<size_t>(b) * window * q_heads * head_dim * sizeof(float)),
        positions(static_cast<size_t>(b) * window * sizeof(int32_t)), rows(static_cast<size_t>(b) * sizeof(int32_t)) {
    if (!c.ok) return;
    fill_random(queries.as<float>(), queries.bytes / sizeof(float), 4);
    if (bf16_queries) round_to_bf16_kernel<<<1024, 256>>>(queries.as<float>(), queries.bytes / sizeof(float));
    std::vector<int32_t> pos(static_cast<size_t>(batch) * window), slot(static_cast<size_t>(batch));
    for (int32_t s = 0; s < batch; ++s) {
      for (int32_t r = 0; r < window; ++r) pos[static_cast<size_t>(s) * window + r] = n - window + r;
      slot[static_cast<size_t>(s)] = c.cache.tables().sequence_slot(s);
    }
    cudaMemcpy(positions.ptr, pos.data(), positions.bytes, cudaMemcpyHostToDevice);
    cudaMemcpy(rows.ptr, slot.data(), rows.bytes, cudaMemcpyHostToDevice);
  }
};

//! The inputs of a benchmark with args (B, n, tc, q16); null, the benchmark skipped, without a
//! GPU or the memory for them.
std::unique_ptr<step_inputs> inputs_or_skip(benchmark::State& state) {
  if (!have_device()) {
    state.SkipWithError("no CUDA device");
    return nullptr;
  }
  auto in = std::make_unique<step_inputs>(static_cast<int32_t>(state.range(0)), static_cast<int32_t>(state.range(1)),
                                          state.range(3) != 0);
  if (!in->c.ok) {
    state.SkipWithError("cache setup failed (device memory?)");
    return nullptr;
  }
  return in;
}

template <class P>
void run_step(benchmark::State& state, const P& policy, int64_t piece_slots = 0) {
  const std::unique_ptr<step_inputs> inputs = inputs_or_skip(state);
  if (!inputs) return;
  step_inputs& in = *inputs;  // make_view takes the cache's writable buffers
  const int32_t batch = in.batch, n = in.n;
  layer_cache& c = in.c;
  const kvtrim::attention_shape model{1, q_heads, kv_heads, head_dim};
  device_memory keep(static_cast<size_t>(batch) * kv_heads * sizeof(int32_t)), error(sizeof(int32_t));
  kvtrim::cuda::compress_arguments<P, element> a;
  a.policy = policy;
  a.model = model;
  a.pool = kvtrim::cuda::make_view(c.cache.buffers(), c.config);
  a.rows = in.rows.as<int32_t>();
  a.batch = batch;
  a.obs = {in.queries.as<float>(), in.positions.as<int32_t>(), window};
  a.stride = c.config.max_tokens_per_head;
  a.keep = keep.as<int32_t>();
  a.error = error.as<int32_t>();
  a.math = math_of(state);
  a.piece_slots = piece_slots;
  const size_t ws_bytes = kvtrim::cuda::workspace_size(a);
  device_memory ws(ws_bytes);
  // Repeated steps on the same (already compacted) cache: the first iteration compacts, the
  // rest measure the steady state of scoring and planning a full-length head (lengths are
  // not committed, so every step sees n tokens).
  time_launches(state, [&](cudaStream_t stream) { return kvtrim::cuda::compress_on_device(a, ws.ptr, stream); });
  const double kv_bytes = 2.0 * batch * kv_heads * static_cast<double>(n) * head_dim * sizeof(element);
  report_bandwidth(state, kv_bytes / 2);  // the floor reads K once
  state.counters["workspace_fraction"] = static_cast<double>(ws_bytes) / kv_bytes;
  state.counters["copy_fraction"] = benchmark::Counter(kv_bytes / 2 / copy_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
}

kvtrim::snapkv_policy snapkv_of(int32_t n) {
  return kvtrim::snapkv({.budget = kvtrim::token_budget::of_tokens(n / 16), .window = window});
}

void bm_snapkv(benchmark::State& state) { run_step(state, snapkv_of(static_cast<int32_t>(state.range(1)))); }
void bm_ada_kv(benchmark::State& state) {
  const int32_t n = static_cast<int32_t>(state.range(1));
  run_step(state, kvtrim::ada_kv({.budget = kvtrim::token_budget::of_tokens(n / 16), .window = window}));
}
void bm_kv_compress(benchmark::State& state) {
  const int32_t n = static_cast<int32_t>(state.range(1));
  run_step(state, kvtrim::kv_compress({.budget = kvtrim::token_budget::of_tokens(n / 16), .protected_window = window}));
}

//! SnapKV's step in pieces of state.range(4) slots.
void bm_snapkv_pieces(benchmark::State& state) {
  run_step(state, snapkv_of(static_cast<int32_t>(state.range(1))), state.range(4));
}

//! SnapKV's window scores alone (both passes, the GQA mean, max pool 7), as in bm_snapkv.
void bm_snapkv_window_scores(benchmark::State& state) {
  const std::unique_ptr<step_inputs> inputs = inputs_or_skip(state);
  if (!inputs) return;
  step_inputs& in = *inputs;  // make_view takes the cache's writable buffers
  const int32_t batch = in.batch, n = in.n;
  const kvtrim::snapkv_policy policy = snapkv_of(n);
  kvtrim::cuda::window_score_arguments<element> a;
  a.pool = kvtrim::cuda::make_view(in.c.cache.buffers(), in.c.config);
  a.rows = in.rows.as<int32_t>();
  a.batch = batch;
  a.q_heads = q_heads;
  a.window = window;
  a.queries = in.queries.as<float>();
  a.query_positions = in.positions.as<int32_t>();
  a.metric = policy.metric;
  a.protect = policy.protect;
  a.stride = in.c.config.max_tokens_per_head;
  device_memory scores(static_cast<size_t>(batch) * kv_heads * a.stride * sizeof(float));
  a.scores = scores.as<float>();
  a.math = math_of(state);
  device_memory ws(kvtrim::cuda::workspace_size(a));
  time_launches(state, [&](cudaStream_t stream) { return kvtrim::cuda::window_scores(a, ws.ptr, stream); });
  const double k_bytes = static_cast<double>(batch) * kv_heads * n * head_dim * sizeof(element);
  report_bandwidth(state, 2 * k_bytes);  // the floor reads K once per pass
  state.counters["copy_fraction"] =
      benchmark::Counter(2 * k_bytes / copy_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
}

//! (tc, q16): the fp32 path, and the tensor-core path with fp32 and with bf16 query values
//! (the fp32 path's speed does not depend on them).
void step_args(benchmark::internal::Benchmark* b) {
  for (const auto [tc, q16] : {std::pair<int64_t, int64_t>{0, 0}, {1, 0}, {1, 1}})
    for (const int64_t batch : {1, 8})
      for (const int64_t n : {4096, 32768, 131072}) b->Args({batch, n, tc, q16});
}

//! The targets' shape and the largest, tensor cores on bf16 query values, from pieces of two
//! sequences' layer up to the library's piece size.
void piece_args(benchmark::internal::Benchmark* b) {
  for (const int64_t n : {32768, 131072})
    for (const int64_t piece : {int64_t{1} << 19, int64_t{1} << 20, int64_t{1} << 21, int64_t{1} << 22, int64_t{0}})
      b->Args({8, n, 1, 1, piece});
}

}  // namespace

BENCHMARK(bm_snapkv)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc", "q16"});
BENCHMARK(bm_ada_kv)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc", "q16"});
BENCHMARK(bm_kv_compress)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc", "q16"});
BENCHMARK(bm_snapkv_pieces)->Apply(piece_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc", "q16", "piece"});
BENCHMARK(bm_snapkv_window_scores)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc", "q16"});
BENCHMARK_MAIN();
