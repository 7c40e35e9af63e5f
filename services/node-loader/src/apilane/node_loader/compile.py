"""`python -m apilane.node_loader.compile`: the short-lived child that compiles and loads.

It imports bcc (clang/LLVM: ~100 MB resident), compiles bpf/connect_lb.c, which pins the
maps (BPF_TABLE_PINNED, reusing existing pins with their contents), loads the cgroup
programs, removes superseded pins, then hands the programs to the loader and exits:

- stdout: one JSON object, {"pins": {map: path}, "layouts": {map: {"key": [[field, offset,
  size], ...], "leaf": [...]}}, "layout_versions": {map: "v1"}, "programs": {hook: program
  id}, "removed_pins": [...]};
- `--fd-socket N` (a Unix socket the parent passes): one message with the JSON list of hook
  names and the program descriptors, in that order (SCM_RIGHTS). The parent's copies keep the
  programs loaded after this process is gone; it attaches them (pinned links) itself.

Errors go to stderr with exit status 1; the parent turns them into a typed error. The same
cgroup safety check as the loader's runs first (never the root cgroup unless
`--allow-root-cgroup`, which only production configuration passes).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from apilane.node_loader import libbpf
from apilane.node_loader.bpfmaps import CONNECTION_TABLE_NAME, TABLE_NAMES
from apilane.node_loader.libbpf import ProgramError
from apilane.node_loader.pinnedmaps import describe_layout
from apilane.node_loader.programs import HOOKS, ConnectTimeLB

MAP_NAMES: tuple[str, ...] = (
    *(name for pair in TABLE_NAMES.values() for name in pair),
    CONNECTION_TABLE_NAME,
)


def report(lb: ConnectTimeLB) -> dict[str, Any]:
    """What the parent needs: where each map is pinned, its layout as bcc derived it from
    bpf/nat.h, and the loaded programs' ids."""
    bpf = lb._bpf
    pins: dict[str, str] = {}
    layouts: dict[str, dict[str, Any]] = {}
    for name in MAP_NAMES:
        table = bpf.get_table(name.encode())
        pins[name] = str(_pin_of(lb.pin_dir, name, libbpf.map_id(int(table.map_fd))))
        layouts[name] = {"key": describe_layout(table.Key), "leaf": describe_layout(table.Leaf)}
    return {
        "pins": pins,
        "layouts": layouts,
        "layout_versions": {name: Path(pin).name[len(name) + 1 :] for name, pin in pins.items()},
        "programs": {hook: libbpf.program_id(fd) for hook, fd in lb.program_fds.items()},
        "removed_pins": lb.removed_pins,
    }


def _pin_of(pin_dir: Path, name: str, current: int | None) -> Path:
    """The pin of map `name` (`<name>_<layout version>`) that holds the map bcc opened."""
    for pin in sorted(pin_dir.glob(f"{name}_*")):
        fd = libbpf.open_pinned(pin)
        if fd is None:
            continue
        try:
            if libbpf.map_id(fd) == current:
                return pin
        finally:
            os.close(fd)
    raise ProgramError(f"{name}: no pin in {pin_dir} holds the compiled map")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apilane.node_loader.compile")
    parser.add_argument("--cgroup", required=True)
    parser.add_argument("--pin-dir", required=True)
    parser.add_argument("--source-dir")
    parser.add_argument("--allow-root-cgroup", action="store_true")
    parser.add_argument("--fd-socket", type=int)
    args = parser.parse_args(argv)
    try:
        lb = ConnectTimeLB(
            cgroup_path=args.cgroup,
            pin_dir=args.pin_dir,
            source_dir=args.source_dir,
            allow_root_cgroup=args.allow_root_cgroup,
        )
        result = report(lb)
    except Exception as exc:
        print(f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    if args.fd_socket is not None:
        with socket.socket(fileno=args.fd_socket) as channel:
            hooks = [hook.name for hook in HOOKS]
            socket.send_fds(
                channel, [json.dumps(hooks).encode()], [lb.program_fds[h] for h in hooks]
            )
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
