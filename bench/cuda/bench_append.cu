// Append of one decode token for a batch (every KV head of one layer, one launch) with a
// device slot mapping: the kernel an engine calls each step. And the same step through the
// device paged cache, whose host side computes the slots and updates the table mirror: one
// append_layer per sequence against one for the batch.
#include <chrono>

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

//! One decode token of one layer for each of B sequences (1,000 tokens each) through the
//! device cache, host work included: wall time from the first call to the stream's end.
//! batched 0: B append_layer calls; 1: one append_layer of the batch.
void bm_append_step(benchmark::State& state) {
  if (!have_device()) {
    state.SkipWithError("no CUDA device");
    return;
  }
  const auto batch = static_cast<int32_t>(state.range(0));
  const bool batched = state.range(1) != 0;
  constexpr int32_t n = 1000;  // inside a block: most steps take none
  layer_cache c(batch, n);
  if (!c.ok) {
    state.SkipWithError("could not build the cache");
    return;
  }
  const size_t row = static_cast<size_t>(kv_heads) * head_dim;  // one token of the layer
  device_memory k(batch * row * sizeof(element)), v(k.bytes);
  fill_random(k.as<element>(), batch * row, 3);
  fill_random(v.as<element>(), batch * row, 4);
  const std::vector<int32_t> positions(static_cast<size_t>(batch), n);
  const std::vector<int32_t> lengths(static_cast<size_t>(batch) * kv_heads, n);
  const auto slice = [&](const device_memory& m, size_t first, size_t count) {
    return std::span<const element>(m.as<element>() + first, count);
  };
  const auto step = [&] {
    if (batched) return c.cache.append_layer(c.seqs, 0, positions, slice(k, 0, batch * row), slice(v, 0, batch * row));
    for (int32_t b = 0; b < batch; ++b) {
      const auto at = static_cast<size_t>(b);
      const kvtrim::status s = c.cache.append_layer(c.seqs[at], 0, std::span<const int32_t>(&positions[at], 1),
                                                    slice(k, at * row, row), slice(v, at * row, row));
      if (s != kvtrim::status::success) return s;
    }
    return kvtrim::status::success;
  };
  kvtrim::status st = kvtrim::status::success;
  for (auto _ : state) {
    cudaDeviceSynchronize();
    const auto start = std::chrono::steady_clock::now();
    st = step();
    cudaDeviceSynchronize();
    state.SetIterationTime(std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    // Back to n tokens a head, untimed, so every step appends at the same place.
    if (st == kvtrim::status::success) st = c.cache.truncate(c.seqs, lengths);
    if (st != kvtrim::status::success) break;
  }
  if (st != kvtrim::status::success) state.SkipWithError(std::string(kvtrim::to_string(st)).c_str());
}

}  // namespace

BENCHMARK(bm_append_step)->ArgsProduct({{8, 32}, {0, 1}})->UseManualTime()->Unit(benchmark::kMicrosecond)
    ->ArgNames({"B", "batched"});
BENCHMARK(bm_append)->Args({1, 1})->Args({8, 1})->Args({32, 1})->Args({1, 4096})->Args({8, 4096})
    ->UseManualTime()->Unit(benchmark::kMicrosecond)->ArgNames({"B", "tokens"});
BENCHMARK_MAIN();
