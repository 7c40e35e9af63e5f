"""`python -m apilane.node_loader [serve | uninstall]`.

`serve` (the default) runs the node-loader: one per node, a DaemonSet pod. `uninstall`
removes apilane's pinned links and maps and its state file from this node, once the
DaemonSet is gone (see uninstall.py). Both read the same APILANE_* settings.
"""

from __future__ import annotations

import argparse
import functools
import sys
from collections.abc import Sequence

from apilane.model.errors import ConfigError
from apilane.node_loader import service, settings, uninstall
from apilane.runtime import serve
from apilane.runtime.config import describe

# service.name in traces and "service" in every log line.
SERVICE_NAME = "apilane-node-loader"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m apilane.node_loader",
        description="apilane node-loader: the eBPF NAT maps and connect-time LB of one node.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        default="serve",
        choices=("serve", "uninstall"),
        help="serve (default): run the loader; uninstall: remove its pinned links, maps and "
        "state file from this node",
    )
    command = parser.parse_args(argv).command
    try:
        loaded = settings.load()
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 2
    if command == "uninstall":
        return uninstall.main(loaded, out=sys.stdout, err=sys.stderr)
    serve.setup_logging(SERVICE_NAME, loaded.common.log_level)
    serve.log.info("settings", extra={"settings": describe(loaded)})
    return serve.run(SERVICE_NAME, loaded.common, functools.partial(service.main, settings=loaded))


if __name__ == "__main__":
    sys.exit(main())
