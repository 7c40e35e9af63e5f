#!/usr/bin/env bash
# Build kube-apiserver and etcd from the Go module proxy at the versions pinned in
# tools/kube-binaries/go.mod, into a cache outside the repository keyed by version.
# Idempotent: when both binaries are already there it only prints the directory.
# Prints the directory holding `kube-apiserver` and `etcd` (envtest layout) on stdout.
#
# `install-kube-binaries.sh node` also builds what a one-node cluster adds (the run-mode test
# of deploy/): kubelet, kube-controller-manager and kube-scheduler, into the same directory.
set -euo pipefail
want_node=false
[[ "${1:-}" == node ]] && want_node=true

KUBE_VERSION=v1.34.4
ETCD_VERSION=v3.6.4
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
module_dir="$here/kube-binaries"
# shellcheck source=tools/lib/go-build-progress.sh
source "$here/lib/go-build-progress.sh"
cache_dir="${APILANE_CACHE:-$HOME/.cache/apilane}/kube-${KUBE_VERSION}-etcd-${ETCD_VERSION}"

# Bump when the build command changes, so caches built the old way are rebuilt.
RECIPE=2

NODE_BINARIES=(kubelet kube-controller-manager kube-scheduler)

is_ready() {
    [[ -x "$cache_dir/kube-apiserver" && -x "$cache_dir/etcd" ]] &&
        [[ "$(cat "$cache_dir/.recipe" 2>/dev/null)" == "$RECIPE" ]] || return 1
    $want_node || return 0
    for binary in "${NODE_BINARIES[@]}"; do [[ -x "$cache_dir/$binary" ]] || return 1; done
    [[ "$(cat "$cache_dir/.recipe-node" 2>/dev/null)" == "$RECIPE" ]]
}

if is_ready; then
    echo "$cache_dir"
    exit 0
fi

if ! command -v go >/dev/null 2>&1; then
    echo "install-kube-binaries: the Go toolchain is needed to build kube-apiserver and etcd" >&2
    echo "  (install Debian's golang-go or put go on PATH)" >&2
    exit 1
fi

# The pins must agree with go.mod, or the cache key would lie about what it holds.
grep -q "k8s.io/kubernetes ${KUBE_VERSION}\$" "$module_dir/go.mod" || {
    echo "install-kube-binaries: $module_dir/go.mod does not pin k8s.io/kubernetes ${KUBE_VERSION}" >&2
    exit 1
}
grep -q "go.etcd.io/etcd/server/v3 ${ETCD_VERSION}\$" "$module_dir/go.mod" || {
    echo "install-kube-binaries: $module_dir/go.mod does not pin go.etcd.io/etcd/server/v3 ${ETCD_VERSION}" >&2
    exit 1
}

mkdir -p "$cache_dir"
# Build into a scratch directory next to the cache and move into place, so an interrupted
# build never leaves a half-written binary that the fast path above would trust.
scratch="$(mktemp -d "$cache_dir/.build.XXXXXX")"
trap 'rm -rf "$scratch"' EXIT

export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"
# Without these the Kubernetes binaries report v0.0.0-master (on /version, as kubeletVersion).
version_flags="-X k8s.io/component-base/version.gitVersion=${KUBE_VERSION}"
version_flags+=" -X k8s.io/component-base/version.gitMajor=$(echo "${KUBE_VERSION#v}" | cut -d. -f1)"
version_flags+=" -X k8s.io/component-base/version.gitMinor=$(echo "${KUBE_VERSION#v}" | cut -d. -f2)"
version_flags+=" -X k8s.io/component-base/version.gitTreeState=clean"

if ! [[ -x "$cache_dir/kube-apiserver" && -x "$cache_dir/etcd" &&
    "$(cat "$cache_dir/.recipe" 2>/dev/null)" == "$RECIPE" ]]; then
    echo "install-kube-binaries: building kube-apiserver ${KUBE_VERSION} and etcd ${ETCD_VERSION} (first time: several minutes)" >&2
    started=$SECONDS
    (
        cd "$module_dir"
        go_build_with_progress kube-apiserver k8s.io/kubernetes/cmd/kube-apiserver \
            -trimpath -ldflags="-s -w ${version_flags}" -o "$scratch/kube-apiserver" k8s.io/kubernetes/cmd/kube-apiserver
        go_build_with_progress etcd go.etcd.io/etcd/server/v3 \
            -trimpath -ldflags='-s -w' -o "$scratch/etcd" go.etcd.io/etcd/server/v3
    ) >&2
    mv -f "$scratch/kube-apiserver" "$cache_dir/kube-apiserver"
    mv -f "$scratch/etcd" "$cache_dir/etcd"
    echo "$RECIPE" >"$cache_dir/.recipe"
    echo "install-kube-binaries: built in $((SECONDS - started)) s" >&2
fi

if $want_node; then
    for binary in "${NODE_BINARIES[@]}"; do
        started=$SECONDS
        echo "install-kube-binaries: building $binary ${KUBE_VERSION}" >&2
        (cd "$module_dir" && go_build_with_progress "$binary" "k8s.io/kubernetes/cmd/$binary" \
            -trimpath -ldflags="-s -w ${version_flags}" -o "$scratch/$binary" "k8s.io/kubernetes/cmd/$binary") >&2
        mv -f "$scratch/$binary" "$cache_dir/$binary"
        echo "install-kube-binaries: $binary built in $((SECONDS - started)) s" >&2
    done
    echo "$RECIPE" >"$cache_dir/.recipe-node"
fi

is_ready
echo "$cache_dir"
