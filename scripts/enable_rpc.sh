#!/usr/bin/env bash
# Make llama.cpp's RPC backend (a model split across devices: `edgert worker`, `--workers`)
# available to PYTHON's edge-runtime. llama-cpp-python's wheel leaves RPC out; this compiles only
# its two source files, from the very llama.cpp sources that version of llama-cpp-python vendors
# (fetched by scripts/build_llama_tools.sh --sources), into a loadable ggml backend,
# libggml-rpc.so, and installs it beside the venv with a stamp of what it was built against:
#   <sys.prefix>/share/edge-runtime/ggml-rpc/libggml-rpc.so
#   <sys.prefix>/share/edge-runtime/ggml-rpc/libggml-rpc.json
# The wheel is not touched, and nothing loads the library except what uses RPC, so the default
# install pays nothing for it. Re-running is a no-op while the stamp matches; an upgraded
# llama-cpp-python makes it stale (`edgert doctor` says so) and a re-run rebuilds it.
#
# Usage: scripts/enable_rpc.sh [--force] [PYTHON]
#   PYTHON    the interpreter whose edge-runtime gets RPC (default: .venv/bin/python in the
#             repository root, else python3); edge-runtime must be installed there already
#   --force   rebuild even when the installed library is up to date
#   --help    this text
#
# Needs a C++17 compiler (CXX, default c++) and tar; Linux only. The compile takes about half a
# minute on two cores; the first run also downloads the llama-cpp-python sdist (about 75 MB).
set -euo pipefail

log() { printf 'enable_rpc: %s\n' "$*" >&2; }
die() { printf 'enable_rpc: error: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
force=0
PYTHON=""
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        -h|--help) usage; exit 0 ;;
        -*) printf 'enable_rpc: error: unknown option %s (see --help)\n' "$arg" >&2; exit 2 ;;
        *) [[ -z $PYTHON ]] || die "give one PYTHON, not several"; PYTHON="$arg" ;;
    esac
done
if [[ -z $PYTHON ]]; then
    if [[ -x $repo_root/.venv/bin/python ]]; then PYTHON="$repo_root/.venv/bin/python"; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON'"
# build_llama_tools.sh runs from the repository root: a relative path must survive that.
if [[ $PYTHON == */* ]]; then PYTHON="$(cd "$(dirname "$PYTHON")" && pwd)/$(basename "$PYTHON")"; fi
[[ "$(uname -s)" == Linux ]] || die "RPC builds on Linux only for now (this is $(uname -s))"
CXX="${CXX:-c++}"
command -v "$CXX" >/dev/null 2>&1 || die "no C++ compiler '$CXX': install g++ (or set CXX) and re-run"

# What the library must match, as edge-runtime itself sees it (backends/llamacpp/rpc.py): its
# state, the llama-cpp-python version, the libggml-base to link to and that file's sha256, where
# the library goes, and why it is in that state.
facts="$("$PYTHON" -m edge_runtime.backends.llamacpp.rpc facts)" \
    || die "$PYTHON cannot run edge-runtime's RPC module: install edge-runtime there first (pip install -e .)"
{ read -r state; read -r version; read -r base_lib; read -r base_sha; read -r target; read -r reason; } <<<"$facts"

case "$state" in
    built-in)
        log "llama-cpp-python $version already has the RPC backend built in; nothing to do"
        exit 0 ;;
    installed)
        if [[ $force -eq 0 ]]; then
            log "$target is up to date for llama-cpp-python $version; nothing to do (--force rebuilds)"
            exit 0
        fi ;;
    unsupported) die "$reason" ;;
esac
[[ $base_lib != None ]] || die "$reason (for $PYTHON)"
[[ $state != stale ]] || log "rebuilding: the installed library is stale ($reason)"

src="$(PYTHON="$PYTHON" "$repo_root/scripts/build_llama_tools.sh" --sources | tail -n 1)"
ggml="$src/vendor/llama.cpp/ggml"
[[ -f $ggml/src/ggml-rpc/ggml-rpc.cpp ]] || die "no ggml-rpc sources in $ggml"

# The defines ggml's own CMake build uses for the ggml-rpc module with GGML_BACKEND_DL (so it
# exports ggml_backend_init for ggml_backend_load). Linked to libggml-base by soname, with no
# RUNPATH: at load time it must bind to the libggml-base.so.0 llama_cpp has mapped already, never
# to a second copy with a registry of its own.
dest="$(dirname "$target")"
mkdir -p "$dest"
out="$dest/.libggml-rpc.so.tmp.$$"
build_log="$dest/build.log"
trap 'rm -f "$out"' EXIT
log "compiling libggml-rpc.so for llama-cpp-python $version with $CXX (about half a minute)"
started=$SECONDS
nice -n 10 "$CXX" -std=gnu++17 -O3 -DNDEBUG -fPIC -shared -pthread \
    -D_GNU_SOURCE -D_XOPEN_SOURCE=600 -DGGML_SCHED_MAX_COPIES=4 \
    -DGGML_SHARED -DGGML_BACKEND_SHARED -DGGML_BACKEND_BUILD -DGGML_BACKEND_DL \
    -I"$ggml/include" -I"$ggml/src" \
    "$ggml/src/ggml-rpc/ggml-rpc.cpp" "$ggml/src/ggml-rpc/transport.cpp" \
    "$base_lib" -Wl,--no-undefined -Wl,-soname,libggml-rpc.so -o "$out" >"$build_log" 2>&1 \
    || { tail -n 30 "$build_log" >&2; die "the compile failed (log: $build_log)"; }
log "compiled in $((SECONDS - started)) s"

# Loaded into llama.cpp's registry by edge-runtime's own loader, in a child, before it replaces
# anything: a library that does not load never gets installed.
"$PYTHON" -m edge_runtime.backends.llamacpp.rpc check --library "$out" >>"$build_log" 2>&1 \
    || { tail -n 5 "$build_log" >&2; die "the library built but does not load into llama-cpp-python $version"; }
mv -f "$out" "$target"
rm -f "$build_log"
stamp="${target%.so}.json"
printf '{"llama_cpp_python": "%s", "libggml_base_sha256": "%s"}\n' "$version" "$base_sha" >"$stamp.tmp.$$"
mv -f "$stamp.tmp.$$" "$stamp"
log "installed $target; \`edgert doctor\` shows RPC, \`edgert worker\` serves this machine"
