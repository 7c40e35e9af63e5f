"""`python -m apilane.discovery` (or `apilane-discovery`) runs the service."""

from __future__ import annotations

import sys

from apilane.model.errors import ConfigError
from apilane.runtime import serve


def main() -> int:
    from apilane.discovery import service, settings

    try:
        loaded = settings.load()
    except ConfigError as exc:
        print(f"apilane-discovery: {exc}", file=sys.stderr)
        return 2
    return serve.run(
        settings.SERVICE_NAME,
        loaded.common,
        lambda ctx: service.run(loaded, ctx.stopping, registry=ctx.registry, health=ctx.health),
    )


if __name__ == "__main__":
    raise SystemExit(main())
