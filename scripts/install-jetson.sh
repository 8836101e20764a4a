#!/usr/bin/env bash
# Install edge-runtime on an NVIDIA Jetson (Orin, Xavier, TX2, Nano) with JetPack: the apt build
# dependencies, a venv, llama-cpp-python compiled with CUDA (GGML_CUDA) for the module's GPU,
# then `edgert doctor`.
#
# Usage: scripts/install-jetson.sh [--venv DIR] [--extras LIST] [--dry-run] [--help]
#   --venv DIR      the venv to create or reuse (default: .venv in the repository root)
#   --extras LIST   the extras to install (default: none; onnxruntime from PyPI would run on the
#                   CPU only here, NVIDIA's Jetson wheels carry the CUDA one)
#   --dry-run       print each command it would run, one per line after '+ ', and run none
#                   (read-only checks of the machine still run)
#   --help          this text
#
# The GPU's compute capability comes from the module named in the device tree: Orin 8.7,
# Xavier 7.2, TX2 6.2, Nano and TX1 5.3 (else JetPack 6, /etc/nv_tegra_release R36, means Orin).
# CUDA comes with JetPack (sudo apt install nvidia-jetpack); nvcc is taken from PATH or
# /usr/local/cuda/bin. edge-runtime needs Python 3.10 or newer: JetPack 6 has it, JetPack 5
# (Python 3.8) and 4 need another one, given as PYTHON=python3.X.
#
# Re-running is safe: installed apt packages are skipped, an existing venv is reused, and
# llama-cpp-python is rebuilt only when its build lacks CUDA for this GPU. The CUDA build is the
# long part (tens of minutes on the smaller modules).
#
# Environment:
#   PYTHON=python3.X          the interpreter for a new venv (default: python3)
#   EDGERT_CUDA_ARCH=NN       build for this compute capability instead (e.g. 87)
#   CMAKE_BUILD_PARALLEL_LEVEL=N   compile jobs (fewer on a 4 GB module)
# For testing on another machine, the platform facts can be overridden:
#   EDGERT_UNAME_S, EDGERT_UNAME_M   instead of `uname -s`, `uname -m`
#   EDGERT_OS_RELEASE=FILE           instead of /etc/os-release
#   EDGERT_DEVICE_TREE_MODEL=FILE    instead of /proc/device-tree/model
#   EDGERT_TEGRA_RELEASE=FILE        instead of /etc/nv_tegra_release
#   EDGERT_NVCC=PATH                 the CUDA compiler (default: nvcc on PATH, /usr/local/cuda/bin)
#   EDGERT_NVIDIA_SMI=CMD            instead of nvidia-smi (only to suggest another script)
set -euo pipefail
# shellcheck source=install-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-common.sh"

EXTRAS=""
CUDA_ARCH=""

# Compute capability without the dot, from the module name; Orin first ("Jetson Orin Nano").
jetson_arch() {
    local model release
    model="$(board_model)"
    case "$model" in
        *Orin*) echo 87 ;;
        *Xavier*) echo 72 ;;
        *TX2*) echo 62 ;;
        *Nano*|*TX1*) echo 53 ;;
        *)
            release=""
            [[ ! -r $TEGRA_RELEASE ]] || read -r release <"$TEGRA_RELEASE" || true
            [[ $release =~ R36 ]] || return 1
            echo 87 ;;
    esac
}

check_platform() {
    local nvcc
    { [[ $UNAME_S == Linux ]] && is_arm64; } \
        || refuse "install-jetson.sh is for an NVIDIA Jetson with JetPack (Linux aarch64)"
    is_jetson \
        || refuse "this is not an NVIDIA Jetson (no $TEGRA_RELEASE, no 'Jetson' in $DEVICE_TREE_MODEL)"
    is_debian_family || refuse "install-jetson.sh needs JetPack's Ubuntu"
    CUDA_ARCH="${EDGERT_CUDA_ARCH:-}"
    if [[ -z $CUDA_ARCH ]]; then
        CUDA_ARCH="$(jetson_arch)" || die "cannot tell which Jetson module '$(board_model)' is:" \
                                          "set EDGERT_CUDA_ARCH (Orin 87, Xavier 72, Nano 53)"
    fi
    [[ $CUDA_ARCH =~ ^[1-9][0-9]+$ ]] \
        || die "EDGERT_CUDA_ARCH must be a compute capability without the dot, like 87, not '$CUDA_ARCH'"
    nvcc="$(find_nvcc)" \
        || die "no CUDA compiler (nvcc): install JetPack's CUDA" \
               "(sudo apt install nvidia-jetpack) or set EDGERT_NVCC"
    check_nvcc_archs "$nvcc" "$CUDA_ARCH"
    LLAMA_BACKEND="CUDA for compute capability ${CUDA_ARCH%?}.${CUDA_ARCH: -1}"
    # CMAKE_CUDA_COMPILER because JetPack leaves /usr/local/cuda/bin off PATH, where CMake looks.
    LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCH -DCMAKE_CUDA_COMPILER=$nvcc"
}

build_deps() { apt_install "${APT_PACKAGES[@]}"; }

llama_build_ok() { cuda_build_ok "$1" "$CUDA_ARCH"; }

install_main "$@"
