#pragma once
//! \file dispatch.cuh
//! Runtime -> compile-time values through one typed helper (house style rule 5). The head dims
//! that get a specialised kernel are listed HERE and nowhere else; every other head dim (the
//! real stories260K model has 8) runs the generic kernel, `dynamic_head_dim`.

#include <cstdint>
#include <type_traits>
#include <utility>

#include "kvtrim/cache/paged_layout.hpp"
#include "kvtrim/config.hpp"
#include "kvtrim/core/numeric.hpp"
#include "kvtrim/status.hpp"

KVTRIM_NAMESPACE_BEGIN
namespace cuda {

//! A compile-time head dim; `dynamic_head_dim` (0) is the generic kernel.
template <int32_t D>
using head_dim_constant = std::integral_constant<int32_t, D>;

//! Calls `f(head_dim_constant<D>{})` for the first D in `Dims` equal to `head_dim`, else
//! `f(head_dim_constant<dynamic_head_dim>{})`. Returns what `f` returns (a status).
template <int32_t... Dims, class F>
[[nodiscard]] status dispatch_static(int32_t head_dim, F&& f) {
  status result = status::success;
  const bool hit = ((head_dim == Dims ? (result = f(head_dim_constant<Dims>{}), true) : false) || ...);
  if (!hit) result = f(head_dim_constant<dynamic_head_dim>{});
  return result;
}

//! The head dims with a specialised kernel (fast paths): Llama-family 64 and 128.
template <class F>
[[nodiscard]] status dispatch_head_dim(int32_t head_dim, F&& f) {
  return dispatch_static<64, 128>(head_dim, std::forward<F>(f));
}

//! The effective head dim inside a kernel: the static one, or the runtime value.
template <int32_t HeadDim>
[[nodiscard]] __host__ __device__ constexpr int32_t head_dim_of(int32_t runtime) noexcept {
  return HeadDim != dynamic_head_dim ? HeadDim : runtime;
}

}  // namespace cuda
KVTRIM_NAMESPACE_END
