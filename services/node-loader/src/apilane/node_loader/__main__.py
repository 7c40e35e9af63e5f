"""`python -m apilane.node_loader [serve | uninstall]`.

`serve` (the default) runs the node-loader: one per node, a DaemonSet pod. `uninstall`
removes apilane's pinned links and maps and its state file from this node, once the
DaemonSet is gone (see uninstall.py). Both read the same APILANE_* settings.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

from apilane.node_loader import service, settings, uninstall
from apilane.runtime.lifecycle import command_line


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    # Serving needs the trusted keys; uninstall must work whatever became of them.
    serving = "uninstall" not in arguments
    return command_line(
        settings.SERVICE_NAME,
        lambda: settings.load(serving=serving),
        lambda ctx, loaded: service.main(ctx, settings=loaded),
        arguments,
        description="apilane node-loader: the eBPF NAT maps and connect-time LB of one node.",
        commands={
            "uninstall": (
                "remove its pinned links, maps and state file from this node",
                lambda loaded: uninstall.main(loaded, out=sys.stdout, err=sys.stderr),
            )
        },
    )


if __name__ == "__main__":
    sys.exit(main())
