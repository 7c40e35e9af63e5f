"""`python -m apilane.renderer` runs the service; `python -m apilane.renderer manifest …`
prints the env for manifest installs (the same as `apilane-render manifest …`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from apilane.model.errors import ConfigError
from apilane.runtime import serve

USAGE = (
    "usage: python -m apilane.renderer [manifest ...]\n"
    "  (no argument) run the service; manifest ...: print the env for manifest installs"
)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    # The image build runs `--help` as its smoke check, like the other two services.
    if args[:1] in (["-h"], ["--help"]):
        print(USAGE)
        return 0
    if args and args[0] == "manifest":
        from apilane.renderer import cli

        return cli.main(args)
    if args:
        print(
            f"usage: python -m apilane.renderer [manifest ...]; unknown {args[0]!r}",
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
