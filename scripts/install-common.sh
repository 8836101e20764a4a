# shellcheck shell=bash
# Shared by scripts/install-{pi,jetson,macos,cuda,cpu}.sh, which source it; not run on its own.
# It holds what the five have in common: the options, printing or running each command, the
# platform facts, the apt packages, the venv, the llama-cpp-python build check and the final
# `edgert doctor`. A script sources it, sets its defaults and hooks, then calls install_main "$@":
#   EXTRAS              extras of `pip install -e ".[EXTRAS]"` (empty: plain install)
#   LLAMA_BACKEND       what its llama-cpp-python build must have, in words ("CUDA for 8.7")
#   check_platform      refuses the wrong machine (refuse ...); may set LLAMA_CMAKE_ARGS
#   build_deps          installs or checks the system build dependencies
#   llama_build_ok INFO 0 when the installed build (see llama_info) is the wanted one
#
# Every platform fact is read through a variable that the environment may set, so a script can
# be tried for another machine on this one (tests/test_install_scripts.py does so):
#   EDGERT_UNAME_S, EDGERT_UNAME_M    `uname -s`, `uname -m`
#   EDGERT_OS_RELEASE                 os-release file (default /etc/os-release)
#   EDGERT_DEVICE_TREE_MODEL          board model (default /proc/device-tree/model)
#   EDGERT_TEGRA_RELEASE              Jetson L4T release (default /etc/nv_tegra_release)
#   EDGERT_NVIDIA_SMI, EDGERT_NVCC    nvidia-smi and nvcc (default: found on PATH)
# Other tools (dpkg-query, apt-get, sudo, xcode-select, getconf) are looked up on PATH.

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SCRIPT_NAME="$(basename "$0" .sh)"
VENV="$REPO_ROOT/.venv"
DRY_RUN=0
EXTRAS=""
LLAMA_BACKEND="the CPU backend"
LLAMA_CMAKE_ARGS=""  # empty: llama-cpp-python's default build, no forced rebuild

UNAME_S="${EDGERT_UNAME_S:-$(uname -s)}"
UNAME_M="${EDGERT_UNAME_M:-$(uname -m)}"
OS_RELEASE="${EDGERT_OS_RELEASE:-/etc/os-release}"
DEVICE_TREE_MODEL="${EDGERT_DEVICE_TREE_MODEL:-/proc/device-tree/model}"
TEGRA_RELEASE="${EDGERT_TEGRA_RELEASE:-/etc/nv_tegra_release}"
NVIDIA_SMI="${EDGERT_NVIDIA_SMI:-nvidia-smi}"
PYTHON="${PYTHON:-python3}"

# What llama.cpp's build needs on Debian, Raspberry Pi OS and Ubuntu (JetPack included): the
# compiler, cmake, a venv, Python's headers, git, and the OpenMP runtime the CPU backend uses.
APT_PACKAGES=(build-essential cmake python3-venv python3-dev git libgomp1)

log() { printf '%s: %s\n' "$SCRIPT_NAME" "$*" >&2; }
# One line on stderr, exit 1. Newlines in the message are flattened so it stays one line.
die() { local msg="$*"; printf '%s: error: %s\n' "$SCRIPT_NAME" "${msg//$'\n'/ }" >&2; exit 1; }
usage_error() { printf '%s: error: %s (see --help)\n' "$SCRIPT_NAME" "$*" >&2; exit 2; }

# The comment block at the top of the running script, without its '# '.
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

