#!/usr/bin/env bash
# Install edge-runtime on a Raspberry Pi (4, 5, 400, 500, CM4, CM5) running the 64-bit Raspberry
# Pi OS, Debian bookworm or trixie on aarch64: the apt build dependencies, a venv, llama-cpp-python
# compiled on the board for its own CPU with OpenMP, the LiteRT (ai-edge-litert) and ONNX Runtime
# aarch64 wheels, then `edgert doctor`.
#
# Usage: scripts/install-pi.sh [--venv DIR] [--extras LIST] [--dry-run] [--help]
#   --venv DIR      the venv to create or reuse (default: .venv in the repository root)
#   --extras LIST   the extras to install (default: tflite,onnx; '' for none)
#   --dry-run       print each command it would run, one per line after '+ ', and run none
#                   (read-only checks of the machine still run)
#   --help          this text
#
# Re-running is safe: installed apt packages are skipped, an existing venv is reused, and
# llama-cpp-python is rebuilt only when its build lacks OpenMP. Compiling llama.cpp on the board
# takes a while (longest on a Pi 4), and a 2 GB board may need swap for it.
#
# Environment:
#   PYTHON=python3.X          the interpreter for a new venv (default: python3, 3.10 or newer)
#   CMAKE_BUILD_PARALLEL_LEVEL=N   compile jobs (fewer on a 2 GB board)
# For testing on another machine, the platform facts can be overridden:
#   EDGERT_UNAME_S, EDGERT_UNAME_M   instead of `uname -s`, `uname -m`
#   EDGERT_OS_RELEASE=FILE           instead of /etc/os-release
#   EDGERT_DEVICE_TREE_MODEL=FILE    instead of /proc/device-tree/model
#   EDGERT_TEGRA_RELEASE=FILE        instead of /etc/nv_tegra_release (tells a Jetson apart)
#   EDGERT_NVIDIA_SMI=CMD            instead of nvidia-smi (only to suggest another script)
set -euo pipefail
# shellcheck source=install-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-common.sh"

EXTRAS="tflite,onnx"
LLAMA_BACKEND="OpenMP"
# GGML_NATIVE compiles for the CPU of the board that builds it (-mcpu=native: cortex-a72 on a
# Pi 4, cortex-a76 with dotprod on a Pi 5), so one script serves both boards; a fixed
# -mcpu=cortex-a76 would only add risk (illegal instructions if the venv is copied to a Pi 4).
# OpenMP is named so a build that lacks it (no libgomp) is caught by llama_build_ok below.
PI_CMAKE_ARGS="-DGGML_NATIVE=on -DGGML_OPENMP=on"

check_platform() {
    { [[ $UNAME_S == Linux ]] && is_arm64; } \
        || refuse "install-pi.sh is for a Raspberry Pi on 64-bit Raspberry Pi OS (Linux aarch64)"
    is_raspberry_pi || refuse "this is not a Raspberry Pi (no 'Raspberry Pi' in $DEVICE_TREE_MODEL)"
    is_pi_os || refuse "install-pi.sh needs Raspberry Pi OS (Debian) bookworm or trixie, 64-bit"
    check_64bit_userland
    LLAMA_CMAKE_ARGS="$PI_CMAKE_ARGS"
}

build_deps() { apt_install "${APT_PACKAGES[@]}"; }

# A CPU build with OpenMP ("CPU : NEON = 1 | ... | OPENMP = 1" in llama.cpp's system info).
llama_build_ok() { [[ $1 == *"OPENMP = 1"* ]]; }

install_main "$@"
