// House style rule 10 (the mdspan idea): the KVTRIM_HOST_DEVICE functions both backends share
// (budget sizing, the tie-break rule, fp16/bf16 rounding) give, in a one-thread kernel, exactly
// what they give on the host, so the device's kept sets and stored bits follow the CPU's.
#include "parity_support.cuh"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstring>
#include <limits>

namespace {

namespace kv = kvtrim;
using namespace kvtrim_test;

//! One head to size: (layer, layers, length, protected) under both allocators.
struct budget_case {
  kv::pyramid_budget pyramid;
  kv::uniform_budget uniform;
  int32_t layer, layers, length, protect;
};

__global__ void size_heads_kernel(const budget_case* cases, int32_t n, int32_t* out) {
  for (int32_t i = 0; i < n; ++i) {
    const budget_case& c = cases[i];
    out[2 * i] = c.pyramid.nominal_select(c.layer, c.layers, c.length, c.protect);
    out[2 * i + 1] = c.uniform.nominal_select(c.layer, c.layers, c.length, c.protect);
  }
}

//! [4] per input: the library's fp16 and bf16 bits, then CUDA's own fp16 and bf16 rounding.
__global__ void round_kernel(const float* in, int32_t n, uint16_t* out) {
  for (int32_t i = 0; i < n; ++i) {
    out[4 * i] = kv::from_float<kv::float16>(in[i]).bits;
    out[4 * i + 1] = kv::from_float<kv::bfloat16>(in[i]).bits;
    out[4 * i + 2] = __half_as_ushort(__float2half_rn(in[i]));
    out[4 * i + 3] = __bfloat16_as_ushort(__float2bfloat16_rn(in[i]));
  }
}

__global__ void rank_kernel(const kv::ranked_token* tokens, int32_t n, uint8_t* out) {
  for (int32_t i = 0; i < n; ++i)
    for (int32_t j = 0; j < n; ++j) out[i * n + j] = kv::ranks_before(tokens[i], tokens[j]) ? 1 : 0;
}

//! Runs `kernel(in, n, out)` in one thread and returns its `width` outputs per input.
template <class I, class O>
std::vector<O> in_one_thread(void (*kernel)(const I*, int32_t, O*), const std::vector<I>& in, size_t width) {
  device_memory d_in(in.size() * sizeof(I)), d_out(in.size() * width * sizeof(O));
  upload(d_in, in);
  kernel<<<1, 1>>>(d_in.as<I>(), static_cast<int32_t>(in.size()), d_out.as<O>());
  REQUIRE(cudaGetLastError() == cudaSuccess);
  REQUIRE(cudaDeviceSynchronize() == cudaSuccess);
  return download(d_out.as<O>(), in.size() * width);
}

}  // namespace

TEST_CASE("budget sizing gives the host's counts in a one-thread kernel", "[cuda]") {
  constexpr int32_t big = std::numeric_limits<int32_t>::max();
  std::vector<budget_case> cases;
  for (const int32_t layers : {1, 5, 32})
    for (const int32_t layer : {0, layers / 2, layers - 1})
      for (const int32_t length : {1, 9, 40, 300, 512, 920, 5000, big})
        for (const int32_t protect : {0, 8})
          for (const int32_t context : {0, 20, 512, big})
            for (const int32_t beta : {1, 20}) {
              for (const int32_t tokens : {1, 35, 128, 1000, (1 << 30) + 10})
                cases.push_back({{.budget = kv::token_budget::of_tokens(tokens), .beta = beta, .context = context},
                                 {.budget = kv::token_budget::of_tokens(tokens)}, layer, layers, length, protect});
              // 0.25 of 920 at layer 31 of 32 lands on a half: an FMA rounds it the other way.
              for (const float ratio : {0.01f, 0.25f, 0.3f, 0.5f, 1.f})
                cases.push_back({{.budget = kv::token_budget::of_ratio(ratio), .beta = beta,
                                  .form = kv::pyramid_form::real, .context = context},
                                 {.budget = kv::token_budget::of_ratio(ratio)}, layer, layers, length, protect});
            }
  const auto n = static_cast<int32_t>(cases.size());
  const std::vector<int32_t> got = in_one_thread(size_heads_kernel, cases, 2);
  int mismatched = 0;
  for (int32_t i = 0; i < n; ++i) {
    const budget_case& c = cases[static_cast<size_t>(i)];
    const int32_t pyramid = c.pyramid.nominal_select(c.layer, c.layers, c.length, c.protect);
    const int32_t uniform = c.uniform.nominal_select(c.layer, c.layers, c.length, c.protect);
    if (got[2 * static_cast<size_t>(i)] != pyramid || got[2 * static_cast<size_t>(i) + 1] != uniform) {
      ++mismatched;
      CAPTURE(i, c.layer, c.layers, c.length, c.protect, c.pyramid.context, static_cast<int>(c.pyramid.form));
      CHECK(got[2 * static_cast<size_t>(i)] == pyramid);
      CHECK(got[2 * static_cast<size_t>(i) + 1] == uniform);
      if (mismatched > 5) break;
    }
  }
  CHECK(mismatched == 0);
}

