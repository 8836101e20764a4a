#!/usr/bin/env bash
# Build llama.cpp's own tools (`llama-bench`, `llama-perplexity`) from the very sources the
# installed llama-cpp-python was built from (the llama.cpp copy vendored in that version's sdist),
# so the benchmarks compare our figures with native llama.cpp on the same kernels. Each tool lands
# in ./bin/<tool>, with the version it came from in ./bin/<tool>.version.
#
# Usage: scripts/build_llama_tools.sh [--force] [llama-bench] [llama-perplexity]   (default: both)
#        scripts/build_llama_tools.sh --sources   only fetch the sources; print their folder
#                                                 (scripts/enable_rpc.sh builds from them too)
#
# Environment:
#   PYTHON=...               the interpreter whose llama-cpp-python version is matched
#                            (default: .venv/bin/python, else python3)
#   EXTRA_CMAKE_ARGS="..."   appended to the cmake configure line (e.g. -DGGML_OPENMP=OFF)
#
# The build mirrors llama-cpp-python's default CPU build: Release, GGML_NATIVE (the compiler's
# -march=native), OpenMP, no GPU backend. It links llama.cpp statically so each binary can be
# copied and run on its own (and bin/llama-bench-shared, the same tool linked to the venv's own
# llama.cpp libraries). The sources and the build tree stay in build/llama.cpp/<version>/
# (about 300 MB, so a rebuild is incremental). An up-to-date binary is left alone.
set -euo pipefail

log() { printf 'build_llama_tools: %s\n' "$*" >&2; }
die() { printf 'build_llama_tools: error: %s\n' "$*" >&2; exit 1; }

force=0
sources_only=0
tools=()
for arg in "$@"; do
    case "$arg" in
        --force) force=1 ;;
        --sources) sources_only=1 ;;
        llama-bench|llama-perplexity) tools+=("$arg") ;;
        -h|--help) sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$arg' (tools: llama-bench, llama-perplexity; options: --force, --sources)" ;;
    esac
