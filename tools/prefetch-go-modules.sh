#!/usr/bin/env bash
# Downloads the Go modules of every tool apilane builds (kube binaries and etcd, helm,
# promtool, CoreDNS, docker compose, the fan-out probe) into the module cache, all at once.
# setup.sh runs it in the background on a cold machine, so the downloads overlap the apt and
# uv steps and the first builds instead of coming one build at a time. Safe beside the
# builds: the module cache takes concurrent use. Output goes to the log given as the first argument.
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
log=${1:-/dev/null}
compose_version=$(awk -F= '/^COMPOSE_VERSION=/ { print $2 }' "$here/install-compose.sh")
{
    for module in kube-binaries helm-binaries promtool-binaries coredns fanout-probe; do
        (cd "$here/$module" && go mod download) &
    done
    compose_dir="$(go mod download -json "github.com/docker/compose/v2@${compose_version}" |
        python3 -c 'import json, sys; print(json.load(sys.stdin)["Dir"])')" &&
        (cd "$compose_dir" && GOFLAGS=-mod=mod go mod download)
    wait
} >"$log" 2>&1
