// Catch2's main() lives in its own translation unit so test edits do not recompile it.
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
