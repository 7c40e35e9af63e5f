#!/usr/bin/env bash
# CoreDNS (cluster DNS of the one-node test cluster), built with the machine's Go toolchain
# from the Go module proxy at a pinned version, into a cache outside the repository keyed by
# version. Idempotent: when the binary is there it only prints its path (on stdout).
set -euo pipefail

COREDNS_VERSION=v1.12.4
cache_dir="${APILANE_CACHE:-$HOME/.cache/apilane}/coredns-${COREDNS_VERSION}"
binary="$cache_dir/coredns"

if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "install-coredns: the Go toolchain is needed to build CoreDNS" >&2
    exit 1
fi
mkdir -p "$cache_dir"
# One build at a time: a second caller waits for the first, then finds the binary.
exec 9>"$cache_dir/.lock"
flock 9
if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi
scratch="$(mktemp -d "$cache_dir/.build.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
echo "install-coredns: building CoreDNS ${COREDNS_VERSION} (first time: a few minutes)" >&2
started=$SECONDS
GOBIN="$scratch" CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false" \
    go install -trimpath -ldflags="-s -w" "github.com/coredns/coredns@${COREDNS_VERSION}" >&2
mv -f "$scratch/coredns" "$binary"
echo "install-coredns: built in $((SECONDS - started)) s" >&2
echo "$binary"
