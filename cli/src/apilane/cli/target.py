"""Which stack a command talks to: one named by flags (or their environment variables), else
the local one that `apilane up` describes in `.apilane/stack.json` of this checkout."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apilane.cli.errors import CliError
from apilane.runtime import config

CALICO_NODE = "calico-system/calico-node"
STATE_DIR = ".apilane"


def is_checkout(directory: Path) -> bool:
    return (directory / "cli" / "pyproject.toml").is_file() and (
        directory / "deploy" / "demo"
    ).is_dir()


def find_checkout(start: Path | None = None) -> Path | None:
    """The apilane checkout: the working directory or one above it, else the one this package
    is installed from (`make setup` installs it editable)."""
    here = (start or Path.cwd()).resolve()
    installed_from = Path(__file__).resolve().parents
    for directory in (here, *here.parents, *installed_from):
        if is_checkout(directory):
            return directory
    return None


def stack_file(checkout: Path) -> Path:
    return checkout / STATE_DIR / "stack.json"


@dataclass(frozen=True)
class Flags:
    """What the command line named (empty: not given)."""

    nats_urls: tuple[str, ...] = ()
    cluster: str = ""
    kubeconfig: str = ""
    daemonset: str = ""


@dataclass(frozen=True)
class StackInfo:
    cluster: str
    nats_urls: tuple[str, ...]
    kubeconfig: str
    zipkin_url: str
    daemonset: str = CALICO_NODE  # namespace/name of calico-node

    @property
    def daemonset_path(self) -> str:
        namespace, _, name = self.daemonset.partition("/")
        return f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"

    @classmethod
    def load(
        cls,
        flags: Flags,
        *,
        environ: Mapping[str, str] | None = None,
        checkout: Path | None = None,
    ) -> StackInfo:
        """Named by flags when NATS is (--nats-url or APILANE_NATS_URL; the rest then comes
        from flags or APILANE_CLUSTER and KUBECONFIG), else the stack file `apilane up`
        writes (which only flags override: a shell's KUBECONFIG is not the local stack's)."""
        environ = os.environ if environ is None else environ
        daemonset = flags.daemonset or CALICO_NODE
        if flags.nats_urls or environ.get("APILANE_NATS_URL"):
            common = config.load_common(environ)
            return cls(
                cluster=flags.cluster or common.cluster,
                nats_urls=flags.nats_urls or common.nats_urls,
                kubeconfig=flags.kubeconfig or common.kubeconfig,
                zipkin_url="",
                daemonset=daemonset,
            )
        data = read_stack_file(checkout or find_checkout())
        return cls(
            cluster=flags.cluster or data["cluster"],
            nats_urls=(data["nats_url"],),
            kubeconfig=flags.kubeconfig or data["kubeconfig"],
            zipkin_url=data["zipkin_url"],
            daemonset=daemonset,
        )


def read_stack_file(checkout: Path | None) -> dict[str, Any]:
    not_running = CliError(
        "the local stack is not running: start it with `apilane up` (`make up`) in the "
        "apilane checkout, or name a stack with --nats-url"
    )
    if checkout is None:
        raise not_running
    try:
        data: dict[str, Any] = json.loads(stack_file(checkout).read_text())
    except FileNotFoundError as exc:
        raise not_running from exc
    except (OSError, ValueError) as exc:
        raise CliError(
            f"{stack_file(checkout)} is unreadable ({exc}): restart `apilane up`"
        ) from exc
    return data
