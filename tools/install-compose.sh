#!/usr/bin/env bash
# docker compose v2 (the CLI plugin), built with the machine's Go toolchain from the Go module
# proxy at a pinned version, into a cache outside the repository keyed by version. Idempotent:
# when the binary is there it only prints its path. Prints the plugin's path on stdout.
#
# `go install github.com/docker/compose/v2/cmd@VERSION` is refused (compose's go.mod has
# exclude directives), so the module is downloaded and built as the main module.
set -euo pipefail

COMPOSE_VERSION=v2.40.3
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tools/lib/go-build-progress.sh
source "$here/lib/go-build-progress.sh"
cache_dir="${APILANE_CACHE:-$HOME/.cache/apilane}/compose-${COMPOSE_VERSION}"
binary="$cache_dir/docker-compose"

if [[ -x "$binary" ]]; then
    echo "$binary"
    exit 0
fi
if ! command -v go >/dev/null 2>&1; then
    echo "install-compose: the Go toolchain is needed to build docker compose" >&2
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
trap 'chmod -R u+w "$scratch" 2>/dev/null; rm -rf "$scratch"' EXIT
echo "install-compose: building docker compose ${COMPOSE_VERSION} (first time: a few minutes)" >&2
started=$SECONDS
module_dir="$(go mod download -json "github.com/docker/compose/v2@${COMPOSE_VERSION}" |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')"
cp -r "$module_dir" "$scratch/src"
chmod -R u+w "$scratch/src"
(
    cd "$scratch/src"
    export CGO_ENABLED=0 GOFLAGS="${GOFLAGS:-} -buildvcs=false"
    go_build_with_progress docker-compose ./cmd -trimpath \
        -ldflags "-s -w -X github.com/docker/compose/v2/internal.Version=${COMPOSE_VERSION}" \
        -o "$scratch/docker-compose" ./cmd
) >&2
mv -f "$scratch/docker-compose" "$binary"
echo "install-compose: built in $((SECONDS - started)) s" >&2
echo "$binary"
