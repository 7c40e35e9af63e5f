"""`python -m apilane.renderer` (the `apilane-renderer` console script) runs the service. The
env for manifest installs is printed by the operator CLI: `apilane render manifest`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from apilane.renderer import service, settings
from apilane.runtime.lifecycle import command_line


def main(argv: Sequence[str] | None = None) -> int:
    return command_line(
        settings.SERVICE_NAME,
        settings.load,
        service.main,
        argv,
        description="apilane renderer: keeps calico-node's API server env current "
        "(`apilane render manifest` prints it for manifest installs).",
    )


if __name__ == "__main__":
    sys.exit(main())
