"""Settings from the environment, validated once at start.

Every variable is `APILANE_<NAME>`; Kubernetes access comes from `KUBECONFIG` or the
in-cluster service account, tracing from the standard `OTEL_*` variables (read by
`tracing`). A bad value stops the service at start with a `ConfigError` that names the
variable, never later in the middle of an event.
"""

from __future__ import annotations

import builtins
import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import msgspec

from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.runtime import natsauth

PREFIX = "APILANE_"
T = TypeVar("T")

# Literal subject tokens: a wildcard or an empty token would make no inbox at all.
_INBOX_PREFIX = re.compile(r"^[A-Za-z0-9_~-]+(\.[A-Za-z0-9_~-]+)*$")
_DURATION = re.compile(r"^(\d+(?:\.\d+)?)(ms|s|m|h)?$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


class NatsAuth(msgspec.Struct, frozen=True, kw_only=True):
    """How a client proves to NATS who it is (an nkey seed) and checks the server (TLS).

    Paths only: the seed itself is read when connecting, never kept in settings or logs.
    Empty means not used; TLS is used when a CA, a client certificate or a `tls://` URL is
    given. `role` and `cluster` name the identity the seed is (`as_identity`): with the
    seed's public key they make its inbox prefix, unless `inbox_prefix` gives it."""

    nkey_seed_file: str = ""
    tls_ca_file: str = ""  # empty with TLS: the system's trust store
    tls_cert_file: str = ""  # with tls_key_file: mutual TLS
    tls_key_file: str = ""
    inbox_prefix: str = ""  # empty: `natsauth.inbox_prefix_for(role, cluster, public key)`
    role: str = ""  # a natsauth.Role
    cluster: str = ""  # the identity's cluster, `*` for an operator over every cluster

    @property
    def wants_tls(self) -> bool:
        return bool(self.tls_ca_file or self.tls_cert_file)

    def as_identity(self, role: str, cluster: str) -> NatsAuth:
        """The same credentials, as the identity `role` of `cluster` (what a service or the
        CLI knows of itself; the environment holds only files). Without a seed there is no
        identity (an unauthenticated client): unchanged."""
        if not self.nkey_seed_file:
            return self
        return msgspec.structs.replace(self, role=str(natsauth.Role(role)), cluster=cluster)

    def resolved_inbox_prefix(self) -> str:
        """The inbox prefix to connect with: `inbox_prefix`, else the identity's own (which
        needs `role` and `cluster`); empty without a seed (an unauthenticated client)."""
        if self.inbox_prefix or not self.nkey_seed_file:
            return self.inbox_prefix
        if not self.role:
            raise ConfigError(
                f"the NATS identity of {self.nkey_seed_file} has no role: its inbox prefix "
                f"is unknown (NatsAuth.as_identity, or {PREFIX}NATS_INBOX_PREFIX)"
            )
        key = natsauth.public_key(natsauth.read_seed(Path(self.nkey_seed_file)))
        return natsauth.inbox_prefix_for(natsauth.Role(self.role), self.cluster, key)


class CommonSettings(msgspec.Struct, frozen=True, kw_only=True):
    """What every service reads."""

    cluster: str = "default"
    nats_urls: tuple[str, ...] = ("nats://127.0.0.1:4222",)
    nats_auth: NatsAuth = NatsAuth()
    kubeconfig: str = ""  # empty: in-cluster config
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    log_level: str = "INFO"


def _identity(value: str) -> str:
    return value


class Env:
    """Typed reads of APILANE_* variables that name the variable in every error."""

    def __init__(self, environ: Mapping[builtins.str, builtins.str] | None = None) -> None:
        self.environ = dict(os.environ if environ is None else environ)

    def raw(self, name: builtins.str) -> builtins.str | None:
        value = self.environ.get(PREFIX + name)
        return None if value is None or value.strip() == "" else value.strip()

    def _parse(
        self,
        name: builtins.str,
        default: T,
        parse: Callable[[builtins.str], T],
        expected: builtins.str,
    ) -> T:
        value = self.raw(name)
        if value is None:
            return default
        try:
            return parse(value)
        except (ValueError, ConfigError) as exc:
            raise ConfigError(f"{PREFIX}{name}={value!r}: expected {expected} ({exc})") from exc

    def str(self, name: builtins.str, default: builtins.str) -> builtins.str:
        return self._parse(name, default, _identity, "a string")

    def token(self, name: builtins.str, default: builtins.str) -> builtins.str:
        return self._parse(
            name, default, lambda v: subjects.check_token(v, name.lower()), "a simple name"
        )

    def int(
        self,
        name: builtins.str,
        default: builtins.int,
        *,
        low: builtins.int | None = None,
        high: builtins.int | None = None,
    ) -> builtins.int:
        def parse(value: builtins.str) -> builtins.int:
            number = int(value, 10)
            if (low is not None and number < low) or (high is not None and number > high):
                raise ValueError(f"out of range [{low}, {high}]")
            return number

        return self._parse(name, default, parse, "an integer")

    def bool(self, name: builtins.str, default: builtins.bool) -> builtins.bool:
        def parse(value: builtins.str) -> builtins.bool:
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError("not a boolean")

        return self._parse(name, default, parse, "true or false")

    def seconds(
        self, name: builtins.str, default: builtins.float, *, low: builtins.float = 0.0
    ) -> builtins.float:
        """A duration: `100ms`, `2s`, `5m`, `1h`, or a bare number of seconds."""

        def parse(value: builtins.str) -> builtins.float:
            match = _DURATION.match(value)
            if not match:
                raise ValueError("not a duration")
            seconds = float(match.group(1)) * _UNITS[match.group(2)]
            if seconds < low:
                raise ValueError(f"below {low}s")
            return seconds

        return self._parse(name, default, parse, "a duration like 100ms, 2s or 5m")

    def list(
        self, name: builtins.str, default: tuple[builtins.str, ...]
    ) -> tuple[builtins.str, ...]:
        def parse(value: builtins.str) -> tuple[builtins.str, ...]:
            items = tuple(part.strip() for part in value.split(","))
            if any(not item for item in items):
                raise ValueError("empty entry")
            return items

        return self._parse(name, default, parse, "a comma-separated list")

    def choice(
        self, name: builtins.str, default: builtins.str, choices: tuple[builtins.str, ...]
    ) -> builtins.str:
        def parse(value: builtins.str) -> builtins.str:
            if value not in choices:
                raise ValueError(f"not one of {', '.join(choices)}")
            return value

        return self._parse(name, default, parse, "one of " + ", ".join(choices))


def load_common(environ: Mapping[str, str] | None = None) -> CommonSettings:
    env = Env(environ)
    urls = env.list("NATS_URL", ("nats://127.0.0.1:4222",))
    for url in urls:
        if not re.match(r"^(nats|tls|ws|wss)://[^\s/]+$", url):
            raise ConfigError(f"{PREFIX}NATS_URL: {url!r} is not a nats://host:port URL")
    return CommonSettings(
        cluster=env.token("CLUSTER", "default"),
        nats_urls=urls,
        nats_auth=load_nats_auth(environ),
        kubeconfig=(env.environ.get("KUBECONFIG") or "").strip(),
        http_host=env.str("HTTP_HOST", "0.0.0.0"),
        http_port=env.int("HTTP_PORT", 8080, low=0, high=65535),
        log_level=env.choice("LOG_LEVEL", "INFO", ("DEBUG", "INFO", "WARNING", "ERROR")),
    )


def load_nats_auth(environ: Mapping[str, str] | None = None) -> NatsAuth:
    """The NATS credential and TLS files; each must be readable now, not at the first connect."""
    env = Env(environ)
    auth = NatsAuth(
        nkey_seed_file=env.str("NATS_NKEY_SEED_FILE", ""),
        tls_ca_file=env.str("NATS_TLS_CA_FILE", ""),
        tls_cert_file=env.str("NATS_TLS_CERT_FILE", ""),
        tls_key_file=env.str("NATS_TLS_KEY_FILE", ""),
        inbox_prefix=env.str("NATS_INBOX_PREFIX", ""),
    )
    files = {
        "NATS_NKEY_SEED_FILE": auth.nkey_seed_file,
        "NATS_TLS_CA_FILE": auth.tls_ca_file,
        "NATS_TLS_CERT_FILE": auth.tls_cert_file,
        "NATS_TLS_KEY_FILE": auth.tls_key_file,
    }
    for name, path in files.items():
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"{PREFIX}{name}={path!r}: no readable file there")
    if auth.nkey_seed_file:
        try:
            natsauth.public_key(natsauth.read_seed(Path(auth.nkey_seed_file)))
        except natsauth.NatsAuthError as exc:
            raise ConfigError(
                f"{PREFIX}NATS_NKEY_SEED_FILE={auth.nkey_seed_file!r}: {exc}"
            ) from exc
    if bool(auth.tls_cert_file) != bool(auth.tls_key_file):
        raise ConfigError(
            f"{PREFIX}NATS_TLS_CERT_FILE and {PREFIX}NATS_TLS_KEY_FILE go together (mutual TLS)"
        )
    if auth.inbox_prefix and not _INBOX_PREFIX.match(auth.inbox_prefix):
        raise ConfigError(
            f"{PREFIX}NATS_INBOX_PREFIX={auth.inbox_prefix!r}: expected dot-separated subject "
            "tokens of letters, digits, '-', '_' or '~' (no wildcard)"
        )
    return auth


