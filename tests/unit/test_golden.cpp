// Conformance: every golden case of the reference implementations (shared/golden).
#include <catch2/catch.hpp>

#include <filesystem>
#include <fstream>
#include <iterator>
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

TEST_CASE("the golden check fails a policy that keeps a different set", "[cpu][golden]") {
  // The same case with a smaller capacity in case.txt: counts and sets no longer match.
  const std::filesystem::path source = std::filesystem::path(KVTRIM_GOLDEN_DIR) / "snapkv_kvhead_mean_max7_w8_c64_real512";
  REQUIRE(std::filesystem::is_directory(source));
  const auto broken = std::filesystem::temp_directory_path() / "kvtrim_golden_broken_case";
  std::filesystem::remove_all(broken);
  std::filesystem::copy(source, broken);
  std::ifstream in(source / "case.txt");
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  const std::string from = "max_capacity_prompt = 64", to = "max_capacity_prompt = 60";
  REQUIRE(text.find(from) != std::string::npos);
  text.replace(text.find(from), from.size(), to);
  std::filesystem::remove(broken / "case.txt");
  std::ofstream(broken / "case.txt") << text;
  const golden::case_result r = golden::run_case(broken);
  std::filesystem::remove_all(broken);
  CHECK(r.agreement() < 1.0);
  CHECK_FALSE(r.ok());
  CHECK_FALSE(r.failures.empty());
}

TEST_CASE("a golden folder that cannot be read is an error, not a pass", "[cpu][golden]") {
  CHECK_THROWS_WITH(golden::run_case("/nonexistent/kvtrim/case"), Catch::Contains("cannot open"));
}
