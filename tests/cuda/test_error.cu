// KVTRIM_CUDA_TRY: a failing runtime call becomes status::cuda_error, is recorded (with its
// location in debug builds), and leaves no pending error behind.
#include <catch2/catch.hpp>
#include <cstddef>
#include <cstring>
#include <string_view>
#include <vector>

#include "kvtrim/cuda.cuh"

namespace {

int invalid_copy_line = 0;

//! A copy with a direction the runtime rejects (cudaErrorInvalidMemcpyDirection, not sticky).
kvtrim::status invalid_copy(void* dst, const void* src, std::size_t bytes) {
  invalid_copy_line = __LINE__ + 1;
  KVTRIM_CUDA_TRY(cudaMemcpy(dst, src, bytes, static_cast<cudaMemcpyKind>(42)));
  return kvtrim::status::success;
}

//! Host -> device -> host round trip through `device` [bytes].
kvtrim::status round_trip(void* device, const void* src, void* dst, std::size_t bytes) {
  KVTRIM_CUDA_TRY(cudaMemcpy(device, src, bytes, cudaMemcpyHostToDevice));
  KVTRIM_CUDA_TRY(cudaMemcpy(dst, device, bytes, cudaMemcpyDeviceToHost));
  return kvtrim::status::success;
}

}  // namespace

TEST_CASE("KVTRIM_CUDA_TRY maps a failed cudaMemcpy to status::cuda_error", "[cuda][api-error]") {
  kvtrim::cuda::clear_last_error();
  const std::vector<float> src(16, 1.f);
  std::vector<float> dst(16, 0.f);
  void* device = nullptr;
  REQUIRE(cudaMalloc(&device, src.size() * sizeof(float)) == cudaSuccess);

  CHECK(invalid_copy(device, src.data(), src.size() * sizeof(float)) == kvtrim::status::cuda_error);

  const kvtrim::cuda::error_record record = kvtrim::cuda::last_error();
  CHECK(record.code == cudaErrorInvalidMemcpyDirection);
  CHECK(std::string_view(record.message()).size() > 0);
#if KVTRIM_CUDA_RECORD_LOCATION
  REQUIRE(record.file != nullptr);
  CHECK(std::string_view(record.file).ends_with("test_error.cu"));
  CHECK(record.line == invalid_copy_line);
  CHECK(std::string_view(record.expression).find("cudaMemcpy") != std::string_view::npos);
#else
  CHECK(record.file == nullptr);
  CHECK(record.line == 0);
#endif

  SECTION("the runtime's last-error state is cleared") {
    CHECK(cudaPeekAtLastError() == cudaSuccess);
    CHECK(cudaGetLastError() == cudaSuccess);
  }
  SECTION("later calls succeed and leave the record alone") {
    CHECK(round_trip(device, src.data(), dst.data(), src.size() * sizeof(float)) == kvtrim::status::success);
    CHECK(dst == src);
    CHECK(kvtrim::cuda::last_error().code == cudaErrorInvalidMemcpyDirection);
    kvtrim::cuda::clear_last_error();
    CHECK(kvtrim::cuda::last_error().code == cudaSuccess);
  }
  CHECK(cudaFree(device) == cudaSuccess);
}

TEST_CASE("KVTRIM_CUDA_TRY returns cuda_error for an invalid device pointer", "[cuda][api-error]") {
  const std::vector<char> src(8, 'x');
  kvtrim::cuda::clear_last_error();
  const auto copy_to_null = [&]() -> kvtrim::status {
    KVTRIM_CUDA_TRY(cudaMemcpy(nullptr, src.data(), src.size(), cudaMemcpyHostToDevice));
    return kvtrim::status::success;
  };
  CHECK(copy_to_null() == kvtrim::status::cuda_error);
  CHECK(kvtrim::cuda::last_error().code != cudaSuccess);
  CHECK(cudaGetLastError() == cudaSuccess);
}
