#!/usr/bin/env bash
# Build `helm` and `promtool` from the Go module proxy at the versions pinned in
# tools/helm-binaries/go.mod and tools/promtool-binaries/go.mod, into caches outside the
# repository keyed by version (the way tools/install-kube-binaries.sh builds kube-apiserver).
# Idempotent: when a binary is already there it is not rebuilt. A build that takes a while
# prints its progress (packages compiled so far) on stderr.
# Prints `helm=PATH` and `promtool=PATH` on stdout.
#   bash tools/install-chart-tools.sh            # both
#   bash tools/install-chart-tools.sh helm       # one of them
set -euo pipefail

HELM_VERSION=v3.22.0
# Prometheus tags its Go module v0.3MM.P for release 3.MM.P.
PROMETHEUS_MODULE_VERSION=v0.316.0
PROMETHEUS_VERSION=3.16.0
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache_root="${APILANE_CACHE:-$HOME/.cache/apilane}"

# Bump when the way a binary is built changes, so cached builds are redone.
RECIPE=2

say() { echo "install-chart-tools: $*" >&2; }
# shellcheck source=tools/lib/go-build-progress.sh
source "$here/lib/go-build-progress.sh"

is_ready() { # dir binary
    [[ -x "$1/$2" && "$(cat "$1/.recipe" 2>/dev/null)" == "$RECIPE" ]]
}

require_pin() { # module_dir module version
    grep -q "^require $2 $3\$" "$1/go.mod" || {
        say "$1/go.mod does not pin $2 $3 (the cache key would lie about what it holds)"
        exit 1
    }
}

# Builds one binary into dir unless it is there already. Concurrent runs (two worktrees'
# `make setup`) wait for each other on a lock instead of building twice.
install_one() { # name dir module_dir package ldflags [build tags]
    local name=$1 dir=$2 module_dir=$3 package=$4 ldflags=$5 tags=${6:-}
    if is_ready "$dir" "$name"; then
        echo "$name=$dir/$name"
        return 0
    fi
    mkdir -p "$dir"
    exec 9>"$dir/.lock"
    if ! flock -n 9; then
        say "another process is building $name into $dir: waiting for it"
        flock 9
    fi
    if ! is_ready "$dir" "$name"; then
        # Build next to the cache and move into place, so an interrupted build never leaves
        # a half-written binary that the fast path would trust.
        local scratch
        scratch="$(mktemp -d "$dir/.build.XXXXXX")"
        say "building $name from $module_dir (first time: a few minutes)"
        (
            cd "$module_dir"
            export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"
            say "fetching the modules of $name (go mod download)"
            go mod download
            go_build_with_progress "$name" "$package" \
                -trimpath -tags="$tags" -ldflags="-s -w $ldflags" -o "$scratch/$name" "$package"
        ) || { rm -rf "$scratch"; exit 1; }
        mv -f "$scratch/$name" "$dir/$name"
        rm -rf "$scratch"
        echo "$RECIPE" >"$dir/.recipe"
    fi
    exec 9>&-
    is_ready "$dir" "$name"
    echo "$name=$dir/$name"
}

install_helm() {
    local module_dir="$here/helm-binaries" k8s major minor
    require_pin "$module_dir" helm.sh/helm/v3 "$HELM_VERSION"
    # Helm's own Makefile derives the Kubernetes version it assumes (.Capabilities, lint's
    # deprecation checks) from client-go: v0.M.x is Kubernetes 1.M.
    k8s=$(cd "$module_dir" && go list -m -f '{{.Version}}' k8s.io/client-go)
    major=$(($(echo "${k8s#v}" | cut -d. -f1) + 1))
    minor=$(echo "$k8s" | cut -d. -f2)
    local flags="-X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
    flags+=" -X helm.sh/helm/v3/internal/version.gitTreeState=clean"
    for pkg in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
        flags+=" -X $pkg.k8sVersionMajor=$major -X $pkg.k8sVersionMinor=$minor"
    done
    install_one helm "$cache_root/helm-$HELM_VERSION" "$module_dir" \
        helm.sh/helm/v3/cmd/helm "$flags"
}

install_promtool() {
    local module_dir="$here/promtool-binaries"
    require_pin "$module_dir" github.com/prometheus/prometheus "$PROMETHEUS_MODULE_VERSION"
    local flags="-X github.com/prometheus/common/version.Version=$PROMETHEUS_VERSION"
    flags+=" -X github.com/prometheus/common/version.Branch=release"
    # remove_all_sd leaves out the cloud service discoveries (AWS, Azure, GCE, Kubernetes, ...):
    # `check rules` and `test rules` never use them, and they are most of promtool's build time.
    install_one promtool "$cache_root/promtool-v$PROMETHEUS_VERSION" "$module_dir" \
        github.com/prometheus/prometheus/cmd/promtool "$flags" remove_all_sd
}

if ! command -v go >/dev/null 2>&1; then
    say "the Go toolchain is needed to build helm and promtool"
    say "  (install Debian's golang-go or put go on PATH)"
    exit 1
fi

wanted=("$@")
[[ ${#wanted[@]} -gt 0 ]] || wanted=(helm promtool)
for tool in "${wanted[@]}"; do
    case "$tool" in
        helm) install_helm ;;
        promtool) install_promtool ;;
        *) say "unknown tool $tool (helm or promtool)"; exit 2 ;;
    esac
done
