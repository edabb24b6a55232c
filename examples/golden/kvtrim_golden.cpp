// kvtrim-golden CASE_DIR...: runs golden case folders (shared/golden/README.md format) through
// kvtrim's CPU backend and prints `NAME agreement=<fraction> exact=<equal>/<untied>` per case.
// Exits 1 if any case falls short, 2 if a folder cannot be read.
#include <cstdio>
#include <exception>
#include <iostream>

#include "golden_case.hpp"

int main(int argc, char** argv) {
  if (argc < 2) {
    std::cerr << "usage: kvtrim-golden [--verbose] CASE_DIR...\n";
    return 2;
  }
  bool verbose = false;
  int status = 0;
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    if (arg == "--verbose" || arg == "-v") {
      verbose = true;
      continue;
    }
    try {
      const golden::case_result r = golden::run_case(arg);
      std::cout << r.summary() << '\n';
      if (verbose) std::cout << "  max relative score error " << r.max_score_error << '\n';
      for (const auto& f : r.failures) std::cout << "  " << f << '\n';
      if (!r.ok()) status = status == 0 ? 1 : status;
    } catch (const std::exception& e) {
      std::cerr << "kvtrim-golden: " << e.what() << '\n';
      status = 2;
    }
  }
  return status;
}
