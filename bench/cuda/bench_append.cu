// Append of one decode token for a batch (every KV head of one layer, one launch) with a
// device slot mapping: the kernel an engine calls each step.
#include "bench_support.cuh"

namespace {
using namespace kvtrim_bench;

void bm_append(benchmark::State& state) {
  if (!have_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const auto batch = static_cast<int32_t>(state.range(0));
  const int32_t tokens = static_cast<int32_t>(state.range(1));
  const int64_t rows = static_cast<int64_t>(batch) * tokens * kv_heads;
  const int32_t blocks = static_cast<int32_t>(rows / block_size + 16);
  device_memory keys(static_cast<size_t>(blocks) * block_size * head_dim * sizeof(element)), values(keys.bytes),
      positions(static_cast<size_t>(blocks) * block_size * 4), metrics(positions.bytes),
      src_k(static_cast<size_t>(rows) * head_dim * sizeof(element)), src_v(src_k.bytes), slots(rows * 8),
      pos(static_cast<size_t>(tokens) * 4);
  std::vector<int64_t> s(static_cast<size_t>(rows));
  for (int64_t i = 0; i < rows; ++i) s[static_cast<size_t>(i)] = i;
  cudaMemcpy(slots.ptr, s.data(), slots.bytes, cudaMemcpyHostToDevice);
  cudaMemset(pos.ptr, 0, pos.bytes);
  kvtrim::cuda::append_arguments<element> a;
  a.pool.keys = keys.as<element>();
  a.pool.values = values.as<element>();
  a.pool.positions = positions.as<int32_t>();
  a.pool.metrics = metrics.as<float>();
  a.pool.head_dim = head_dim;
  a.keys = src_k.as<element>();
  a.values = src_v.as<element>();
  a.slots = slots.as<int64_t>();
  a.positions = pos.as<int32_t>();
  a.rows = rows;
  a.heads = kv_heads;
  a.tokens = tokens;
  time_launches(state, [&](cudaStream_t stream) { return kvtrim::cuda::append(a, nullptr, stream); });
  const double bytes = 2.0 * 2.0 * static_cast<double>(rows) * head_dim * sizeof(element);  // read + write K and V
  report_bandwidth(state, bytes);
  state.counters["copy_fraction"] = benchmark::Counter(bytes / copy_bandwidth(), benchmark::Counter::kIsIterationInvariantRate);
}

}  // namespace

BENCHMARK(bm_append)->Args({1, 1})->Args({8, 1})->Args({32, 1})->Args({1, 4096})->Args({8, 4096})
    ->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "tokens"});
BENCHMARK_MAIN();