TEST_CASE("fp16 and bf16 rounding gives the host's bits in a kernel, as CUDA's own conversions do", "[cuda]") {
  // Bit patterns across the whole float range (subnormals, both signs, NaN, infinities) plus
  // the halfway cases of both formats.
  std::vector<float> in;
  for (uint32_t i = 0; i < 65536; ++i) {
    const uint32_t u = i * 65537u + (i >> 3);
    float x;
    std::memcpy(&x, &u, sizeof x);
    in.push_back(x);
  }
  for (const float x : {0.f, -0.f, 65504.f, 65519.f, 65520.f, 1.f + 1.f / 2048, 1.f + 3.f / 2048, 1.f + 1.f / 256,
                        1.f + 3.f / 256, 5.9604644775390625e-8f, 2.98023223876953125e-8f,
                        std::numeric_limits<float>::infinity(), std::numeric_limits<float>::denorm_min(),
                        std::numeric_limits<float>::max(), std::numeric_limits<float>::quiet_NaN()})
    in.push_back(x);
  const auto n = static_cast<int32_t>(in.size());
  const std::vector<uint16_t> got = in_one_thread(round_kernel, in, 4);
  int mismatched = 0;
  for (int32_t i = 0; i < n && mismatched <= 5; ++i) {
    const float x = in[static_cast<size_t>(i)];
    const uint16_t half = kv::from_float<kv::float16>(x).bits, bf16 = kv::from_float<kv::bfloat16>(x).bits;
    const uint16_t* g = &got[4 * static_cast<size_t>(i)];
    // NaN payloads are the library's own (quiet, payload kept); CUDA's are checked as NaN.
    const bool nan = x != x;
    const bool ok = g[0] == half && g[1] == bf16 &&
                    (nan ? (g[2] & 0x7c00u) == 0x7c00u && (g[2] & 0x3ffu) != 0 : g[2] == half) &&
                    (nan ? (g[3] & 0x7f80u) == 0x7f80u && (g[3] & 0x7fu) != 0 : g[3] == bf16);
    if (!ok) {
      ++mismatched;
      CAPTURE(i, x, half, bf16, g[0], g[1], g[2], g[3]);
      CHECK(ok);
    }
  }
  CHECK(mismatched == 0);
}

TEST_CASE("the tie-break rule orders tokens in a kernel as on the host", "[cuda]") {
  const float inf = std::numeric_limits<float>::infinity();
  std::vector<kv::ranked_token> tokens;
  for (const float score : {-1.f, 0.f, -0.f, 0.5f, inf})
    for (const int32_t position : {0, 7})
      for (const int32_t slot : {3, 4}) tokens.push_back({score, position, slot});
  const auto n = static_cast<int32_t>(tokens.size());
  const std::vector<uint8_t> got = in_one_thread(rank_kernel, tokens, tokens.size());
  for (int32_t i = 0; i < n; ++i)
    for (int32_t j = 0; j < n; ++j) {
      CAPTURE(i, j);
      CHECK((got[static_cast<size_t>(i * n + j)] != 0) ==
            kv::ranks_before(tokens[static_cast<size_t>(i)], tokens[static_cast<size_t>(j)]));
    }
}
