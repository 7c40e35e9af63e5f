"""`python -m apilane.discovery` (or `apilane-discovery`) runs the service."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from apilane.discovery import service, settings
from apilane.runtime.lifecycle import command_line


def main(argv: Sequence[str] | None = None) -> int:
    return command_line(
        settings.SERVICE_NAME,
        settings.load,
        service.main,
        argv,
        description="apilane discovery: watches the kubernetes Service and publishes snapshots.",
    )


if __name__ == "__main__":
    sys.exit(main())