done
[[ ${#tools[@]} -gt 0 ]] || tools=(llama-bench llama-perplexity)

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
command -v "$PYTHON" >/dev/null 2>&1 || die "no Python interpreter '$PYTHON' (set PYTHON=...)"
command -v tar >/dev/null 2>&1 || die "'tar' is not installed; install it and re-run"
if [[ $sources_only -eq 0 ]]; then
    command -v cmake >/dev/null 2>&1 || die "'cmake' is not installed; install it and re-run"
    command -v c++ >/dev/null 2>&1 || command -v g++ >/dev/null 2>&1 || command -v clang++ >/dev/null 2>&1 \
        || die "no C++ compiler found (install g++ or clang)"
fi

version="$("$PYTHON" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null)" \
    || die "llama-cpp-python is not installed for $PYTHON (set PYTHON=... to the right venv)"
stamp_text="llama-cpp-python==$version"

bin_dir="$repo_root/bin"
todo=()
[[ $sources_only -eq 0 ]] || tools=()
current() {  # whether bin/$1 exists and its stamp names the installed version
    [[ -x "$bin_dir/$1" && -f "$bin_dir/$1.version" && "$(cat "$bin_dir/$1.version")" == "$stamp_text" ]]
}
for tool in "${tools[@]}"; do
    # llama-bench comes with llama-bench-shared (linked at the end): either one stale rebuilds both.
    if [[ $force -eq 0 ]] && current "$tool" && { [[ $tool != llama-bench ]] || current llama-bench-shared; }; then
        log "bin/$tool is already built for $stamp_text; nothing to do (--force rebuilds)"
    else
        todo+=("$tool")
    fi
done
[[ ${#todo[@]} -gt 0 || $sources_only -eq 1 ]] || exit 0

work="$repo_root/build/llama.cpp/$version"
src="$work/src"
build="$work/build"
mkdir -p "$work"

if [[ ! -f "$src/vendor/llama.cpp/CMakeLists.txt" ]]; then
    log "downloading the llama-cpp-python $version sdist"
    dl="$work/download"
    rm -rf "$dl"
    mkdir -p "$dl"
    "$PYTHON" -m pip download --quiet --no-binary :all: --no-deps \
        --dest "$dl" "llama-cpp-python==$version" \
        || die "pip could not download the llama-cpp-python==$version sdist (network or index?)"
    archive="$(find "$dl" -maxdepth 1 -name '*.tar.gz' | head -n 1)"
    [[ -n "$archive" ]] || die "pip downloaded no .tar.gz sdist into $dl"
    log "unpacking $(basename "$archive")"
    unpacked="$work/unpack.tmp"
    rm -rf "$unpacked"
    mkdir -p "$unpacked"
    tar -xzf "$archive" -C "$unpacked"
    top="$(find "$unpacked" -mindepth 1 -maxdepth 1 -type d | head -n 1)"
    [[ -f "$top/vendor/llama.cpp/CMakeLists.txt" ]] \
        || die "the sdist holds no vendor/llama.cpp sources; cannot build llama.cpp tools from it"
    rm -rf "$src"
    mv "$top" "$src"
    rm -rf "$unpacked" "$dl"
fi
if [[ $sources_only -eq 1 ]]; then
    printf '%s\n' "$src"
    exit 0
fi

jobs="$(nproc 2>/dev/null || echo 2)"
generator=()
command -v ninja >/dev/null 2>&1 && generator=(-G Ninja)

log "configuring llama.cpp (Release, native CPU, OpenMP, static, no GPU) in ${build#"$repo_root"/}"
# shellcheck disable=SC2086  # EXTRA_CMAKE_ARGS is a list of words on purpose
cmake -S "$src/vendor/llama.cpp" -B "$build" "${generator[@]}" \
    -DCMAKE_BUILD_TYPE=Release \
    -DBUILD_SHARED_LIBS=OFF \
    -DGGML_NATIVE=ON \
    -DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_VULKAN=OFF -DGGML_HIP=OFF -DGGML_SYCL=OFF \
    -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF \
    -DLLAMA_BUILD_COMMON=ON -DLLAMA_BUILD_TOOLS=ON \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF \
    ${EXTRA_CMAKE_ARGS:-} >"$work/configure.log" 2>&1 \
    || { tail -n 30 "$work/configure.log" >&2; die "cmake configure failed (full log: $work/configure.log)"; }

for tool in "${todo[@]}"; do
    log "building target $tool with $jobs jobs (several minutes on a small machine)"
    cmake --build "$build" --config Release --target "$tool" -j "$jobs" >"$work/build-$tool.log" 2>&1 \
        || { tail -n 40 "$work/build-$tool.log" >&2; die "build failed (full log: $work/build-$tool.log)"; }
    built="$(find "$build" -type f -name "$tool" -perm -u+x | head -n 1)"
    [[ -n "$built" ]] || die "the build finished but no $tool binary was found under $build"
    "$built" --help >/dev/null 2>&1 || die "the built $built does not run (try: $built --help)"

    # Temporary names in the same folder, then rename: a reader never sees half a binary or a
    # stamp that names a version the binary is not.
    target="$bin_dir/$tool"
    stamp="$bin_dir/$tool.version"
    mkdir -p "$bin_dir"
    rm -f "$stamp"
    cp "$built" "$target.tmp.$$"
    chmod 0755 "$target.tmp.$$"
    printf '%s\n' "$stamp_text" >"$stamp.tmp.$$"
    mv -f "$target.tmp.$$" "$target"
    mv -f "$stamp.tmp.$$" "$stamp"
    log "built bin/$tool from $stamp_text"
done

# llama-bench once more, linked to the llama.cpp libraries llama-cpp-python installed (the very
# kernels edgert runs, built as shared libraries) rather than to its own static ones: the
# benchmark then tells the cost of that build apart from edgert's own per-token cost. Optional:
# a link that fails costs this binary only.
if [[ " ${todo[*]} " == *" llama-bench "* ]]; then
    rm -f "$bin_dir/llama-bench-shared" "$bin_dir/llama-bench-shared.version"  # never one for other libraries
    libs="$("$PYTHON" -c 'import llama_cpp, os; print(os.path.join(os.path.dirname(llama_cpp.__file__), "lib"))')" \
        || libs=""
    objects=("$build/tools/llama-bench/CMakeFiles/llama-bench.dir/main.cpp.o" "$build/tools/llama-bench/libllama-bench-impl.a"
             "$build/common/libllama-common.a" "$build/common/libllama-common-base.a"
             "$build/vendor/cpp-httplib/libcpp-httplib.a")
    linker="$(command -v c++ || command -v g++ || command -v clang++)"
    if [[ -n "$libs" ]] && "$linker" -o "$bin_dir/llama-bench-shared.tmp.$$" "${objects[@]}" -L"$libs" -lllama -lggml -lggml-base \
            -lggml-cpu -fopenmp -lpthread -Wl,-rpath,"$libs" >"$work/link-shared.log" 2>&1 \
            && "$bin_dir/llama-bench-shared.tmp.$$" --help >/dev/null 2>&1; then
        printf '%s\n' "$stamp_text" >"$bin_dir/llama-bench-shared.version"
        mv -f "$bin_dir/llama-bench-shared.tmp.$$" "$bin_dir/llama-bench-shared"
        log "linked bin/llama-bench-shared to $libs"
    else
        rm -f "$bin_dir/llama-bench-shared.tmp.$$"
        log "warning: could not link llama-bench to $libs (see $work/link-shared.log); bin/llama-bench is unaffected"
    fi
fi
