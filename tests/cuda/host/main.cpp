// Catch2 runner of the host-side CUDA backend tests (no GPU needed).
#define CATCH_CONFIG_MAIN
#include <catch2/catch.hpp>