parse_args() {
    while [[ $# -gt 0 ]]; do
        case "$1" in
            --venv) [[ $# -ge 2 && -n $2 ]] || usage_error "--venv needs a directory"
                    VENV="$2"; shift 2 ;;
            --venv=?*) VENV="${1#--venv=}"; shift ;;
            --extras) [[ $# -ge 2 ]] || usage_error "--extras needs a list (e.g. server,report)"
                      EXTRAS="$2"; shift 2 ;;
            --extras=*) EXTRAS="${1#--extras=}"; shift ;;
            --dry-run) DRY_RUN=1; shift ;;
            -h|--help) usage; exit 0 ;;
            *) usage_error "unknown argument '$1'" ;;
        esac
    done
    [[ $EXTRAS =~ ^[a-z0-9,-]*$ ]] || usage_error "--extras takes names like server,report, not '$EXTRAS'"
    [[ $VENV == /* ]] || VENV="$PWD/$VENV"
}

# A word as the shell would read it back: bare when safe, else in single quotes.
quote_word() {
    if [[ $1 =~ ^[A-Za-z0-9_./:=,+@%-]+$ ]]; then
        printf '%s' "$1"
    else
        printf "'%s'" "${1//\'/\'\\\'\'}"
    fi
}

# Print the command as '+ cmd args' (one line, shell-quoted), then run it unless --dry-run.
run() {
    local line="+" word
    for word in "$@"; do line+=" $(quote_word "$word")"; done
    printf '%s\n' "$line"
    if [[ $DRY_RUN -eq 0 ]]; then "$@"; fi
}

# run, through sudo unless already root.
as_root() {
    if [[ $(id -u) -eq 0 ]]; then
        run "$@"
    else
        command -v sudo >/dev/null 2>&1 || die "this step needs root and there is no sudo: re-run as root"
        run sudo "$@"
    fi
}

# --- platform facts ---------------------------------------------------------------------------

# os_release KEY: the value of KEY in the os-release file, unquoted; empty when absent.
os_release() {
    local line value
    [[ -r $OS_RELEASE ]] || return 0
    while IFS= read -r line || [[ -n $line ]]; do
        if [[ $line == "$1="* ]]; then
            value="${line#*=}"
            value="${value#[\"\']}"
            printf '%s' "${value%[\"\']}"
            return 0
        fi
    done <"$OS_RELEASE"
}

# The board's model from the device tree (NUL-terminated there); empty when there is none.
board_model() {
    if [[ -r $DEVICE_TREE_MODEL ]]; then tr -d '\0\n' <"$DEVICE_TREE_MODEL"; fi
}

is_linux_64() { [[ $UNAME_S == Linux && $UNAME_M =~ ^(x86_64|amd64|aarch64|arm64)$ ]]; }
is_arm64() { [[ $UNAME_M == aarch64 || $UNAME_M == arm64 ]]; }
is_debian_family() { [[ " $(os_release ID) $(os_release ID_LIKE) " =~ \ (debian|ubuntu)\  ]]; }
is_jetson() { [[ -e $TEGRA_RELEASE || $(board_model) == *Jetson* ]]; }
is_raspberry_pi() { [[ $(board_model) == *"Raspberry Pi"* ]]; }
# Raspberry Pi OS (Debian) bookworm or trixie, the systems install-pi.sh is written for.
is_pi_os() {
    [[ $(os_release ID) =~ ^(debian|raspbian)$ && $(os_release VERSION_CODENAME) =~ ^(bookworm|trixie)$ ]]
}
has_nvidia_smi() { command -v "$NVIDIA_SMI" >/dev/null 2>&1; }

# "Linux aarch64, Debian GNU/Linux 12 (bookworm), board 'X'": what a refusal is based on.
describe_platform() {
    local text="$UNAME_S $UNAME_M" name model
    if [[ $UNAME_S == Linux ]]; then
        name="$(os_release PRETTY_NAME)"
        model="$(board_model)"
        [[ -z $name ]] || text+=", $name"
        [[ -z $model ]] || text+=", board '$model'"
    fi
    printf '%s' "$text"
}

# The install script that fits this machine, or nothing when none does.
suggest_script() {
    if [[ $UNAME_S == Darwin && $UNAME_M == arm64 ]]; then
        echo install-macos.sh
    elif is_linux_64; then
        if is_arm64 && is_jetson; then echo install-jetson.sh
        elif is_arm64 && is_raspberry_pi && is_pi_os; then echo install-pi.sh
        elif has_nvidia_smi; then echo install-cuda.sh
        else echo install-cpu.sh
        fi
    fi
}

# refuse REASON: the one-line refusal for the wrong platform, naming the script that fits.
refuse() {
    local fits hint=""
    fits="$(suggest_script)"
    if [[ -n $fits && $fits != "$SCRIPT_NAME.sh" ]]; then hint="; use scripts/$fits instead"; fi
    die "$* [$(describe_platform)]$hint"
}

# A 64-bit kernel can run a 32-bit userland (32-bit Raspberry Pi OS does), which no wheel fits.
check_64bit_userland() {
    local bits
    bits="$(getconf LONG_BIT 2>/dev/null || echo 64)"
    [[ $bits == 64 ]] || refuse "$SCRIPT_NAME needs a 64-bit system, and this userland is $bits-bit"
}

# --- CUDA (install-jetson.sh, install-cuda.sh) ------------------------------------------------

# The CUDA compiler: EDGERT_NVCC, else nvcc on PATH, else CUDA's usual place (not on PATH on
# JetPack). Prints its path; fails when there is none.
find_nvcc() {
    if [[ -n ${EDGERT_NVCC:-} ]]; then
        command -v "$EDGERT_NVCC"
    elif command -v nvcc; then
        :
    elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
        echo /usr/local/cuda/bin/nvcc
    else
        return 1
    fi
}

# check_nvcc_archs NVCC "86;89": dies when that nvcc cannot compile for one of the
# architectures (an older CUDA toolkit than the GPU). An nvcc too old to list them passes.
check_nvcc_archs() {
    local known arch
    known="$("$1" --list-gpu-arch 2>/dev/null)" || return 0
    [[ -n $known ]] || return 0
    for arch in ${2//;/ }; do
        [[ $'\n'"$known"$'\n' == *$'\n'"compute_$arch"$'\n'* ]] \
            || die "$1 cannot compile for compute capability ${arch%?}.${arch: -1}:" \
                   "install a newer CUDA toolkit"
    done
}

# cuda_build_ok INFO "86;89": a CUDA build of llama.cpp that covers each architecture. The
# CUDA backend reports "ARCHS = 860,890" (its __CUDA_ARCH_LIST__); a build that does not say
# is taken as fitting.
cuda_build_ok() {
    local arch built
    [[ $1 == *gpu_offload=1* && $1 == *"CUDA :"* ]] || return 1
    if [[ $1 =~ ARCHS\ =\ ([0-9,]+) ]]; then
        built=",${BASH_REMATCH[1]},"
        for arch in ${2//;/ }; do
            [[ $built == *",${arch}0,"* ]] || return 1
        done
    fi
}

# --- the install steps ------------------------------------------------------------------------

check_python() {
    local py="$PYTHON" version
    [[ ! -x $VENV/bin/python ]] || py="$VENV/bin/python"
    command -v "$py" >/dev/null 2>&1 \
        || die "no Python interpreter '$py': install python3 (3.10 or newer) or set PYTHON=..."
    if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' >/dev/null 2>&1; then
        version="$("$py" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null || echo unknown)"
        die "$py is Python $version; edge-runtime needs 3.10 or newer:" \
            "install one and set PYTHON=python3.X (or pass --venv to a venv of it)"
    fi
}

check_venv_dir() {
    if [[ -e $VENV && ! -x $VENV/bin/python && -n "$(ls -A "$VENV" 2>/dev/null)" ]]; then
        die "$VENV exists but is not a Python venv (no bin/python): remove it or pass --venv DIR"
    fi
}

# apt_install PKG...: installs those packages that dpkg does not list as installed yet.
apt_install() {
    local pkg missing=()
    for pkg in "$@"; do
        # shellcheck disable=SC2016  # ${Status} is dpkg-query's field, not the shell's
        [[ "$(dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null)" == "install ok installed" ]] \
            || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "the apt packages are installed already: $*"
        return 0
    fi
    command -v apt-get >/dev/null 2>&1 || die "no apt-get to install ${missing[*]}: install them and re-run"
    as_root apt-get update
    as_root apt-get install -y --no-install-recommends "${missing[@]}"
}

# Debian family: the apt packages. Elsewhere only checks for a compiler (pip brings cmake).
linux_build_deps() {
    if is_debian_family; then
        apt_install "${APT_PACKAGES[@]}"
    elif ! command -v c++ >/dev/null 2>&1 && ! command -v g++ >/dev/null 2>&1 \
            && ! command -v clang++ >/dev/null 2>&1; then
        die "no C++ compiler (llama-cpp-python compiles llama.cpp): install gcc-c++ or clang, then re-run"
    fi
}

ensure_venv() {
    if [[ -x $VENV/bin/python ]]; then
        log "reusing the venv $VENV"
    else
        run "$PYTHON" -m venv "$VENV"
    fi
}

# The installed llama-cpp-python's build: "gpu_offload=0|1", then llama.cpp's system info
# ("CUDA : ARCHS = 870 | ... | CPU : NEON = 1 | ... | OPENMP = 1 | ..."). Fails when the venv
# or llama_cpp is missing or does not import. Read-only, so --dry-run runs it too.
llama_info() {
    [[ -x $VENV/bin/python ]] || return 1
    "$VENV/bin/python" - 2>/dev/null <<'PY'
import llama_cpp
info = llama_cpp.llama_print_system_info()
print("gpu_offload=%d" % bool(llama_cpp.llama_supports_gpu_offload()))
print(info.decode("utf-8", "replace") if isinstance(info, bytes) else info)
PY
}

# llama-cpp-python's requirement as pyproject.toml states it, so the versions cannot drift apart.
llama_requirement() {
    local spec
    spec="$(sed -n '/^[[:space:]]*"llama-cpp-python[<>=!~ ]/{s/^[[:space:]]*"\([^"]*\)".*/\1/p;q;}' \
        "$REPO_ROOT/pyproject.toml")"
    printf '%s' "${spec:-llama-cpp-python>=0.3.36,<0.4}"
}

