"""Which stack a command talks to: one named by flags (or their environment variables), else
the local one that `apilane up` describes in `.apilane/stack.json` of this checkout."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from apilane.cli.errors import CliError
from apilane.model.errors import ConfigError
from apilane.model.signing import TrustedKeys
from apilane.runtime import config
from apilane.runtime.config import NatsAuth
from apilane.runtime.natsauth import Role

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
    # Whose signatures make a snapshot trusted; empty: every snapshot shows as untrusted.
    trusted_keys: TrustedKeys = field(default_factory=lambda: TrustedKeys({}))
    # The operator's private key (PEM) that control requests are sealed with; empty: none.
    operator_key_file: str = ""
    # Whom the commands connect to NATS as: the operator's identity (APILANE_NATS_*).
    nats_auth: NatsAuth = field(default_factory=NatsAuth)

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
        from flags or APILANE_CLUSTER, KUBECONFIG, APILANE_NATS_* (the operator's identity),
        APILANE_TRUSTED_KEYS(_FILE) and APILANE_OPERATOR_KEY_FILE), else the stack file
        `apilane up` writes (which only flags override: a shell's KUBECONFIG is not the local
        stack's)."""
        environ = os.environ if environ is None else environ
        daemonset = flags.daemonset or CALICO_NODE
        if flags.nats_urls or environ.get("APILANE_NATS_URL"):
            common = config.load_common(environ)
            env = config.Env(environ)
            cluster = flags.cluster or common.cluster
            return cls(
                cluster=cluster,
                nats_urls=flags.nats_urls or common.nats_urls,
                kubeconfig=flags.kubeconfig or common.kubeconfig,
                zipkin_url="",
                daemonset=daemonset,
                trusted_keys=config.load_trusted_keys(env),
                operator_key_file=env.str("OPERATOR_KEY_FILE", ""),
                # The operator of the cluster it works on (of every cluster: its inbox prefix
                # in APILANE_NATS_INBOX_PREFIX).
                nats_auth=common.nats_auth.as_identity(Role.OPERATOR, cluster),
            )
        data = read_stack_file(checkout or find_checkout())
        return cls(
            cluster=flags.cluster or data["cluster"],
            nats_urls=(data["nats_url"],),
            kubeconfig=flags.kubeconfig or data["kubeconfig"],
            zipkin_url=data["zipkin_url"],
            daemonset=daemonset,
            trusted_keys=stack_trusted_keys(data),
            operator_key_file=data.get("operator_key_file", ""),
            nats_auth=stack_nats_auth(data).as_identity(Role.OPERATOR, data["cluster"]),
        )


def stack_trusted_keys(data: dict[str, Any]) -> TrustedKeys:
    """The keys the local stack's discovery signs with, as `apilane up` recorded them."""
    try:
        return TrustedKeys.parse(data.get("trusted_keys", ""), source="the stack file")
    except ConfigError as exc:
        raise CliError(f"{exc}: restart `apilane up`") from exc


def stack_nats_auth(data: dict[str, Any]) -> NatsAuth:
    """The operator's NATS identity, as `apilane up` recorded it (files under .apilane/)."""
    try:
        return config.load_nats_auth(data.get("operator_nats", {}))
    except ConfigError as exc:
        raise CliError(f"the stack file's operator identity: {exc}: restart `apilane up`") from exc


def local_stack(nats_urls: tuple[str, ...], checkout: Path | None = None) -> StackInfo | None:
    """The local stack `apilane up` runs, when `nats_urls` name its NATS; else None."""
    try:
        data = read_stack_file(checkout or find_checkout())
    except CliError:
        return None
    if data.get("nats_url") not in nats_urls:
        return None
    return StackInfo.load(Flags(), environ={}, checkout=checkout or find_checkout())


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
