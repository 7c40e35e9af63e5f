"""Every NATS subject, stream, KV bucket and durable name, in one place.

Versioned: a breaking change to a message schema gets a new version here, and both
versions can run side by side during an upgrade.
"""

from __future__ import annotations

import re
from typing import Final

from apilane.model.errors import ConfigError

VERSION: Final = "v1"
PREFIX: Final = f"apilane.{VERSION}"

# KV buckets (names may not contain dots).
SNAPSHOT_BUCKET: Final = f"apilane_{VERSION}_snapshots"  # key: <cluster>; value: EndpointSnapshot
NODE_STATE_BUCKET: Final = f"apilane_{VERSION}_nodes"  # key: <cluster>.<node>; value: NodeState
# How many revisions of each cluster's snapshot are kept for replay and audit.
SNAPSHOT_HISTORY: Final = 64

# The stream that keeps warnings and render results.
EVENTS_STREAM: Final = f"APILANE_{VERSION.upper()}_EVENTS"
EVENTS_STREAM_SUBJECTS: Final = (f"{PREFIX}.*.warnings", f"{PREFIX}.*.renders")

# Names are used as subject tokens and KV keys: keep them to a safe alphabet.
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")


def check_token(value: str, what: str) -> str:
    """Raise ConfigError unless `value` can be a NATS subject token and KV key."""
    if not _TOKEN.match(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-63 characters of letters, digits, '-' or '_'"
        )
    return value


def node_token(node: str) -> str:
    """Node names are DNS subdomains (may contain dots); dots would split a subject."""
    return check_token(node.replace(".", "_"), "node name")


def snapshot_key(cluster: str) -> str:
    return check_token(cluster, "cluster name")


def kv_subject(bucket: str, key: str) -> str:
    """The stream subject that backs a KV key (what KV put publishes to)."""
    return f"$KV.{bucket}.{key}"


def node_state_key(cluster: str, node: str) -> str:
    return f"{check_token(cluster, 'cluster name')}.{node_token(node)}"


def node_control_subject(cluster: str, node: str) -> str:
    """Core NATS request/reply to one node-loader (e.g. switching the connect-time LB)."""
    return f"{PREFIX}.{check_token(cluster, 'cluster name')}.nodes.{node_token(node)}.control"


def warnings_subject(cluster: str) -> str:
    return f"{PREFIX}.{check_token(cluster, 'cluster name')}.warnings"


def renders_subject(cluster: str) -> str:
    return f"{PREFIX}.{check_token(cluster, 'cluster name')}.renders"


def renderer_lease(cluster: str) -> str:
    return f"apilane-renderer-{check_token(cluster, 'cluster name')}"


def discovery_lease(cluster: str) -> str:
    return f"apilane-discovery-{check_token(cluster, 'cluster name')}"
