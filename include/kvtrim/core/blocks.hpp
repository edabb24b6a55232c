#pragma once
//! \file blocks.hpp
//! Block arithmetic shared by the paged cache (block tables) and KV-Compress's allocator.

#include <cstdint>

#include "kvtrim/config.hpp"

KVTRIM_NAMESPACE_BEGIN

//! Blocks a head of `length` tokens occupies, and the tokens in its last (partial) block.
//! Exact for every length >= 0 and block_size >= 1, up to 2^31 - 1 (no overflow).
[[nodiscard]] KVTRIM_HOST_DEVICE constexpr int32_t blocks_for(int32_t length, int32_t block_size) noexcept {
  return length > 0 ? (length - 1) / block_size + 1 : 0;
}
[[nodiscard]] KVTRIM_HOST_DEVICE constexpr int32_t hanging_tokens(int32_t length, int32_t block_size) noexcept {
  return length == 0 ? 0 : (length - 1) % block_size + 1;
}

KVTRIM_NAMESPACE_END
