"""`python -m apilane.node_loader [serve | uninstall]`.

`serve` (the default) runs the node-loader: one per node, a DaemonSet pod. `uninstall`
removes apilane's pinned links and maps and its state file from this node, once the
DaemonSet is gone (see uninstall.py). Both read the same APILANE_* settings.

Cold start: compiling the programs (a child running clang, ~1 s) and this interpreter's own
imports (nats, aiohttp, opentelemetry, prometheus, and the settings' msgspec and
cryptography: ~1 s) are the two long steps. `serve` with the bpf backend starts the compile
child first, from the few variables it needs (early.py) and with only pinned.py imported,
so the two overlap; the service takes the child's result when it opens the data plane. A restart whose pins and attached programs match the last compile's build
stamp (reuse.py) starts no child at all.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from apilane.node_loader.early import compile_target

if TYPE_CHECKING:
    from apilane.node_loader.pinned import CompilerRun


def start_compiler_early(arguments: Sequence[str]) -> CompilerRun | None:
    """The compile child for `serve` with the bpf backend, started now; None for any other
    command, or when a setting or a safety check says no (the normal path then reports it,
    with the loader's logging in place)."""
    if list(arguments) not in ([], ["serve"]):
        return None
    target = compile_target()
    if target is None:
        return None
    from apilane.model.errors import ApilaneError
    from apilane.node_loader import reuse
    from apilane.node_loader.pinned import existing_pins, start_compiler
    from apilane.node_loader.programs import default_source_dir

    try:
        pin_dir = Path(target.pin_dir)
        _, why = reuse.check(
            target.build_stamp,
            digest=reuse.build_digest(default_source_dir(), pin_dir),
            pins=existing_pins(pin_dir),
            pin_dir=pin_dir,
            cgroup_path=Path(target.cgroup_path),
        )
        if not why:
            return None  # a restart: the loader reuses what is pinned, nothing to compile
        return start_compiler(
            cgroup_path=target.cgroup_path,
            pin_dir=target.pin_dir,
            allow_root_cgroup=target.allow_root_cgroup,
        )
    except (ApilaneError, OSError):
        return None


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    compiling = start_compiler_early(arguments)
    try:
        # Imported only now: they are what the compile child overlaps.
        from apilane.node_loader import service, settings, uninstall
        from apilane.runtime.lifecycle import command_line

        # Serving needs the trusted keys; uninstall must work whatever became of them.
        serving = "uninstall" not in arguments
        open_data_plane = functools.partial(service.open_data_plane, compiling=compiling)
        return command_line(
            settings.SERVICE_NAME,
            lambda: settings.load(serving=serving),
            lambda ctx, loaded: service.main(
                ctx, settings=loaded, data_plane_factory=open_data_plane
            ),
            arguments,
            description="apilane node-loader: the eBPF NAT maps and connect-time LB of one node.",
            commands={
                "uninstall": (
                    "remove its pinned links, maps and state file from this node",
                    lambda loaded: uninstall.main(loaded, out=sys.stdout, err=sys.stderr),
                )
            },
        )
    finally:
        if compiling is not None:
            compiling.abandon()  # not taken (stopped first, or a bad setting): end it


if __name__ == "__main__":
    sys.exit(main())
