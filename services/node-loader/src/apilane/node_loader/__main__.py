"""`python -m apilane.node_loader`: one node-loader per node (a DaemonSet pod)."""

from __future__ import annotations

import functools
import sys

from apilane.node_loader import service, settings
from apilane.shared import runtime
from apilane.shared.config import describe
from apilane.shared.errors import ConfigError


def main() -> int:
    try:
        loaded = settings.load()
    except ConfigError as exc:
        print(f"node-loader: {exc}", file=sys.stderr)
        return 2
    runtime.setup_logging("node-loader", loaded.common.log_level)
    runtime.log.info("settings", extra={"settings": describe(loaded)})
    return runtime.run(
        "node-loader", loaded.common, functools.partial(service.main, settings=loaded)
    )


if __name__ == "__main__":
    sys.exit(main())
