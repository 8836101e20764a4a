#!/usr/bin/env bash
# Install edge-runtime on a Linux laptop or PC with an NVIDIA GPU (x86-64; 64-bit ARM machines
# with a discrete NVIDIA GPU too, but not a Jetson: install-jetson.sh): the build dependencies,
# a venv, llama-cpp-python compiled with CUDA (GGML_CUDA) for the GPUs' compute capability as
# `nvidia-smi --query-gpu=compute_cap` reports it, NVML for the VRAM figures (the nvidia extra),
# then `edgert doctor`.
#
# Usage: scripts/install-cuda.sh [--venv DIR] [--extras LIST] [--dry-run] [--help]
#   --venv DIR      the venv to create or reuse (default: .venv in the repository root)
#   --extras LIST   the extras to install (default: nvidia)
#   --dry-run       print each command it would run, one per line after '+ ', and run none
#                   (read-only checks of the machine still run)
#   --help          this text
#
# Needs the NVIDIA driver (nvidia-smi, 510 or newer to report the compute capability) and the
# CUDA toolkit (nvcc, on PATH or in /usr/local/cuda/bin) new enough for the GPU. On Debian and
# Ubuntu the missing build packages are installed with apt; elsewhere install a C++ compiler
# first.
#
# Re-running is safe: installed apt packages are skipped, an existing venv is reused, and
# llama-cpp-python is rebuilt only when its build lacks CUDA for these GPUs.
#
# Environment:
#   PYTHON=python3.X          the interpreter for a new venv (default: python3, 3.10 or newer)
#   EDGERT_CUDA_ARCH=NN       build for this compute capability instead (e.g. 86, or "86;89")
# For testing on another machine, the platform facts can be overridden:
#   EDGERT_UNAME_S, EDGERT_UNAME_M   instead of `uname -s`, `uname -m`
#   EDGERT_OS_RELEASE=FILE           instead of /etc/os-release
#   EDGERT_DEVICE_TREE_MODEL=FILE    instead of /proc/device-tree/model
#   EDGERT_TEGRA_RELEASE=FILE        instead of /etc/nv_tegra_release (tells a Jetson apart)
#   EDGERT_NVIDIA_SMI=CMD            instead of nvidia-smi
#   EDGERT_NVCC=PATH                 the CUDA compiler (default: nvcc on PATH, /usr/local/cuda/bin)
set -euo pipefail
# shellcheck source=install-common.sh
source "$(dirname "${BASH_SOURCE[0]}")/install-common.sh"

EXTRAS="nvidia"
CUDA_ARCHS=""

# The GPUs' compute capabilities without the dot, distinct, ';'-separated ("86;89").
gpu_archs() {
    local out cap archs=""
    out="$("$NVIDIA_SMI" --query-gpu=compute_cap --format=csv,noheader 2>/dev/null)" || return 1
    while IFS= read -r cap; do
        cap="${cap//[[:space:]]/}"
        [[ -n $cap ]] || continue
        [[ $cap =~ ^[0-9]+\.[0-9]$ ]] || return 1
        [[ ";$archs;" == *";${cap/./};"* ]] || archs+="${archs:+;}${cap/./}"
    done <<<"$out"
    [[ -n $archs ]] && printf '%s' "$archs"
}

check_platform() {
    local nvcc arch
    is_linux_64 || refuse "install-cuda.sh is for 64-bit Linux with an NVIDIA GPU"
    ! { is_arm64 && is_jetson; } || refuse "this is a Jetson, whose GPU needs JetPack's CUDA"
    has_nvidia_smi || refuse "no NVIDIA driver ($NVIDIA_SMI not found), so no NVIDIA GPU to build for"
    check_64bit_userland
    CUDA_ARCHS="${EDGERT_CUDA_ARCH:-}"
    if [[ -z $CUDA_ARCHS ]]; then
        CUDA_ARCHS="$(gpu_archs)" \
            || die "$NVIDIA_SMI reported no compute capability (driver older than 510, or no GPU):" \
                   "set EDGERT_CUDA_ARCH, e.g. 86"
    fi
    for arch in ${CUDA_ARCHS//;/ }; do
        [[ $arch =~ ^[1-9][0-9]+$ ]] || die "'$CUDA_ARCHS' is not a compute capability list like 86 or 86;89"
    done
    nvcc="$(find_nvcc)" \
        || die "no CUDA compiler (nvcc): install the CUDA toolkit" \
               "(nvidia-cuda-toolkit on Debian and Ubuntu) or set EDGERT_NVCC"
    check_nvcc_archs "$nvcc" "$CUDA_ARCHS"
    LLAMA_BACKEND="CUDA for $CUDA_ARCHS"
    LLAMA_CMAKE_ARGS="-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=$CUDA_ARCHS -DCMAKE_CUDA_COMPILER=$nvcc"
}

llama_build_ok() { cuda_build_ok "$1" "$CUDA_ARCHS"; }

install_main "$@"
