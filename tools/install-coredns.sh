#!/usr/bin/env bash
# CoreDNS (cluster DNS of the one-node test cluster), built with the machine's Go toolchain
# from the Go module proxy at the version pinned in tools/coredns/go.mod, with only the
# plugins that module's main.go compiles in (no cloud back ends: minutes, not a quarter of an
# hour, on a cold cache), into a cache outside the repository keyed by version.
# Idempotent: when the binary is there it only prints its path (on stdout).
set -euo pipefail

COREDNS_VERSION=v1.12.4
# Bump when the build (plugins, flags) changes, so a binary built the old way is rebuilt.
RECIPE=slim-1
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module_dir="$here/coredns"
# shellcheck source=tools/lib/go-build-progress.sh
source "$here/lib/go-build-progress.sh"
cache_dir="${APILANE_CACHE:-$HOME/.cache/apilane}/coredns-${COREDNS_VERSION}"
binary="$cache_dir/coredns"

is_ready() {
    [[ -x "$binary" && "$(cat "$cache_dir/.recipe" 2>/dev/null)" == "$RECIPE" ]]
}

if is_ready; then
    echo "$binary"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "install-coredns: the Go toolchain is needed to build CoreDNS" >&2
    exit 1
fi
grep -q "github.com/coredns/coredns ${COREDNS_VERSION}\$" "$module_dir/go.mod" || {
    echo "install-coredns: $module_dir/go.mod does not pin github.com/coredns/coredns ${COREDNS_VERSION}" >&2
    exit 1
}
mkdir -p "$cache_dir"
# One build at a time: a second caller waits for the first, then finds the binary.
exec 9>"$cache_dir/.lock"
flock 9
if is_ready; then
    echo "$binary"
    exit 0
fi
scratch="$(mktemp -d "$cache_dir/.build.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT
echo "install-coredns: building CoreDNS ${COREDNS_VERSION} (kubernetes and a few core plugins)" >&2
started=$SECONDS
(
    cd "$module_dir"
    export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false -mod=readonly"
    go_build_with_progress coredns . -trimpath \
        -ldflags="-s -w -X github.com/coredns/coredns/coremain.GitCommit=${COREDNS_VERSION}" \
        -o "$scratch/coredns" .
) >&2
# A binary whose Corefile parser would refuse the test cluster's Corefile is no use.
"$scratch/coredns" -plugins | grep -qxE '[[:space:]]*(dns\.)?kubernetes' || {
    echo "install-coredns: the built CoreDNS lacks the kubernetes plugin" >&2
    exit 1
}
mv -f "$scratch/coredns" "$binary"
echo "$RECIPE" >"$cache_dir/.recipe"
echo "install-coredns: built in $((SECONDS - started)) s" >&2
echo "$binary"
