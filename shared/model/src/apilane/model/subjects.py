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
# A node's key is removed this long (seconds) after its last write: it left the cluster.
# Far above any heartbeat interval (30 s by default), so a live node never loses its key.
NODE_STATE_MAX_AGE: Final = 3600.0
# How many revisions of each cluster's snapshot are kept for replay and audit.
SNAPSHOT_HISTORY: Final = 64

# The stream that keeps warnings and render results.
EVENTS_STREAM: Final = f"APILANE_{VERSION.upper()}_EVENTS"
EVENTS_STREAM_SUBJECTS: Final = (f"{PREFIX}.*.warnings", f"{PREFIX}.*.renders")

# Names are used as subject tokens and KV keys: keep them to a safe alphabet.
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,62}$")
# A Kubernetes node name is a DNS subdomain (RFC 1123): dot-separated labels of letters,
# digits and '-', each starting and ending with a letter or digit, 253 characters at most.
# Upper case is accepted too (a host name used as the default may have it).
_DNS_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?"
_NODE_NAME = re.compile(rf"^{_DNS_LABEL}(?:\.{_DNS_LABEL})*$")
MAX_NODE_NAME: Final = 253


def check_token(value: str, what: str) -> str:
    """Raise ConfigError unless `value` can be a NATS subject token and KV key."""
    if not _TOKEN.match(value):
        raise ConfigError(
            f"{what} {value!r} must be 1-63 characters of letters, digits, '-' or '_'"
        )
    return value


def check_node_name(node: str) -> str:
    """Raise ConfigError unless `node` is a valid Kubernetes node name (a DNS subdomain)."""
    if len(node) > MAX_NODE_NAME or not _NODE_NAME.match(node):
        raise ConfigError(
            f"node name {node!r} must be a DNS subdomain: at most {MAX_NODE_NAME} characters, "
            "dot-separated labels of letters, digits and '-' that start and end with a letter "
            "or digit"
        )
    return node


def node_token(node: str) -> str:
    """A node name as one subject token and KV key part. Dots would split a subject, so they
    become '_', which a DNS subdomain never contains: distinct names stay distinct."""
    return check_node_name(node).replace(".", "_")


def snapshot_key(cluster: str) -> str:
    return check_token(cluster, "cluster name")


def kv_subject(bucket: str, key: str) -> str:
    """The stream subject that backs a KV key (what KV put publishes to)."""
    return f"$KV.{bucket}.{key}"


def node_state_key(cluster: str, node: str) -> str:
    return f"{check_token(cluster, 'cluster name')}.{node_token(node)}"


def snapshot_republish_subject(cluster: str) -> str:
    """Core NATS subject where JetStream republishes each new value of a cluster's snapshot
    key (the KV stream's RePublish): the fan-out that needs no consumer per node."""
    return f"{PREFIX}.{check_token(cluster, 'cluster name')}.snapshot"


# The KV stream's RePublish source and destination: `snapshot_republish_subject` of each key.
SNAPSHOT_REPUBLISH_SOURCE: Final = f"$KV.{SNAPSHOT_BUCKET}.*"
SNAPSHOT_REPUBLISH_DESTINATION: Final = f"{PREFIX}.{{{{wildcard(1)}}}}.snapshot"


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
