#pragma once
//! \file blocks.hpp
//! Block arithmetic shared by the paged cache (block tables) and KV-Compress's allocator.

#include <bit>
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

//! The same arithmetic for one block size, by shifts where it is a power of two (the usual
//! 16): the divisions were most of the host's table work per decode step
//! (bench_cache_cpu's decode_step_tables).
class block_divider {
 public:
  constexpr block_divider() noexcept = default;
  //! block_size >= 1.
  explicit constexpr block_divider(int32_t block_size) noexcept
      : size_(block_size), shift_(power_of_two(block_size) ? std::countr_zero(static_cast<uint32_t>(block_size)) : -1) {}
  //! The block and the offset in it of slot j >= 0.
  [[nodiscard]] constexpr int32_t block_of(int32_t j) const noexcept { return shift_ >= 0 ? j >> shift_ : j / size_; }
  [[nodiscard]] constexpr int32_t offset_of(int32_t j) const noexcept {
    return shift_ >= 0 ? j & (size_ - 1) : j % size_;
  }
  //! blocks_for(length, block size).
  [[nodiscard]] constexpr int32_t blocks_for(int32_t length) const noexcept {
    return length > 0 ? block_of(length - 1) + 1 : 0;
  }

 private:
  [[nodiscard]] static constexpr bool power_of_two(int32_t n) noexcept {
    return std::has_single_bit(static_cast<uint32_t>(n));
  }
  int32_t size_ = 1;
  int32_t shift_ = 0;
};

KVTRIM_NAMESPACE_END
