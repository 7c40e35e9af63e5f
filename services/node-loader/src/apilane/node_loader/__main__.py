"""`python -m apilane.node_loader`: one node-loader per node (a DaemonSet pod)."""

from __future__ import annotations

import functools
import sys

from apilane.node_loader import service, settings
from apilane.shared import runtime
from apilane.shared.config import describe
from apilane.shared.errors import ConfigError

# service.name in traces and "service" in every log line.
SERVICE_NAME = "apilane-node-loader"


def main() -> int:
    try:
        loaded = settings.load()
    except ConfigError as exc:
        print(f"{SERVICE_NAME}: {exc}", file=sys.stderr)
        return 2
    runtime.setup_logging(SERVICE_NAME, loaded.common.log_level)
    runtime.log.info("settings", extra={"settings": describe(loaded)})
    return runtime.run(
        SERVICE_NAME, loaded.common, functools.partial(service.main, settings=loaded)
    )


if __name__ == "__main__":
    sys.exit(main())
