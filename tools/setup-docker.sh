#!/usr/bin/env bash
# The container side of apilane's run modes (run as root; idempotent, quick when done):
#   Debian's docker.io, containerd and runc (the daemon the compose test starts on a socket of
#   its own; none is started here), debootstrap (the local base image) and the CNI plugins.
#   Packages are installed only when missing.
set -euo pipefail

packages=(docker.io containerd runc debootstrap containernetworking-plugins iptables)

say() { printf 'setup-docker: %s\n' "$*"; }

if [[ "$(id -u)" -ne 0 ]]; then
    say "must run as root (a docker daemon needs it)" >&2
    exit 1
fi

missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done
if ((${#missing[@]} == 0)); then
    say "packages present: ${packages[*]}"
    exit 0
fi
say "installing ${missing[*]}"
apt-get update -qq
# Debian's docker.io enables and starts docker.service and containerd.service where systemd
# runs; policy-rc.d keeps the install from starting a daemon nobody asked for.
policy=/usr/sbin/policy-rc.d
own_policy=false
if [[ ! -e "${policy}" ]]; then
    printf '#!/bin/sh\nexit 101\n' >"${policy}" && chmod +x "${policy}" && own_policy=true
fi
trap '${own_policy} && rm -f "${policy}"' EXIT
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
