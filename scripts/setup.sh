#!/usr/bin/env bash
# Installs what building and testing stepwise needs and is missing:
# a C++ compiler, cmake, libtorch (Debian's libtorch-dev unless Torch_DIR or
# TORCH_DIR names your own, with OpenBLAS for its matrix products),
# nlohmann-json and ICU. Go must already be installed.
# With --test it also installs Chromium, which the page's browser test drives.
# On Debian/Ubuntu it installs with apt-get; elsewhere it says what to install.
set -euo pipefail

for_tests=0
[ "${1:-}" = "--test" ] && for_tests=1

say() { printf 'setup: %s\n' "$*" >&2; }

missing=()
optional=()
need_cmd() { command -v "$1" >/dev/null 2>&1 || missing+=("$2"); }
need_file() { [ -e "$1" ] || missing+=("$2"); }

need_cmd cmake cmake
need_cmd c++ g++
need_cmd make make
need_file /usr/include/nlohmann/json.hpp nlohmann-json3-dev
need_file /usr/include/unicode/normalizer2.h libicu-dev
if [ -z "${Torch_DIR:-}${TORCH_DIR:-}" ]; then
  # Debian's libtorch-dev puts TorchConfig.cmake here.
  if ! ls /usr/lib/*/cmake/Torch/TorchConfig.cmake >/dev/null 2>&1; then
    missing+=(libtorch-dev)
  fi
  # Debian's libtorch calls whatever libblas.so.3 points at; without OpenBLAS
  # that is the single-threaded reference BLAS, several times slower.
  if ! ls /usr/lib/*/openblas-pthread/libblas.so.3 >/dev/null 2>&1; then
    missing+=(libopenblas0-pthread)
  fi
  # oneDNN's headers, for Winograd convolutions on the oneDNN libtorch uses
  # (docs/engine.md); the build goes on without them where apt has none.
  [ -e /usr/include/oneapi/dnnl/dnnl.hpp ] || optional+=(libdnnl-dev)
fi

if [ "$for_tests" = 1 ] && ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  missing+=(chromium)
fi

if ! command -v go >/dev/null 2>&1 && [ ! -x /usr/local/go/bin/go ]; then
  say "Go is not installed. Install Go 1.26 or newer from your distribution or https://go.dev/dl, then rerun."
  exit 1
fi

if [ ${#missing[@]} -eq 0 ] && [ ${#optional[@]} -eq 0 ]; then
  exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
  [ ${#missing[@]} -eq 0 ] && exit 0  # only optional ones: build without them
  say "missing: ${missing[*]}"
  say "this is not a Debian/Ubuntu system, so install them yourself:"
  say "  - a C++17 compiler, cmake >= 3.18, make, nlohmann-json (3.x headers), ICU (libicu)"
  say "  - libtorch 1.13 or 2.x (https://pytorch.org, 'LibTorch' C++ download; CUDA builds work),"
  say "    then export TORCH_DIR=/path/to/libtorch"
  say "  - for the tests: Chromium"
  exit 1
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else
    if [ ${#missing[@]} -eq 0 ]; then
      say "not root: building without ${optional[*]}"
      exit 0
    fi
    say "need root to install ${missing[*]}; run as root or install sudo"
    exit 1
  fi
fi

export DEBIAN_FRONTEND=noninteractive
# A stale package list finds nothing: refresh it first.
$SUDO apt-get update -qq
for pkg in "${optional[@]}"; do
  if apt-cache show "$pkg" >/dev/null 2>&1; then missing+=("$pkg"); else say "$pkg is not available here: building without it"; fi
done
[ ${#missing[@]} -eq 0 ] && exit 0
say "installing ${missing[*]}"
$SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
say "done"
