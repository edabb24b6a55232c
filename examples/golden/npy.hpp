#pragma once
//! \file npy.hpp
//! Reads the NumPy .npy files of the golden cases: format 1.0, little-endian float32 ('<f4')
//! or int32 ('<i4'), C order. Anything else is rejected with a message naming the file.

#include <cstdint>
#include <cstring>
#include <fstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace golden {

template <class T>
struct npy_array {
  std::vector<int64_t> shape;
  std::vector<T> data;

  [[nodiscard]] int64_t dim(size_t i) const { return shape.at(i); }
  [[nodiscard]] int64_t size() const {
    int64_t n = 1;
    for (const int64_t s : shape) n *= s;
    return n;
  }
};

namespace detail {
[[noreturn]] inline void npy_fail(const std::string& path, const std::string& why) {
  throw std::runtime_error(path + ": " + why);
}
}  // namespace detail

//! Loads `path` as an array of T (float or int32_t).
template <class T>
[[nodiscard]] npy_array<T> load_npy(const std::string& path) {
  static_assert(std::is_same_v<T, float> || std::is_same_v<T, int32_t>);
  std::ifstream in(path, std::ios::binary);
  if (!in) detail::npy_fail(path, "cannot open");
  char magic[8];
  if (!in.read(magic, 8) || std::memcmp(magic, "\x93NUMPY", 6) != 0) detail::npy_fail(path, "not a .npy file");
  if (magic[6] != 1) detail::npy_fail(path, "only .npy format 1.0 is supported");
  unsigned char len_bytes[2];
  if (!in.read(reinterpret_cast<char*>(len_bytes), 2)) detail::npy_fail(path, "truncated header");
  const size_t header_len = len_bytes[0] | (static_cast<size_t>(len_bytes[1]) << 8);
  std::string header(header_len, '\0');
  if (!in.read(header.data(), static_cast<std::streamsize>(header_len))) detail::npy_fail(path, "truncated header");

  const char* want = std::is_same_v<T, float> ? "'<f4'" : "'<i4'";
  if (header.find(want) == std::string::npos)
    detail::npy_fail(path, std::string("expected dtype ") + want + " in header " + header);
  if (header.find("'fortran_order': False") == std::string::npos) detail::npy_fail(path, "Fortran order not supported");
  const size_t open = header.find('(', header.find("'shape'"));
  const size_t close = header.find(')', open);
  if (open == std::string::npos || close == std::string::npos) detail::npy_fail(path, "no shape in header");
  npy_array<T> out;
  std::string dims = header.substr(open + 1, close - open - 1);
  size_t pos = 0;
  while (pos < dims.size()) {
    const size_t comma = dims.find(',', pos);
    const std::string tok = dims.substr(pos, comma == std::string::npos ? std::string::npos : comma - pos);
    if (tok.find_first_of("0123456789") != std::string::npos) out.shape.push_back(std::stoll(tok));
    if (comma == std::string::npos) break;
    pos = comma + 1;
  }
  out.data.resize(static_cast<size_t>(out.size()));
  if (!in.read(reinterpret_cast<char*>(out.data.data()), static_cast<std::streamsize>(out.data.size() * sizeof(T))))
    detail::npy_fail(path, "truncated data");
  return out;
}

}  // namespace golden