def describe(settings: Any) -> dict[str, Any]:
    """Settings as a dict for the start-up log line. A value msgspec cannot encode (a key
    object) shows as its type name only, so no key material reaches a log."""
    return dict(msgspec.to_builtins(settings, enc_hook=_type_name))


def _type_name(value: Any) -> str:
    return f"<{type(value).__name__}>"


def load_trusted_keys(env: Env, name: str = "TRUSTED_KEYS") -> TrustedKeys:
    """Public keys from APILANE_<name> (comma-separated base64) and/or the file named by
    APILANE_<name>_FILE (one per line, `#` comments). Empty when neither is set: the caller
    decides whether that is an error (a consumer of snapshots trusts nothing then)."""
    text = env.raw(name) or ""
    path = env.raw(f"{name}_FILE")
    if path:
        try:
            text += "\n" + Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"{PREFIX}{name}_FILE: cannot read {path}: {exc.strerror}") from exc
    return TrustedKeys.parse(text, source=f"{PREFIX}{name}")


def require_trusted_keys(env: Env, name: str = "TRUSTED_KEYS") -> TrustedKeys:
    keys = load_trusted_keys(env, name)
    if not keys:
        raise ConfigError(
            f"{PREFIX}{name} (or {PREFIX}{name}_FILE) must name at least one public key: "
            "without one, no snapshot can be trusted"
        )
    return keys


def load_signing_key(env: Env, name: str = "SIGNING_KEY_FILE") -> SigningKey:
    path = env.raw(name)
    if not path:
        raise ConfigError(f"{PREFIX}{name} must name the PEM file of the Ed25519 signing key")
    try:
        return SigningKey.load(path)
    except ConfigError as exc:
        raise ConfigError(f"{PREFIX}{name}: {exc}") from exc
