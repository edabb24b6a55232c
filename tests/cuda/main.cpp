// Catch2 runner of the CUDA tests: exits with KVTRIM_CUDA_SKIP_CODE (CTest's
// SKIP_RETURN_CODE) when the machine has no usable CUDA device.
#define CATCH_CONFIG_RUNNER
#include <catch2/catch.hpp>
#include <cstdio>
#include <cuda_runtime_api.h>

int main(int argc, char* argv[]) {
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0) {
    std::printf("kvtrim_cuda_tests: no CUDA device (%s); skipping\n",
                e != cudaSuccess ? cudaGetErrorString(e) : "0 devices");
    return KVTRIM_CUDA_SKIP_CODE;
  }
  const int failures = Catch::Session().run(argc, argv);
  return failures == KVTRIM_CUDA_SKIP_CODE ? 1 : failures;  // never mistake failures for a skip
}
