#pragma once
//! \file status.hpp
//! Error codes of every host entry point. Library code never throws: a bad input returns a
//! status and leaves every output and every cache untouched.

#include <stdexcept>
#include <string>
#include <string_view>

#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

enum class status {
  success = 0,
  invalid_budget,          //!< budget zero, negative, or a ratio outside (0, 1]
  budget_below_protected,  //!< a token budget smaller than the sinks + recent window it must keep
  window_too_large,        //!< observation window longer than the sequence
  invalid_group,           //!< query heads not a positive multiple of KV heads
  invalid_pool_kernel,     //!< pooling kernel zero or even (the references need odd kernels)
  non_finite_input,        //!< NaN or infinity in queries, keys or scores
  empty_sequence,          //!< a head with no tokens where tokens are required
  shape_mismatch,          //!< buffer sizes disagree with the declared shape
  invalid_argument,        //!< any other parameter out of its documented range
  invalid_plan,            //!< an eviction plan that names unknown slots or repeats a slot
  pool_exhausted,          //!< the block pool has too few free blocks for the request
  unknown_sequence,        //!< sequence id not present in the cache
  not_supported,           //!< a composition or mode this backend does not implement
  cuda_error,              //!< a CUDA runtime call failed
};

//! One sentence per code: what was wrong and what to change.
[[nodiscard]] constexpr std::string_view to_string(status s) noexcept {
  switch (s) {
    case status::success: return "success";
    case status::invalid_budget:
      return "invalid budget: token budgets must be >= 1 and ratios in (0, 1]";
    case status::budget_below_protected:
      return "budget below the protected set: raise the budget or shrink sinks/recent window";
    case status::window_too_large:
      return "observation window longer than the sequence: pass at most n queries";
    case status::invalid_group:
      return "query heads must be a positive multiple of KV heads";
    case status::invalid_pool_kernel:
      return "pooling kernel must be odd and >= 1 (1 disables pooling)";
    case status::non_finite_input: return "NaN or infinity in queries, keys or scores";
    case status::empty_sequence: return "empty sequence: a head has no tokens";
    case status::shape_mismatch: return "buffer sizes do not match the declared shape";
    case status::invalid_argument: return "argument out of its documented range";
    case status::invalid_plan:
      return "invalid eviction plan: slots out of range, repeated, or count mismatch";
    case status::pool_exhausted: return "block pool exhausted: free sequences or grow the pool";
    case status::unknown_sequence: return "unknown sequence id";
    case status::not_supported: return "not supported by this backend or composition";
    case status::cuda_error: return "CUDA runtime error";
  }
  return "unknown status";
}

//! Thrown only by `throw_if_error`, the convenience examples and tests use; the library
//! itself reports through `status`.
class error : public std::runtime_error {
 public:
  explicit error(status s, std::string_view where = {})
      : std::runtime_error(where.empty() ? std::string(to_string(s))
                                         : std::string(where) + ": " + std::string(to_string(s))),
        code_(s) {}
  [[nodiscard]] status code() const noexcept { return code_; }

 private:
  status code_;
};

inline void throw_if_error(status s, std::string_view where = {}) {
  if (s != status::success) throw error(s, where);
}

KVTRIM_NAMESPACE_END