# Build llama-cpp-python with LLAMA_CMAKE_ARGS unless the installed build already fits. pip
# would reuse a cached wheel whatever CMAKE_ARGS says, hence --no-binary and --no-cache-dir
# (which also keeps this special build out of the cache, so a later plain install on this
# machine never picks it up). --no-deps leaves the other packages (and their pins) alone; the
# editable install that follows brings any that are missing.
ensure_llama_build() {
    local info
    if info="$(llama_info)" && llama_build_ok "$info"; then
        log "llama-cpp-python in $VENV already has $LLAMA_BACKEND; not rebuilding it"
        return 0
    fi
    run env CMAKE_ARGS="$LLAMA_CMAKE_ARGS" "$VENV/bin/python" -m pip install --force-reinstall \
        --no-cache-dir --no-binary llama-cpp-python --no-deps "$(llama_requirement)"
}

install_project() {
    local target="."
    [[ -z $EXTRAS ]] || target=".[$EXTRAS]"
    run cd "$REPO_ROOT" || exit 1
    run "$VENV/bin/python" -m pip install -e "$target"
}

verify_llama_build() {
    local info
    info="$(llama_info)" \
        || die "llama_cpp does not import in $VENV (try: $VENV/bin/python -c 'import llama_cpp')"
    llama_build_ok "$info" \
        || die "llama-cpp-python in $VENV was built without $LLAMA_BACKEND; the build output above says why"
}

# Default hooks; a script overrides those that differ.
build_deps() { linux_build_deps; }
llama_build_ok() { return 0; }

install_main() {
    parse_args "$@"
    check_platform
    check_python
    check_venv_dir
    [[ $DRY_RUN -eq 0 ]] || log "dry run: printing the commands (after '+ ') instead of running them"
    build_deps
    ensure_venv
    if [[ -n $LLAMA_CMAKE_ARGS ]]; then ensure_llama_build; fi
    install_project
    if [[ $DRY_RUN -eq 0 ]]; then verify_llama_build; fi
    run "$VENV/bin/edgert" doctor
}
