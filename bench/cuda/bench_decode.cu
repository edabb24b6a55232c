// Paged decode attention at the Llama-3-8B shape: B in {1, 8, 32}, n in {4k, 32k, 128k},
// compression 1x / 4x / 8x / 16x (every head keeps n / ratio tokens), launched eagerly
// (bm_decode) and, at a few of those points, replayed from a CUDA graph (bm_decode_graph), as
// the PyTorch peers are also timed. bm_decode_group varies G (query heads per KV head: 1 for MHA,
// 8 for Llama-3-70B) at the decode target's shape: each G runs its own kernel instance, with its
// own register use and so its own split sizing. bm_decode_splits sets the keys per split CTA
// (decode_arguments::split_tokens; 0: the library's choice) at the shapes whose copy fraction
// trails, so one run shows how the library's split sizing compares with the alternatives on
// the GPU at hand.
#include "bench_support.cuh"

namespace {
using namespace kvtrim_bench;

//! `graph`: time replays of the launch captured in a CUDA graph instead of eager launches.
//! `group`: query heads per KV head (Llama-3-8B's 4 unless given). `split_tokens`: keys per
//! split CTA (0: the library's choice).
void run_decode(benchmark::State& state, bool graph, int32_t group = q_heads / kv_heads, int32_t split_tokens = 0) {
  if (!have_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const auto batch = static_cast<int32_t>(state.range(0));
  const auto n = static_cast<int32_t>(state.range(1));
  const auto ratio = static_cast<int32_t>(state.range(2));
  const int32_t kept = n / ratio;
  layer_cache c(batch, kept);
  if (!c.ok) {
    state.SkipWithError("cache setup failed (device memory?)");
    return;
  }
  const int32_t queries = group * kv_heads;
  device_memory q(static_cast<size_t>(batch) * queries * head_dim * sizeof(float));
  device_memory out(q.bytes);
  fill_random(q.as<float>(), q.bytes / sizeof(float), 3);
  // The device-side entry point with the rows already on the device, as an engine's decode
  // loop calls it: no host work inside the timed region.
  std::vector<int32_t> rows(static_cast<size_t>(batch));
  for (int32_t b = 0; b < batch; ++b) rows[static_cast<size_t>(b)] = c.cache.tables().sequence_slot(c.seqs[static_cast<size_t>(b)]);
  device_memory drows(rows.size() * sizeof(int32_t));
  cudaMemcpy(drows.ptr, rows.data(), drows.bytes, cudaMemcpyHostToDevice);
  kvtrim::cuda::decode_arguments<element> a;
  a.pool = kvtrim::cuda::make_view(c.cache.buffers(), c.config);
  a.rows = drows.as<int32_t>();
  a.batch = batch;
  a.q_heads = queries;
  a.max_length = kept;
  a.q = q.as<float>();
  a.out = out.as<float>();
  a.split_tokens = split_tokens;
  device_memory ws(kvtrim::cuda::workspace_size(a));
  cudaStream_t stream;
  cudaStreamCreate(&stream);
  kvtrim::status st = kvtrim::status::success;
  if (graph) {
    cudaGraphExec_t exec = capture_graph(stream, [&] {
      st = kvtrim::cuda::decode_attention(a, ws.ptr, stream);
      return st == kvtrim::status::success;
    });
    if (exec) {
      time_iterations(state, stream, [&] { cudaGraphLaunch(exec, stream); });
      cudaGraphExecDestroy(exec);
    } else if (st == kvtrim::status::success) {
      state.SkipWithError("graph capture failed");
    }
  } else {
    time_iterations(state, stream, [&] { st = kvtrim::cuda::decode_attention(a, ws.ptr, stream); });
  }
  cudaStreamDestroy(stream);
  if (st != kvtrim::status::success) state.SkipWithError(std::string(kvtrim::to_string(st)).c_str());
  // K and V of every kept token: the memory-traffic floor.
  const double bytes = 2.0 * batch * kv_heads * static_cast<double>(kept) * head_dim * sizeof(kvtrim::bfloat16);
  report_bandwidth(state, bytes);
  state.counters["tokens/s"] = benchmark::Counter(static_cast<double>(batch), benchmark::Counter::kIsRate);
  state.counters["copy_fraction"] = benchmark::Counter(bytes / copy_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
}

void bm_decode(benchmark::State& state) { run_decode(state, false); }
void bm_decode_graph(benchmark::State& state) { run_decode(state, true); }
void bm_decode_group(benchmark::State& state) { run_decode(state, false, static_cast<int32_t>(state.range(3))); }
void bm_decode_splits(benchmark::State& state) {
  run_decode(state, false, q_heads / kv_heads, static_cast<int32_t>(state.range(3)));
}

void decode_args(benchmark::internal::Benchmark* b) {
  for (const int64_t batch : {1, 8, 32})
    for (const int64_t n : {4096, 32768, 131072})
      for (const int64_t ratio : {1, 4, 8, 16}) b->Args({batch, n, ratio});
}

}  // namespace

BENCHMARK(bm_decode)->Apply(decode_args)->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "n", "x"});
// The small caches where launches weigh most, and the decode target's point (B 8, n 32k, 8x).
BENCHMARK(bm_decode_graph)
    ->Args({1, 4096, 1})
    ->Args({1, 32768, 8})
    ->Args({8, 32768, 8})
    ->Args({32, 32768, 8})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->ArgNames({"B", "n", "x"});
BENCHMARK(bm_decode_group)
    ->ArgsProduct({{8}, {32768}, {1, 8}, {1, 8}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->ArgNames({"B", "n", "x", "G"});
// The full caches below 0.85 of copy on the H200 (B = 8, n = 32k; B = 1, n = 128k) and the
// 8x decode target, eager: split 0 is the library's choice.
BENCHMARK(bm_decode_splits)
    ->ArgsProduct({{1}, {131072}, {1}, {0, 512, 1024, 2048, 4096, 8192}})
    ->ArgsProduct({{8}, {32768}, {1, 8}, {0, 256, 512, 1024, 2048, 4096}})
    ->UseManualTime()
    ->Unit(benchmark::kMicrosecond)
    ->ArgNames({"B", "n", "x", "split"});
BENCHMARK_MAIN();
