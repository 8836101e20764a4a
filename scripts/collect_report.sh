#!/usr/bin/env bash
# Gather the reports `edgert device-test` wrote on several devices into one folder, one device a
# subfolder, then write one report over all of them with `edgert report --fleet`.
#
# Usage: scripts/collect_report.sh [--out DIR] [--no-report] SOURCE...
#   SOURCE        a device's device-test folder (the one holding bench.json) or that bench.json,
#                 as a local path or user@host:path (copied with rsync, else scp); NAME=SOURCE
#                 names the device's subfolder (default: the host, else the folder's own name)
#   --out DIR     the folder to gather into (default: edgert-fleet); a device already there is
#                 replaced by its new copy
#   --no-report   only gather; by default `edgert report --fleet DIR --out DIR/report` follows
#   --help        this text
#
# Example, a Pi and a Jetson that each ran `edgert device-test` in their home folder:
#   scripts/collect_report.sh pi@pi5.local:edgert-device-test nvidia@orin.local:edgert-device-test
#
# Environment: EDGERT, the edgert to run (default: .venv/bin/edgert in the repository root, else
# edgert on PATH).
set -euo pipefail

log() { printf 'collect_report: %s\n' "$*" >&2; }
die() { printf 'collect_report: error: %s\n' "$*" >&2; exit 1; }
usage() { awk 'NR == 1 { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$0"; }
usage_error() { printf 'collect_report: error: %s (see --help)\n' "$*" >&2; exit 2; }

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="edgert-fleet"
report=1
sources=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        --out) [[ $# -ge 2 && -n $2 ]] || usage_error "--out needs a folder"; out="$2"; shift 2 ;;
        --out=?*) out="${1#--out=}"; shift ;;
        --no-report) report=0; shift ;;
        -h|--help) usage; exit 0 ;;
        -*) usage_error "unknown option '$1'" ;;
        *) sources+=("$1"); shift ;;
    esac
done
[[ ${#sources[@]} -gt 0 ]] || usage_error "name at least one SOURCE"

# A remote source is host:path with no '/' before the ':' (a local path may hold a colon too).
is_remote() { [[ $1 =~ ^[^/]+:.+ && ! -e $1 ]]; }

# The default subfolder name: the host of a remote source, else the folder's name (its parent's
# when the folder has device-test's default name, or the source is a bench.json).
default_name() {
    local src="$1" path
    if is_remote "$src"; then
        path="${src%%:*}"
        printf '%s' "${path#*@}"
        return
    fi
    path="${src%/}"
    [[ $path != *.json ]] || path="$(dirname "$path")"
    if [[ $(basename "$path") == edgert-device-test ]]; then path="$(dirname "$path")"; fi
    if [[ $path == . || $path == / ]]; then path="$PWD"; fi
    basename "$path"
}

# copy SOURCE STAGING: the source's files into the new folder STAGING (bench.json for a file).
copy() {
    local src="$1" stage="$2"
    mkdir -p "$stage"
    if is_remote "$src"; then
        if command -v rsync >/dev/null 2>&1; then
            if [[ $src == *.json ]]; then rsync -a "$src" "$stage/bench.json"; else rsync -a "${src%/}/" "$stage/"; fi
        else
            command -v scp >/dev/null 2>&1 || die "neither rsync nor scp is installed to copy $src"
            if [[ $src == *.json ]]; then scp -q "$src" "$stage/bench.json"; else
                rmdir "$stage" && scp -rq "${src%/}" "$stage"
            fi
        fi
    elif [[ -f $src ]]; then
        cp "$src" "$stage/bench.json"
    elif [[ -d $src ]]; then
        cp -R "${src%/}/." "$stage/"
    else
        die "$src does not exist"
    fi
}

mkdir -p "$out"
taken=" "  # the names given out so far (bash 3 on macOS has no associative arrays)
gathered=0
for source in "${sources[@]}"; do
    name="" src="$source"
    if [[ $source =~ ^([A-Za-z0-9._-]+)=(.+)$ ]]; then name="${BASH_REMATCH[1]}"; src="${BASH_REMATCH[2]}"; fi
    [[ -n $name ]] || name="$(default_name "$src")"
    [[ $name =~ ^[A-Za-z0-9._-]+$ && $name != . && $name != .. ]] \
        || die "cannot make a folder name of '$name' (from $src): write NAME=$src"
    base="$name" n=1
    while [[ $taken == *" $name "* ]]; do n=$((n + 1)); name="$base-$n"; done
    taken+="$name "
    stage="$out/.$name.tmp.$$"
    rm -rf "$stage"
    copy "$src" "$stage" || { rm -rf "$stage"; die "could not copy $src"; }
    [[ -f $stage/bench.json ]] || log "warning: $src has no bench.json (did its device-test finish?)"
    rm -rf "${out:?}/$name"
    mv "$stage" "$out/$name"
    log "gathered $src into $out/$name"
    gathered=$((gathered + 1))
done
log "gathered $gathered device(s) into $out"

[[ $report -eq 1 ]] || exit 0
edgert="${EDGERT:-}"
if [[ -z $edgert ]]; then
    if [[ -x $repo_root/.venv/bin/edgert ]]; then edgert="$repo_root/.venv/bin/edgert"; else edgert=edgert; fi
fi
command -v "$edgert" >/dev/null 2>&1 || die "no edgert to write the report: run \`edgert report --fleet $out\` where it is"
"$edgert" report --fleet "$out" --out "$out/report"
