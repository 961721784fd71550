#!/usr/bin/env bash
# Installs what xquant needs to build, test and bench on a fresh Debian machine.
set -euo pipefail
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update
$SUDO apt-get install -y --no-install-recommends \
  cmake g++ make libeigen3-dev doctest-dev libbenchmark-dev \
  clang libclang-rt-14-dev  # clang + libFuzzer/sanitizer runtimes for fuzz/ (Debian 12: clang 14)
