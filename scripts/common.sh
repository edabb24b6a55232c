# shellcheck shell=bash
# Shared by scripts/test and scripts/demo (sourced, not run): installs what the build needs
# and configures + builds a CMake preset. Works from any current directory.

KVTRIM_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KVTRIM_JOBS="$(nproc 2>/dev/null || echo 2)"

# Debian packages the library's tests, examples and benchmarks use.
KVTRIM_PACKAGES=(catch2 libbenchmark-dev libcli11-dev cmake ninja-build g++)

kvtrim_log() { printf '\033[1m== %s\033[0m\n' "$*" >&2; }

# Installs the packages that are missing, and only those: `apt-get update` runs once, and only
# when something is missing; sudo is used only when not root.
kvtrim_install_deps() {
  if ! command -v dpkg-query >/dev/null 2>&1; then
    kvtrim_log "no dpkg here: make sure these are installed: ${KVTRIM_PACKAGES[*]}"
    return 0
  fi
  local missing=() package
  for package in "${KVTRIM_PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q 'install ok installed'; then
      missing+=("$package")
    fi
  done
  if ((${#missing[@]} == 0)); then
    return 0
  fi
  local sudo=()
  if [[ "$(id -u)" != 0 ]]; then
    if ! command -v sudo >/dev/null 2>&1; then
      kvtrim_log "missing packages (${missing[*]}) and no sudo: install them as root"
      return 1
    fi
    sudo=(sudo)
  fi
  kvtrim_log "installing ${missing[*]}"
  ${sudo[@]+"${sudo[@]}"} apt-get update
  ${sudo[@]+"${sudo[@]}"} env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
}

# kvtrim_build <preset>: configures the preset (CMakePresets.json) and builds it with every core.
kvtrim_build() {
  local preset="$1"
  kvtrim_log "configure ($preset)"
  (cd "$KVTRIM_ROOT" && cmake --preset "$preset")
  kvtrim_log "build ($preset, -j$KVTRIM_JOBS)"
  (cd "$KVTRIM_ROOT" && cmake --build --preset "$preset" -j "$KVTRIM_JOBS")
}
