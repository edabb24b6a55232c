// One layer's compression step (scores + budgets + plan + compaction, on the device, without
// the host commit) at the Llama-3-8B shape: B in {1, 8}, n in {4k, 32k, 128k}, for SnapKV
// (C = n / 16, w 32, k 7), Ada-KV (same budget) and KV-Compress (M = n / 16); window scores on
// fp32 CUDA cores (tc:0, window_math::exact) and with bf16x3 tensor-core MMAs (tc:1).
#include "bench_support.cuh"

namespace {
using namespace kvtrim_bench;

template <class P>
void run_step(benchmark::State& state, const P& policy, int32_t window) {
  if (!have_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const auto batch = static_cast<int32_t>(state.range(0));
  const auto n = static_cast<int32_t>(state.range(1));
  layer_cache c(batch, n);
  if (!c.ok) {
    state.SkipWithError("cache setup failed (device memory?)");
    return;
  }
  const kvtrim::attention_shape model{1, q_heads, kv_heads, head_dim};
  device_memory queries(static_cast<size_t>(batch) * window * q_heads * head_dim * sizeof(float));
  fill_random(queries.as<float>(), queries.bytes / sizeof(float), 4);
  std::vector<int32_t> pos(static_cast<size_t>(batch) * window);
  for (int32_t b = 0; b < batch; ++b)
    for (int32_t r = 0; r < window; ++r) pos[static_cast<size_t>(b) * window + r] = n - window + r;
  device_memory positions(pos.size() * sizeof(int32_t));
  cudaMemcpy(positions.ptr, pos.data(), positions.bytes, cudaMemcpyHostToDevice);
  std::vector<int32_t> rows(static_cast<size_t>(batch));
  for (int32_t b = 0; b < batch; ++b) rows[static_cast<size_t>(b)] = c.cache.tables().sequence_slot(b);
  device_memory drows(rows.size() * sizeof(int32_t)), keep(static_cast<size_t>(batch) * kv_heads * sizeof(int32_t)),
      error(sizeof(int32_t));
  cudaMemcpy(drows.ptr, rows.data(), drows.bytes, cudaMemcpyHostToDevice);
  kvtrim::cuda::compress_arguments<P, element> a;
  a.policy = policy;
  a.model = model;
  a.pool = kvtrim::cuda::make_view(c.cache.buffers(), c.config);
  a.rows = drows.as<int32_t>();
  a.batch = batch;
  a.obs = {queries.as<float>(), positions.as<int32_t>(), window};
  a.stride = c.config.max_tokens_per_head;
  a.keep = keep.as<int32_t>();
  a.error = error.as<int32_t>();
  a.math = state.range(2) != 0 ? kvtrim::cuda::window_math::tensor_cores : kvtrim::cuda::window_math::exact;
  const size_t ws_bytes = kvtrim::cuda::workspace_size(a);
  device_memory ws(ws_bytes);
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  kvtrim::status st = kvtrim::status::success;
  // Repeated steps on the same (already compacted) cache: the first iteration compacts, the
  // rest measure the steady state of scoring and planning a full-length head (lengths are
  // not committed, so every step sees n tokens).
  time_iterations(state, stream, [&] { st = kvtrim::cuda::compress_on_device(a, ws.ptr, stream); });
  cudaStreamDestroy(stream);
  if (st != kvtrim::status::success) state.SkipWithError(std::string(kvtrim::to_string(st)).c_str());
  const double kv_bytes = 2.0 * batch * kv_heads * static_cast<double>(n) * head_dim * sizeof(element);
  report_bandwidth(state, kv_bytes / 2);  // the floor reads K once
  state.counters["workspace_fraction"] = static_cast<double>(ws_bytes) / kv_bytes;
  state.counters["copy_fraction"] = benchmark::Counter(kv_bytes / 2 / copy_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
}

void bm_snapkv(benchmark::State& state) {
  const int32_t n = static_cast<int32_t>(state.range(1));
  run_step(state, kvtrim::snapkv({.budget = kvtrim::token_budget::of_tokens(n / 16), .window = 32}), 32);
}
void bm_ada_kv(benchmark::State& state) {
  const int32_t n = static_cast<int32_t>(state.range(1));
  run_step(state, kvtrim::ada_kv({.budget = kvtrim::token_budget::of_tokens(n / 16), .window = 32}), 32);
}
void bm_kv_compress(benchmark::State& state) {
  const int32_t n = static_cast<int32_t>(state.range(1));
  run_step(state, kvtrim::kv_compress({.budget = kvtrim::token_budget::of_tokens(n / 16), .protected_window = 32}), 32);
}

void step_args(benchmark::internal::Benchmark* b) {
  for (const int64_t tc : {0, 1})
    for (const int64_t batch : {1, 8})
      for (const int64_t n : {4096, 32768, 131072}) b->Args({batch, n, tc});
}

}  // namespace

BENCHMARK(bm_snapkv)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc"});
BENCHMARK(bm_ada_kv)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc"});
BENCHMARK(bm_kv_compress)->Apply(step_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "tc"});
BENCHMARK_MAIN();
