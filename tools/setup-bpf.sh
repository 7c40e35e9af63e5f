#!/usr/bin/env bash
# Prepare this machine for apilane's eBPF data plane and its tests (run as root; idempotent).
#
#   1. Debian packages: python3-bpfcc (bcc's real bindings over libbcc), kernel headers,
#      bpftool and iproute2 -- installed only when missing.
#   2. /lib/modules/$(uname -r)/build: bcc compiles against it; when the running kernel has no
#      headers package (custom kernels), link the closest installed Debian linux-headers.
#   3. bpffs mounted at /sys/fs/bpf (pinned NAT maps live there).
#   4. bcc importable from the project venv, without putting all of Debian's dist-packages on
#      its path: a directory holding one symlink to the bcc package, named by a .pth file.
#      Never PyPI's `bcc` (an unrelated lattice package).
#
# Usage: tools/setup-bpf.sh [VENV]   (VENV defaults to <repo>/.venv)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$(realpath -m "${1:-${repo_root}/.venv}")"
packages=(python3-bpfcc linux-headers-amd64 bpftool iproute2)

say() { printf 'setup-bpf: %s\n' "$*"; }

if [[ "$(id -u)" -ne 0 ]]; then
    say "must run as root (bcc, bpffs and cgroups need it)" >&2
    exit 1
fi

# 1. packages
missing=()
for pkg in "${packages[@]}"; do
    if ! dpkg-query -W -f='${Status}' "${pkg}" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("${pkg}")
    fi
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
else
    say "packages present: ${packages[*]}"
fi

# 2. kernel headers for the running kernel
release="$(uname -r)"
modules_dir="/lib/modules/${release}"
if [[ -e "${modules_dir}/build/include" ]]; then
    say "kernel headers present: ${modules_dir}/build -> $(readlink -f "${modules_dir}/build")"
else
    # Closest = the installed -amd64 headers whose version sorts nearest below-or-equal to the
    # running kernel's, else the newest installed.
    running_version="${release%%-*}"
    chosen=""
    while read -r dir; do
        version="$(basename "${dir}")"
        version="${version#linux-headers-}"
        version="${version%%-*}"
        if [[ "$(printf '%s\n%s\n' "${version}" "${running_version}" | sort -V | tail -n1)" == \
            "${running_version}" ]]; then
            chosen="${dir}"
        fi
    done < <(find /usr/src -maxdepth 1 -type d -name 'linux-headers-*-amd64' | sort -V)
    if [[ -z "${chosen}" ]]; then
        chosen="$(find /usr/src -maxdepth 1 -type d -name 'linux-headers-*-amd64' | sort -V |
            tail -n1)"
    fi
    if [[ -z "${chosen}" ]]; then
        say "no /usr/src/linux-headers-*-amd64 installed; cannot provide kernel headers" >&2
        exit 1
    fi
    mkdir -p "${modules_dir}"
    ln -sfn "${chosen}" "${modules_dir}/build"
    say "linked ${modules_dir}/build -> ${chosen}"
    if [[ ! -e "${modules_dir}/source" ]]; then
        common="${chosen%-amd64}-common"
        if [[ -d "${common}" ]]; then
            ln -sfn "${common}" "${modules_dir}/source"
            say "linked ${modules_dir}/source -> ${common}"
        fi
    fi
fi

# 3. bpffs
if mountpoint -q /sys/fs/bpf && [[ "$(stat -f -c %T /sys/fs/bpf)" == "bpf_fs" ]]; then
    say "bpffs mounted at /sys/fs/bpf"
else
    mkdir -p /sys/fs/bpf
    mount -t bpf bpf /sys/fs/bpf
    say "mounted bpffs at /sys/fs/bpf"
fi

# 4. bcc for the venv
bcc_package="/usr/lib/python3/dist-packages/bcc"
if [[ ! -d "${bcc_package}" ]]; then
    say "${bcc_package} missing although python3-bpfcc is installed" >&2
    exit 1
fi
if [[ ! -x "${venv}/bin/python" ]]; then
    say "no venv at ${venv}; run 'uv sync' first" >&2
    exit 1
fi
site_packages="$("${venv}/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
shim_dir="${venv}/apilane-system-bcc"
mkdir -p "${shim_dir}"
ln -sfn "${bcc_package}" "${shim_dir}/bcc"
pth="${site_packages}/apilane_system_bcc.pth"
if [[ "$(cat "${pth}" 2>/dev/null)" != "${shim_dir}" ]]; then
    printf '%s\n' "${shim_dir}" >"${pth}"
    say "wrote ${pth} -> ${shim_dir} (bcc only)"
else
    say "venv already sees bcc through ${pth}"
fi
"${venv}/bin/python" -c 'import bcc, sys; print("setup-bpf: venv imports bcc", bcc.__version__, "from", bcc.__file__)'
