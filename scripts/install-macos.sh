#!/usr/bin/env bash
# Install edge-runtime on an Apple silicon Mac (arm64 macOS): a venv, llama-cpp-python compiled
# with Metal (GGML_METAL) for the GPU, then `edgert doctor`.
#
# Usage: scripts/install-macos.sh [--venv DIR] [--extras LIST] [--dry-run] [--help]
#   --venv DIR      the venv to create or reuse (default: .venv in the repository root)
#   --extras LIST   the extras to install (default: none; e.g. tflite,onnx)
#   --dry-run       print each command it would run, one per line after '+ ', and run none
#                   (read-only checks of the machine still run)
#   --help          this text
#
# Needs the Xcode Command Line Tools (xcode-select --install) and Python 3.10 or newer (the
# python3 of the Command Line Tools is 3.9: brew install python@3.12, then PYTHON=python3.12).
# CMake comes from PyPI during the build. Run it from a native arm64 shell, not under Rosetta.
#
# Re-running is safe: an existing venv is reused, and llama-cpp-python is rebuilt only when its
# build cannot offload to the GPU.
#
# Environment:
#   PYTHON=python3.X          the interpreter for a new venv (default: python3)
# For testing on another machine, the platform facts can be overridden:
#   EDGERT_UNAME_S, EDGERT_UNAME_M   instead of `uname -s`, `uname -m`
#   EDGERT_OS_RELEASE, EDGERT_DEVICE_TREE_MODEL, EDGERT_TEGRA_RELEASE, EDGERT_NVIDIA_SMI
#                                    (Linux facts, only to suggest another script)
# xcode-select is looked up on PATH.
set -euo pipefail
# shellcheck source=install-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-common.sh"

EXTRAS=""
LLAMA_BACKEND="Metal"

check_platform() {
    [[ $UNAME_S == Darwin ]] || refuse "install-macos.sh is for macOS on Apple silicon"
    [[ $UNAME_M == arm64 ]] \
        || refuse "Metal builds need arm64 macOS; an Intel Mac or a Rosetta shell reports $UNAME_M" \
                  "(in a Rosetta shell: arch -arm64 bash $0)"
    LLAMA_CMAKE_ARGS="-DGGML_METAL=on"
}

build_deps() {
    xcode-select -p >/dev/null 2>&1 \
        || die "the Xcode Command Line Tools are missing: run xcode-select --install, then re-run"
}

# Metal is the only GPU backend on a Mac, so GPU offload means Metal.
llama_build_ok() { [[ $1 == *gpu_offload=1* ]]; }

install_main "$@"
