"""node-loader settings from APILANE_* variables, validated once at start.

| variable                        | default                  | meaning                                   |
|---------------------------------|--------------------------|-------------------------------------------|
| APILANE_NODE_NAME               | the host name            | this node, as in NodeState and subjects   |
| APILANE_BPF_PIN_DIR             | /sys/fs/bpf/apilane      | where the NAT maps and program links pin  |
| APILANE_STATE_DIR               | /run/apilane/node-loader | the applied-state file (see below)        |
| APILANE_CGROUP_PATH             | (required for bpf)       | the cgroup2 directory the programs attach |
| APILANE_ALLOW_ROOT_CGROUP       | false                    | allow the cgroup2 root (production only)  |
| APILANE_CONNECT_TIME_LB         | true                     | attach the connect-time programs          |
| APILANE_DESTROY_STALE_SOCKETS   | true                     | destroy sockets to removed backends       |
| APILANE_NODE_STATE_INTERVAL     | 30s                      | NodeState heartbeat and map audit period  |
| APILANE_BACKEND_PROBE           | tcp                      | tcp, https (GET /readyz) or off           |
| APILANE_PROBE_INTERVAL          | 300ms                    | time between two probes of one backend    |
| APILANE_PROBE_TIMEOUT           | 1s                       | a probe not answered by then has failed   |
| APILANE_PROBE_FAILURES          | 3                        | failed probes in a row: backend unhealthy |
| APILANE_PROBE_PASSES            | 2                        | passed probes in a row: healthy again     |
| APILANE_PROBE_NETNS             | the loader's own         | network namespace file to probe from      |
| APILANE_PROBE_CA_FILE           | none: not verified       | CA bundle for https probes                |
| APILANE_MAP_BACKEND             | bpf                      | bpf, or memory (scale runs, no root)      |
| APILANE_SNAPSHOT_FANOUT         | republish                | republish (core copies, feed.py), or watch |
| APILANE_TRUSTED_KEYS            | (this or _FILE to serve) | public keys whose snapshots are applied   |
| APILANE_TRUSTED_KEYS_FILE       | none                     | more of them, one per line                |
| APILANE_OPERATOR_KEYS           | none: control refused    | public keys whose control requests count  |
| APILANE_OPERATOR_KEYS_FILE      | none                     | more of them, one per line                |

Backend probes (prober.py) decide which API server backends are programmed: one failing
APILANE_PROBE_FAILURES probes in a row leaves the node's maps until it passes
APILANE_PROBE_PASSES in a row; a frontend whose backends all fail keeps them all (fail
static). An https probe without APILANE_PROBE_CA_FILE does not verify the certificate: it
checks that the API server answers /readyz with 200, it trusts nothing it says.

Only snapshots signed by a trusted key reach the maps (admission.py); `uninstall` reads no
key, so it works on a node whatever became of the key configuration.

The applied-state file cannot live *in* the pin dir: bpffs holds only BPF objects. It goes
to a tmpfs directory by default (/run), which a reboot clears together with bpffs, so a
stale file never claims a generation that empty maps do not hold. Its name is derived
from the pin dir, so several loaders on one machine (tests, the local stack) never share
one. In the DaemonSet, /run/apilane is a hostPath mount like /sys/fs/bpf.

The connect-time LB: APILANE_CONNECT_TIME_LB against the live switch
----------------------------------------------------------------------
An operator can switch the connect-time LB live, by a request on the node's control
subject (a `ControlRequest` sealed by an APILANE_OPERATOR_KEYS key, see control.py). That choice is kept in the applied-state file
together with the APILANE_CONNECT_TIME_LB value in force when it was made, so it survives
loader restarts and upgrades. At start, the precedence is (`resolve_connect_time_lb`):

1. no live switch recorded: APILANE_CONNECT_TIME_LB;
2. a live switch recorded while APILANE_CONNECT_TIME_LB had the value it has now: the live
   switch wins (the operator acted after the configuration was written);
3. a live switch recorded under a different APILANE_CONNECT_TIME_LB: the variable wins and
   the recorded switch is dropped (the configuration was changed after the operator acted,
   so the newer decision holds; changing the variable back later does not revive it).

Switching live back to the APILANE_CONNECT_TIME_LB value clears the record: the node
follows the variable again. A reboot clears the state file (tmpfs) and with it the switch:
for a lasting choice, set the variable.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec

from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.model.signing import TrustedKeys, public_text
from apilane.node_loader import early
from apilane.runtime.config import (
    CommonSettings,
    Env,
    load_common,
    load_trusted_keys,
    require_trusted_keys,
)

SERVICE_NAME: Final = "apilane-node-loader"

MAP_BACKENDS = ("bpf", "memory")
PROBE_KINDS = ("tcp", "https", "off")
SNAPSHOT_FANOUTS = ("watch", "republish")


class ProbeSettings(msgspec.Struct, frozen=True, kw_only=True):
    kind: str = "tcp"  # one of PROBE_KINDS
    interval: float = 0.3
    timeout: float = 1.0
    failures_to_fail: int = 3
    passes_to_recover: int = 2
    netns: str = ""  # a network namespace file; "" = the loader's own
    ca_file: str = ""

    @property
    def enabled(self) -> bool:
        return self.kind != "off"


class NodeLoaderSettings(msgspec.Struct, frozen=True, kw_only=True):
    common: CommonSettings
    node_name: str
    pin_dir: str = early.DEFAULT_PIN_DIR
    state_dir: str = early.DEFAULT_STATE_DIR
    cgroup_path: str = ""
    allow_root_cgroup: bool = False
    connect_time_lb: bool = True
    destroy_stale_sockets: bool = True
    node_state_interval: float = 30.0
    map_backend: str = "bpf"
    probe: ProbeSettings = msgspec.field(default_factory=ProbeSettings)
    snapshot_fanout: str = "republish"  # chosen by measurement: docs/benchmarks.md
    # Public keys (base64, raw Ed25519) as configured: the settings stay plain data, so
    # they can be logged at start; `trusted()` and `operators()` parse them.
    trusted_keys: tuple[str, ...] = ()
    operator_keys: tuple[str, ...] = ()

    def trusted(self) -> TrustedKeys:
        """The keys whose snapshots are accepted."""
        return TrustedKeys.parse(",".join(self.trusted_keys), source="APILANE_TRUSTED_KEYS")

    def operators(self) -> TrustedKeys:
        """The keys whose control requests are accepted (none: every request is refused)."""
        return TrustedKeys.parse(",".join(self.operator_keys), source="APILANE_OPERATOR_KEYS")

    @property
    def state_file(self) -> Path:
        return early.state_file(self.state_dir, self.pin_dir)

    @property
    def build_stamp(self) -> Path:
        """What the last compile produced (reuse.py): next to the state file."""
        return early.build_stamp(self.state_file)


def load_probe(env: Env) -> ProbeSettings:
    netns = env.str("PROBE_NETNS", "")
    if netns and not netns.startswith("/"):
        raise ConfigError(f"APILANE_PROBE_NETNS={netns!r}: expected an absolute path")
    ca_file = env.str("PROBE_CA_FILE", "")
    if ca_file and not Path(ca_file).is_file():
        raise ConfigError(f"APILANE_PROBE_CA_FILE={ca_file!r}: no such file")
    return ProbeSettings(
        kind=env.choice("BACKEND_PROBE", "tcp", PROBE_KINDS),
        interval=env.seconds("PROBE_INTERVAL", 0.3, low=0.05),
        timeout=env.seconds("PROBE_TIMEOUT", 1.0, low=0.01),
        failures_to_fail=env.int("PROBE_FAILURES", 3, low=1, high=100),
        passes_to_recover=env.int("PROBE_PASSES", 2, low=1, high=100),
        netns=netns,
        ca_file=ca_file,
    )


class LiveLbSwitch(msgspec.Struct, frozen=True, kw_only=True):
    """A live connect-time LB switch, as persisted in the applied-state file."""

    enabled: bool
    env_value: bool  # APILANE_CONNECT_TIME_LB when the switch was made
    switched_at: datetime


@dataclass(frozen=True, slots=True)
class LbDecision:
    """The connect-time LB setting a loader starts with, and why (see the module docstring)."""

    enabled: bool
    source: str  # "env" or "live switch"
    rule: str  # the precedence rule that decided, for the start-up log
    keep_switch: LiveLbSwitch | None  # the switch record to keep; None drops any record


def resolve_connect_time_lb(*, env_value: bool, switch: LiveLbSwitch | None) -> LbDecision:
    """Precedence between APILANE_CONNECT_TIME_LB and a persisted live switch."""
    if switch is None or switch.enabled == env_value == switch.env_value:
        # No record, or one that asks for what the variable says anyway (nothing to keep).
        return LbDecision(
            enabled=env_value,
            source="env",
            rule="no live switch recorded: APILANE_CONNECT_TIME_LB applies",
            keep_switch=None,
        )
    if switch.env_value != env_value:
        return LbDecision(
            enabled=env_value,
            source="env",
            rule=(
                f"APILANE_CONNECT_TIME_LB changed from {_onoff(switch.env_value)} to "
                f"{_onoff(env_value)} after the live switch to {_onoff(switch.enabled)} "
                f"at {switch.switched_at.isoformat()}: the variable applies, the switch is dropped"
            ),
            keep_switch=None,
        )
    return LbDecision(
        enabled=switch.enabled,
        source="live switch",
        rule=(
            f"live switch to {_onoff(switch.enabled)} at {switch.switched_at.isoformat()} "
            f"overrides APILANE_CONNECT_TIME_LB={_onoff(env_value)} until the variable changes "
            "or the LB is switched back"
        ),
        keep_switch=switch,
    )


def _onoff(value: bool) -> str:
    return "on" if value else "off"


def load(environ: Mapping[str, str] | None = None, *, serving: bool = True) -> NodeLoaderSettings:
    """The settings; `serving=False` (the `uninstall` command) does not require trusted keys."""
    env = Env(environ)
    common = load_common(environ)
    node_name = env.str("NODE_NAME", socket.gethostname())
    try:
        subjects.check_node_name(node_name)
    except ConfigError as exc:
        raise ConfigError(f"APILANE_NODE_NAME={node_name!r}: {exc}") from exc
    map_backend = env.choice("MAP_BACKEND", "bpf", MAP_BACKENDS)
    pin_dir = env.str("BPF_PIN_DIR", early.DEFAULT_PIN_DIR)
    if not pin_dir.startswith("/"):
        raise ConfigError(f"APILANE_BPF_PIN_DIR={pin_dir!r}: expected an absolute path")
    state_dir = env.str("STATE_DIR", early.DEFAULT_STATE_DIR)
    if not state_dir.startswith("/"):
        raise ConfigError(f"APILANE_STATE_DIR={state_dir!r}: expected an absolute path")
    cgroup_path = env.str("CGROUP_PATH", "")
    if map_backend == "bpf" and not cgroup_path:
        # No default on purpose: the wrong cgroup changes every connect() on the machine.
        raise ConfigError(
            "APILANE_CGROUP_PATH is required with APILANE_MAP_BACKEND=bpf: the cgroup2 directory "
            "to attach to (the cgroup2 root only together with APILANE_ALLOW_ROOT_CGROUP=true)"
        )
    return NodeLoaderSettings(
        common=common,
        node_name=node_name,
        pin_dir=pin_dir,
        state_dir=state_dir,
        cgroup_path=cgroup_path,
        allow_root_cgroup=env.bool("ALLOW_ROOT_CGROUP", False),
        connect_time_lb=env.bool("CONNECT_TIME_LB", True),
        destroy_stale_sockets=env.bool("DESTROY_STALE_SOCKETS", True),
        node_state_interval=env.seconds("NODE_STATE_INTERVAL", 30.0, low=0.05),
        map_backend=map_backend,
        probe=load_probe(env),
        snapshot_fanout=env.choice("SNAPSHOT_FANOUT", "republish", SNAPSHOT_FANOUTS),
        trusted_keys=_key_texts(
            require_trusted_keys(env) if serving else load_trusted_keys(env, "TRUSTED_KEYS")
        ),
        operator_keys=_key_texts(load_trusted_keys(env, "OPERATOR_KEYS")),
    )


def _key_texts(keys: TrustedKeys) -> tuple[str, ...]:
    return tuple(public_text(keys.keys[key_id]) for key_id in keys.ids)
