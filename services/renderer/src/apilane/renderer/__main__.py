"""`python -m apilane.renderer` (the `apilane-renderer` console script) runs the service. The
env for manifest installs is printed by the operator CLI: `apilane render manifest`."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from apilane.model.errors import ConfigError
from apilane.runtime import serve


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args:
        print(
            f"usage: python -m apilane.renderer (no arguments; `apilane render manifest` prints "
            f"the env for manifest installs); unknown {args[0]!r}",
            file=sys.stderr,
        )
        return 2

    from apilane.renderer import service, settings

    try:
        loaded = settings.load()
    except ConfigError as exc:
        print(f"apilane-renderer: {exc}", file=sys.stderr)
        return 2
    return serve.run(
        settings.SERVICE_NAME,
        loaded.common,
        lambda ctx: service.main(ctx, loaded),
    )


if __name__ == "__main__":
    raise SystemExit(main())
