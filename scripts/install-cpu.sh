#!/usr/bin/env bash
# Install edge-runtime on 64-bit Linux (x86-64 or aarch64) without a GPU: the build
# dependencies, a venv and the plain install (llama-cpp-python's default CPU build: the
# compiler's -march=native and OpenMP), then `edgert doctor`.
#
# Usage: scripts/install-cpu.sh [--venv DIR] [--extras LIST] [--dry-run] [--help]
#   --venv DIR      the venv to create or reuse (default: .venv in the repository root)
#   --extras LIST   the extras to install (default: none; e.g. server,tflite,onnx)
#   --dry-run       print each command it would run, one per line after '+ ', and run none
#                   (read-only checks of the machine still run)
#   --help          this text
#
# On Debian and Ubuntu the missing build packages are installed with apt; elsewhere install a
# C++ compiler first. On a Raspberry Pi, a Jetson or a machine with an NVIDIA GPU it still
# works, but says which script fits better.
#
# Re-running is safe: installed apt packages are skipped, an existing venv is reused, and pip
# leaves an installed llama-cpp-python alone. There is no forced rebuild here: the scripts that
# force one also keep that build out of pip's cache, so what pip has cached is a default build.
#
# Environment:
#   PYTHON=python3.X          the interpreter for a new venv (default: python3, 3.10 or newer)
# For testing on another machine, the platform facts can be overridden:
#   EDGERT_UNAME_S, EDGERT_UNAME_M   instead of `uname -s`, `uname -m`
#   EDGERT_OS_RELEASE=FILE           instead of /etc/os-release
#   EDGERT_DEVICE_TREE_MODEL=FILE    instead of /proc/device-tree/model
#   EDGERT_TEGRA_RELEASE=FILE        instead of /etc/nv_tegra_release
#   EDGERT_NVIDIA_SMI=CMD            instead of nvidia-smi
set -euo pipefail
# shellcheck source=install-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-common.sh"

EXTRAS=""

check_platform() {
    local fits
    is_linux_64 || refuse "install-cpu.sh is for 64-bit Linux (x86-64 or aarch64)"
    check_64bit_userland
    fits="$(suggest_script)"
    if [[ $fits != install-cpu.sh ]]; then
        log "note: scripts/$fits fits this machine better (it builds for its GPU or board);" \
            "going on with the CPU build"
    fi
}

install_main "$@"
