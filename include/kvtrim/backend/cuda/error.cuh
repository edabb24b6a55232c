#pragma once
//! \file error.cuh
//! CUDA runtime errors as `kvtrim::status` (house style rule 6). `KVTRIM_CUDA_TRY(expr)` is
//! for the library's own host functions that return `status`: on failure it records the
//! error, clears the runtime's last-error state and returns `status::cuda_error`.
//!
//! The record is per host thread. `code` is always kept; the failing expression, file and
//! line only when `KVTRIM_CUDA_RECORD_LOCATION` is 1, which is the default in debug builds
//! (`NDEBUG` not defined). Define it to 0 or 1 before the first include to override.

#include <cuda_runtime_api.h>

#include "kvtrim/config.hpp"
#include "kvtrim/status.hpp"

#if !defined(KVTRIM_CUDA_RECORD_LOCATION)
#if defined(NDEBUG)
#define KVTRIM_CUDA_RECORD_LOCATION 0
#else
#define KVTRIM_CUDA_RECORD_LOCATION 1
#endif
#endif

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! The last CUDA failure a `KVTRIM_CUDA_TRY` saw on this thread.
struct error_record {
  cudaError_t code = cudaSuccess;
  const char* expression = nullptr;  //!< the failing expression; null unless KVTRIM_CUDA_RECORD_LOCATION
  const char* file = nullptr;        //!< null unless KVTRIM_CUDA_RECORD_LOCATION
  int line = 0;                      //!< 0 unless KVTRIM_CUDA_RECORD_LOCATION

  //! The CUDA runtime's description of `code`.
  [[nodiscard]] const char* message() const noexcept { return cudaGetErrorString(code); }
};

namespace detail {

[[nodiscard]] inline error_record& last_error_slot() noexcept {
  thread_local error_record record;
  return record;
}

//! Called by KVTRIM_CUDA_TRY on failure. cudaGetLastError resets the runtime's last-error
//! state, so a later, unrelated check does not see this failure again; a sticky error (a
//! kernel fault that corrupts the context) cannot be cleared and keeps failing every call.
[[nodiscard]] inline status record_cuda_error(cudaError_t code, [[maybe_unused]] const char* expression,
                                              [[maybe_unused]] const char* file,
                                              [[maybe_unused]] int line) noexcept {
  static_cast<void>(cudaGetLastError());
  error_record& record = last_error_slot();
  record = error_record{};
  record.code = code;
#if KVTRIM_CUDA_RECORD_LOCATION
  record.expression = expression;
  record.file = file;
  record.line = line;
#endif
  return status::cuda_error;
}

}  // namespace detail

//! The last failure recorded by KVTRIM_CUDA_TRY on this thread (`code == cudaSuccess` if none).
[[nodiscard]] inline error_record last_error() noexcept { return detail::last_error_slot(); }

//! Forgets the recorded failure of this thread.
inline void clear_last_error() noexcept { detail::last_error_slot() = error_record{}; }

}  // namespace cuda
KVTRIM_NAMESPACE_END

//! Evaluates `expr` (a cudaError_t); on failure records it and returns
//! `kvtrim::status::cuda_error` from the enclosing function, which must return `status`.
#define KVTRIM_CUDA_TRY(expr)                                                                  \
  do {                                                                                         \
    const cudaError_t kvtrim_cuda_try_code_ = (expr);                                          \
    if (kvtrim_cuda_try_code_ != cudaSuccess)                                                  \
      return ::kvtrim::cuda::detail::record_cuda_error(kvtrim_cuda_try_code_, #expr, __FILE__, \
                                                       __LINE__);                              \
  } while (false)
