#!/usr/bin/env bash
# Build tools/fanout-probe (the Go subscribers of bench/bench_fanout_delivery.py) with the
# machine's Go toolchain and the modules its go.mod pins (from the Go module proxy), into a
# cache outside the repository keyed by a digest of its sources: a changed probe is rebuilt,
# an unchanged one is not. Concurrent runs wait for each other on a lock.
# Prints `fanout-probe=PATH` on stdout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module_dir="$here/fanout-probe"
cache_root="${APILANE_CACHE:-$HOME/.cache/apilane}"

say() { echo "install-fanout-probe: $*" >&2; }

if ! command -v go >/dev/null 2>&1; then
    say "the Go toolchain is needed to build the fan-out probe (install golang-go or put go on PATH)"
    exit 1
fi

digest=$(cd "$module_dir" && cat go.mod go.sum ./*.go | sha256sum | cut -c1-16)
dir="$cache_root/fanout-probe-$digest"
binary="$dir/fanout-probe"
if [[ -x "$binary" ]]; then
    echo "fanout-probe=$binary"
    exit 0
fi
mkdir -p "$dir"
exec 9>"$dir/.lock"
if ! flock -n 9; then
    say "another process is building the probe into $dir: waiting for it"
    flock 9
fi
if [[ ! -x "$binary" ]]; then
    # Built beside the cache and moved into place: an interrupted build leaves no binary
    # that the fast path above would trust.
    scratch="$(mktemp -d "$dir/.build.XXXXXX")"
    say "building the probe from $module_dir"
    (
        cd "$module_dir"
        export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=mod"
        go build -trimpath -ldflags="-s -w" -o "$scratch/fanout-probe" .
    ) || { rm -rf "$scratch"; say "go build failed (see above)"; exit 1; }
    mv -f "$scratch/fanout-probe" "$binary"
    rm -rf "$scratch"
fi
exec 9>&-
echo "fanout-probe=$binary"
