// The workspace of one compression step (compress_on_device) as a fraction of the K/V bytes it
// compresses, at Llama-3-8B's heads (32 query, 8 KV, head dim 128, bf16: 512 bytes a slot),
// window 32, C = n / 16: one layer (the benchmarks' step) and all 32 layers (what
// cuda::compress runs on a cache). Host arithmetic from the library's own sizing; CUB's
// temporary storage for the sorts is part of it only where a GPU answers the query, so the
// output says which. Prints a markdown table (docs/performance.md, "Workspace").
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>

#include "kvtrim/cuda.cuh"

namespace {

namespace kv = kvtrim;
namespace cu = kvtrim::cuda;

template <class P>
double fraction(const P& policy, int32_t layers, int32_t batch, int32_t n) {
  cu::compress_arguments<P, kv::bfloat16> a;
  a.policy = policy;
  a.model = {layers, 32, 8, 128};
  a.pool.layers = layers;
  a.pool.heads = a.model.kv_heads;
  a.pool.head_dim = a.model.head_dim;
  a.pool.block_size = 16;
  a.pool.max_blocks_per_head = n / 16;
  a.batch = batch;
  a.obs.rows = 32;
  a.stride = n;
  const double kv_bytes = 2.0 * batch * layers * a.model.kv_heads * n * a.model.head_dim * sizeof(kv::bfloat16);
  return static_cast<double>(cu::workspace_size(a)) / kv_bytes;
}

}  // namespace

int main() {
  int devices = 0;
  const bool gpu = cudaGetDeviceCount(&devices) == cudaSuccess && devices > 0;
  std::printf("Workspace of one compression step / K+V bytes it compresses (%s)\n\n",
              gpu ? "CUB's sort storage included" : "without CUB's sort storage: no GPU to size it");
  std::printf("| layers | B | n | SnapKV | Ada-KV | KV-Compress |\n| --- | --- | --- | --- | --- | --- |\n");
  for (const int32_t layers : {1, 32})
    for (const int32_t batch : {1, 8})
      for (const int32_t n : {4096, 32768, 131072}) {
        const kv::token_budget c = kv::token_budget::of_tokens(n / 16);
        std::printf("| %d | %d | %dk | %.1f%% | %.1f%% | %.1f%% |\n", layers, batch, n / 1024,
                    100 * fraction(kv::snapkv({.budget = c, .window = 32}), layers, batch, n),
                    100 * fraction(kv::ada_kv({.budget = c, .window = 32}), layers, batch, n),
                    100 * fraction(kv::kv_compress({.budget = c, .protected_window = 32}), layers, batch, n));
      }
  return 0;
}
