// Conformance: every golden case of the reference implementations (shared/golden).
#include <catch2/catch.hpp>

#include <filesystem>
#include <string>
#include <vector>

#include "golden_case.hpp"

namespace {
std::vector<std::filesystem::path> golden_cases() {
  std::vector<std::filesystem::path> dirs;
  for (const auto& entry : std::filesystem::directory_iterator(KVTRIM_GOLDEN_DIR))
    if (entry.is_directory() && std::filesystem::exists(entry.path() / "case.txt")) dirs.push_back(entry.path());
  std::sort(dirs.begin(), dirs.end());
  return dirs;
}
}  // namespace

TEST_CASE("golden cases are present", "[cpu][golden]") {
  INFO("golden folder: " << KVTRIM_GOLDEN_DIR << " (set -DKVTRIM_SHARED_DIR)");
  REQUIRE(std::filesystem::is_directory(KVTRIM_GOLDEN_DIR));
  REQUIRE(golden_cases().size() >= 23);
}

TEST_CASE("every golden case conforms to its reference", "[cpu][golden]") {
  for (const auto& dir : golden_cases()) {
    const golden::case_result r = golden::run_case(dir);
    INFO(r.summary() << " max score error " << r.max_score_error);
    for (const auto& f : r.failures) UNSCOPED_INFO(f);
    CHECK(r.selections > 0);
    CHECK(r.passed == r.selections);
    CHECK(r.exact == r.untied);
  }
}
