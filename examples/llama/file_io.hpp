#pragma once
//! \file file_io.hpp
//! Opening and reading input files with errors that name the file and what it was meant to be,
//! shared by the checkpoint, tokenizer and text loaders.

#include <cstddef>
#include <filesystem>
#include <fstream>
#include <ios>
#include <stdexcept>
#include <string>
#include <system_error>

namespace llama {

//! Throws std::runtime_error "<kind> '<path>': <problem>".
[[noreturn]] inline void fail_file(const std::string& kind, const std::filesystem::path& path,
                                   const std::string& problem) {
  throw std::runtime_error(kind + " '" + path.string() + "': " + problem);
}

//! Opens `path` for binary reading. Directories are refused up front: the standard library
//! opens them "successfully" and only fails, or throws a message without the path, on read.
inline std::ifstream open_input(const std::filesystem::path& path, const std::string& kind) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    fail_file(kind, path, "cannot open file (it is a directory)");
  std::ifstream in(path, std::ios::binary);
  if (!in) fail_file(kind, path, "cannot open file (missing or unreadable)");
  return in;
}

//! The whole content of `path` as bytes.
inline std::string read_all(const std::filesystem::path& path, const std::string& kind) {
  std::ifstream in = open_input(path, kind);
  in.seekg(0, std::ios::end);
  const std::streamoff size = in.tellg();
  in.seekg(0);
  if (size < 0) fail_file(kind, path, "cannot determine file size");
  std::string bytes(static_cast<std::size_t>(size), '\0');
  in.read(bytes.data(), size);
  if (in.gcount() != size) fail_file(kind, path, "read failed");
  return bytes;
}

}  // namespace llama
