"""Who may do what on the bus: apilane's identities in, nats-server configuration out.

Deny by default: each identity is one NATS user (an nkey: Ed25519 challenge-response, the
server never sees the seed) with allow-lists for exactly the subjects its role uses, and
explicit denials of the stream-admin API and the snapshot key for every role that must never
touch them (a deny wins over any allow, so a later widening cannot undo them).

- discovery, per cluster: writes its cluster's snapshot key and warnings, and subscribes
  (core NATS) to that key's subject; the trusted provisioner, so it may create and update
  the three streams (never delete or purge).
- renderer, per cluster: reads and watches snapshots; writes render results and warnings.
- node-loader, per node: reads and watches snapshots; writes only its own node-state key
  and warnings; receives its own control subject and answers on it.
- operator (the CLI), per cluster or `*` for all: reads every stream, sends control requests.

Every identity may subscribe only to its own inbox prefix,
`_INBOX.apilane.<cluster>.<role>.<public key>` (`inbox_prefix_for`), so no identity can read
another's replies. The cluster and role tokens let one pattern name every inbox of a role in
a cluster (`inbox_pattern`): a leaf's hub side allows its cluster's node-loaders' inboxes
with one wildcard, so a node added later is reachable through a leaf that connected before
it. Consumers may be created only on streams the role reads, and for the renderer and
node-loader only on the snapshot stream: nats-server 2.15 does not check a push consumer's
deliver subject against its creator's permissions, so a consumer on a stream whose messages
the creator can write would let it deliver its own bytes onto any subject (a node's control
subject, say).

`render_server_config` is a pure function of the identities and the server options; the
harness, docker-compose and deploy/ all run its output. Seeds are never part of it: they
live in files (`provision`), one per identity, and only public keys reach the config.
"""

from __future__ import annotations

import enum
import hashlib
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Final

import msgspec
import nkeys

from apilane.model import subjects
from apilane.model.errors import ApilaneError

ACCOUNT: Final = "APILANE"
ALL_CLUSTERS: Final = "*"  # an operator over every cluster

_SNAPSHOTS: Final = f"KV_{subjects.SNAPSHOT_BUCKET}"
_NODES: Final = f"KV_{subjects.NODE_STATE_BUCKET}"
_EVENTS: Final = subjects.EVENTS_STREAM
STREAMS: Final = (_SNAPSHOTS, _NODES, _EVENTS)
_API: Final = "$JS.API"
# The hub's JetStream domain. A leaf without JetStream reaches the hub's JetStream only
# through a domain: its account maps `$JS.API.>` onto `$JS.<domain>.API.>`, so clients on
# a leaf and on the hub use the same subjects (and the same permissions).
HUB_DOMAIN: Final = "hub"
_HUB_API: Final = f"$JS.{HUB_DOMAIN}.API"

# What no role but the provisioner may do, and what nobody may do, to a stream.
_STREAM_ADMIN: Final = tuple(f"{_API}.STREAM.{verb}.>" for verb in ("CREATE", "UPDATE"))
_DESTRUCTIVE: Final = (
    f"{_API}.STREAM.DELETE.>",
    f"{_API}.STREAM.PURGE.>",
    f"{_API}.STREAM.MSG.DELETE.>",
    f"{_API}.STREAM.RESTORE.>",
    f"{_API}.STREAM.SNAPSHOT.>",
)


class NatsAuthError(ApilaneError):
    """An identity list or a seed that cannot make a safe server configuration."""


class Role(enum.StrEnum):
    DISCOVERY = "discovery"
    RENDERER = "renderer"
    NODE_LOADER = "node-loader"
    OPERATOR = "operator"
    LEAF = "leaf"  # a leaf nats-server (one per zone) that carries its node-loaders' traffic


class Identity(msgspec.Struct, frozen=True, kw_only=True):
    """One NATS user. `public_key` is empty until the identity is provisioned."""

    role: Role
    cluster: str
    node: str = ""  # the node-loader's node name (APILANE_NODE_NAME), or the leaf's zone
    public_key: str = ""

    @property
    def name(self) -> str:
        scope = "all" if self.cluster == ALL_CLUSTERS else self.cluster
        return f"{self.role}:{scope}" + (f":{self.node}" if self.node else "")

    @property
    def seed_path(self) -> str:
        """Where its seed lives, relative to a seeds directory."""
        scope = "_all" if self.cluster == ALL_CLUSTERS else self.cluster
        if self.role in (Role.NODE_LOADER, Role.LEAF):
            return f"{scope}/{self.role}/{_file_stem(self.node)}.nk"
        return f"{scope}/{self.role}.nk"

    @property
    def inbox_prefix(self) -> str:
        return inbox_prefix_for(self.role, self.cluster, self.public_key)

    def with_key(self, public_key: str) -> Identity:
        return msgspec.structs.replace(self, public_key=check_public_key(public_key))


# A file name has at most 255 bytes; a node name up to 253 characters, plus a suffix.
_MAX_STEM: Final = 240


def _file_stem(node: str) -> str:
    """The node name, or for one too long for a file name, its start and a digest of it
    (distinct names stay distinct)."""
    if len(node) <= _MAX_STEM:
        return node
    digest = hashlib.sha256(node.encode()).hexdigest()[:16]
    return f"{node[: _MAX_STEM - 17]}-{digest}"


class Permissions(msgspec.Struct, frozen=True, kw_only=True):
    publish_allow: tuple[str, ...]
    publish_deny: tuple[str, ...]
    subscribe_allow: tuple[str, ...]
    allow_responses: bool = False


# --------------------------------------------------------------------------- identities


def identities_for(
    cluster: str, nodes: Iterable[str], *, operator_cluster: str | None = None
) -> tuple[Identity, ...]:
    """A cluster's identities: discovery, renderer, an operator, and one node-loader per
    node (so each node can write only its own node-state key). Keys are not filled in."""
    subjects.check_token(cluster, "cluster name")
    found = [
        Identity(role=Role.DISCOVERY, cluster=cluster),
        Identity(role=Role.RENDERER, cluster=cluster),
        Identity(role=Role.OPERATOR, cluster=operator_cluster or cluster),
    ]
    found += [Identity(role=Role.NODE_LOADER, cluster=cluster, node=node) for node in nodes]
    return tuple(found)


def validate(identities: Sequence[Identity]) -> None:
    """Raise NatsAuthError unless the list makes a deny-by-default configuration.

    An empty list is refused: nats-server with no users at all lets anyone in."""
    if not identities:
        raise NatsAuthError("no identities: nats-server would accept unauthenticated clients")
    names: set[str] = set()
    keys: set[str] = set()
    for identity in identities:
        _check_scope(identity)
        if identity.name in names:
            raise NatsAuthError(f"identity {identity.name} is listed twice")
        names.add(identity.name)
        key = check_public_key(identity.public_key)
        if key in keys:
            raise NatsAuthError(f"identity {identity.name} shares its nkey with another")
        keys.add(key)


def _check_scope(identity: Identity) -> None:
    if identity.cluster == ALL_CLUSTERS:
        if identity.role is not Role.OPERATOR:
            raise NatsAuthError(f"{identity.role}: only an operator may span every cluster")
    else:
        subjects.check_token(identity.cluster, "cluster name")
    if identity.role is Role.NODE_LOADER:
        if not identity.node:
            raise NatsAuthError(f"{identity.name}: a node-loader identity needs its node")
        subjects.node_token(identity.node)
    elif identity.role is Role.LEAF:
        if not identity.node:
            raise NatsAuthError(f"{identity.name}: a leaf identity needs its zone")
        subjects.check_token(identity.node, "leaf zone")
    elif identity.node:
        raise NatsAuthError(f"{identity.name}: only a node-loader identity names a node")


# --------------------------------------------------------------------------- permissions


def permissions(identity: Identity) -> Permissions:
    """Exactly what the identity's role uses (see the module docstring): a function of the
    identity alone, so adding an identity never changes another's permissions."""
    builders = {
        Role.DISCOVERY: _discovery,
        Role.RENDERER: _renderer,
        Role.NODE_LOADER: _node_loader,
        Role.OPERATOR: _operator,
        Role.LEAF: _leaf,
    }
    return builders[identity.role](identity)


def _stream_info(*streams: str) -> list[str]:
    return [f"{_API}.STREAM.INFO.{stream}" for stream in streams]


def _reads(stream: str, key_subject: str | None = None) -> list[str]:
    """Get one message: by subject (any, in the payload) or, direct, by a subject in the name."""
    direct = f"{_API}.DIRECT.GET.{stream}"
    return [
        f"{_API}.STREAM.MSG.GET.{stream}",
        direct,
        f"{direct}.{key_subject}" if key_subject else f"{direct}.>",
    ]


def _watches(stream: str) -> list[str]:
    """An ephemeral ordered push consumer (a KV watch) and its flow-control replies."""
    return [
        f"{_API}.CONSUMER.CREATE.{stream}",
        f"{_API}.CONSUMER.CREATE.{stream}.>",
        f"$JS.FC.{stream}.>",
    ]


def _snapshot_key(cluster: str) -> str:
    return subjects.kv_subject(subjects.SNAPSHOT_BUCKET, subjects.snapshot_key(cluster))


def _inbox(identity: Identity) -> str:
    return f"{identity.inbox_prefix}.>"


def _discovery(identity: Identity) -> Permissions:
    cluster = identity.cluster
    publish = [
        _snapshot_key(cluster),
        subjects.warnings_subject(cluster),
        *_stream_info(*STREAMS),
        *(f"{_API}.STREAM.{verb}.{stream}" for verb in ("CREATE", "UPDATE") for stream in STREAMS),
        *_reads(_SNAPSHOTS, _snapshot_key(cluster)),
    ]
    return Permissions(
        publish_allow=tuple(publish),
        publish_deny=_DESTRUCTIVE,
        # Its own key, core NATS: the leader notices a delete, purge or foreign write at
        # once and puts its snapshot back (no consumer: see the module's docstring).
        subscribe_allow=(_inbox(identity), _snapshot_key(cluster)),
    )


def _renderer(identity: Identity) -> Permissions:
    cluster = identity.cluster
    publish = [
        subjects.renders_subject(cluster),
        subjects.warnings_subject(cluster),
        *_stream_info(*STREAMS),
        *_reads(_SNAPSHOTS, _snapshot_key(cluster)),
        *_watches(_SNAPSHOTS),
    ]
    return Permissions(
        publish_allow=tuple(publish),
        publish_deny=_denied_to_readers(),
        subscribe_allow=(_inbox(identity),),
    )


def _node_loader(identity: Identity) -> Permissions:
    cluster, node = identity.cluster, identity.node
    publish = [
        subjects.kv_subject(subjects.NODE_STATE_BUCKET, subjects.node_state_key(cluster, node)),
        subjects.warnings_subject(cluster),
        *_stream_info(*STREAMS),
        *_reads(_SNAPSHOTS, _snapshot_key(cluster)),
        *_watches(_SNAPSHOTS),
    ]
    subscribe = (
        _inbox(identity),
        subjects.node_control_subject(cluster, node),
        subjects.snapshot_republish_subject(cluster),
    )
    return Permissions(
        publish_allow=tuple(publish),
        publish_deny=_denied_to_readers(),
        subscribe_allow=subscribe,
        # Answers go to the requester's inbox, which only this one reply may reach.
        allow_responses=True,
    )


def _leaf(identity: Identity) -> Permissions:
    """A leaf server's connection to the hub carries only node-loader traffic of its cluster:
    the union of what those loaders may do (cluster-wide node-state and control subjects),
    every inbox of its cluster's node-loaders (one pattern: a loader added after the leaf
    connected is covered, and a connection keeps the permissions it connected with), and
    replies to the inboxes of the operators that may control its cluster. The leaf enforces
    each loader's own permissions on its clients; this bounds what the leaf itself may send
    into and receive from the hub."""
    cluster = identity.cluster
    # The leaf's account maps its clients' $JS.API and $KV subjects into the hub's domain.
    publish = [
        *map(
            _to_hub_domain,
            [
                subjects.kv_subject(subjects.NODE_STATE_BUCKET, f"{cluster}.>"),
                *_stream_info(*STREAMS),
                *_reads(_SNAPSHOTS, _snapshot_key(cluster)),
                *_watches(_SNAPSHOTS),
            ],
        ),
        subjects.warnings_subject(cluster),
        inbox_pattern(Role.OPERATOR, cluster),
        inbox_pattern(Role.OPERATOR, ALL_CLUSTERS),
    ]
    subscribe = [
        f"{subjects.PREFIX}.{cluster}.nodes.*.control",
        subjects.snapshot_republish_subject(cluster),
        inbox_pattern(Role.NODE_LOADER, cluster),
    ]
    return Permissions(
        publish_allow=tuple(publish),
        publish_deny=_in_hub_domain(_denied_to_readers()),
        subscribe_allow=tuple(subscribe),
    )


def _operator(identity: Identity) -> Permissions:
    cluster = identity.cluster
    control = f"{subjects.PREFIX}.{cluster}.nodes.*.control"
    # STREAM.NAMES: nats-py finds the stream of a subject with it (a pull subscription).
    publish = [control, f"{_API}.STREAM.NAMES", *_stream_info(*STREAMS)]
    for stream in STREAMS:
        publish += _reads(stream)
        publish += _watches(stream)
        publish += [
            f"{_API}.CONSUMER.DURABLE.CREATE.{stream}.>",
            f"{_API}.CONSUMER.INFO.{stream}.>",
            f"{_API}.CONSUMER.MSG.NEXT.{stream}.>",
            f"$JS.ACK.{stream}.>",
        ]
    events = tuple(f"{subjects.PREFIX}.{cluster}.{kind}" for kind in ("warnings", "renders"))
    return Permissions(
        publish_allow=tuple(publish),
        publish_deny=("$KV.>", *_STREAM_ADMIN, *_DESTRUCTIVE),
        subscribe_allow=(_inbox(identity), *events),
    )


def _denied_to_readers() -> tuple[str, ...]:
    snapshots = subjects.kv_subject(subjects.SNAPSHOT_BUCKET, ">")
    return (snapshots, *_STREAM_ADMIN, *_DESTRUCTIVE)


# --------------------------------------------------------------------------- server config


class TlsOptions(msgspec.Struct, frozen=True, kw_only=True):
    """TLS on the client port. TLS comes before any NATS protocol (`handshake_first`), so a
    client that wants TLS cannot be talked down to plain text."""

    cert_file: str
    key_file: str
    ca_file: str = ""
    verify: bool = False  # mutual TLS: every client presents a certificate from ca_file
    timeout: float = 2.0


class ClusterOptions(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    listen: str  # host:port for routes
    routes: tuple[str, ...] = ()
    connect_retries: int = 0
    tls: TlsOptions | None = None  # mutual TLS between servers (verify is forced on)


class LeafRemote(msgspec.Struct, frozen=True, kw_only=True):
    """A leaf server's connection to the hub, as the leaf identity whose seed is in the
    environment variable `seed_variable` of the leaf's process (never in the file)."""

    urls: tuple[str, ...]
    seed_variable: str = "APILANE_LEAF_NKEY_SEED"
    tls: TlsOptions | None = None  # verify the hub (ca_file); no client certificate needed


class LeafnodeOptions(msgspec.Struct, frozen=True, kw_only=True):
    """`listen`: a hub accepting leaf servers (each authenticates as a LEAF identity from
    the accounts block). `remotes`: this server is a leaf of those hubs."""

    listen: str = ""
    remotes: tuple[LeafRemote, ...] = ()
    tls: TlsOptions | None = None  # on the hub's leaf port


class ServerOptions(msgspec.Struct, frozen=True, kw_only=True):
    listen: str  # host:port for clients
    http: str = ""  # host:port for the monitoring endpoint (/healthz); empty: none
    server_name: str = ""  # a leading `$` names an environment variable (`$POD_NAME`)
    store_dir: str = ""
    max_memory_store: str = ""
    max_file_store: str = ""
    pid_file: str = ""
    lame_duck_duration: str = ""
    lame_duck_grace_period: str = ""
    tls: TlsOptions | None = None
    cluster: ClusterOptions | None = None
    leafnodes: LeafnodeOptions | None = None
    # A leaf without JetStream forwards every $JS.API request to the hub it is a leaf of.
    jetstream: bool = True
    jetstream_domain: str = ""  # HUB_DOMAIN on a hub that accepts leaves
    # Where the accounts block comes from: inline (empty) or this file (relative to the
    # config file's directory: nats-server joins even an absolute path to it), generated apart
    # by `render_accounts` (so keys can live in a Secret while the rest is committed).
    accounts_include: str = ""


def render_server_config(
    options: ServerOptions, identities: Sequence[Identity] | None = None
) -> str:
    """A complete nats-server configuration. With `options.accounts_include` the identities
    are not needed (and not allowed: they belong in the included file)."""
    if options.accounts_include and identities:
        raise NatsAuthError("accounts come from the included file, not from identities here")
    if not options.accounts_include and identities is None:
        raise NatsAuthError("no identities and no accounts file: nothing would authenticate")
    lines = [
        "# Generated by apilane.runtime.natsauth (render_server_config); do not edit by hand.",
        *_server_lines(options),
    ]
    if options.accounts_include:
        lines.append(f"include {_quote(options.accounts_include)}")
    else:
        lines.append(render_accounts(identities or (), jetstream=options.jetstream))
    return "\n".join(lines).rstrip("\n") + "\n"


def _server_lines(options: ServerOptions) -> list[str]:
    lines = []
    if options.server_name:
        name = options.server_name
        lines.append(f"server_name: {name if name.startswith('$') else _quote(name)}")
    lines.append(f"listen: {_quote(options.listen)}")
    settings = (
        ("http", options.http),
        ("pid_file", options.pid_file),
        ("lame_duck_duration", options.lame_duck_duration),
        ("lame_duck_grace_period", options.lame_duck_grace_period),
    )
    lines += [f"{key}: {_quote(value)}" for key, value in settings if value]
    jetstream = (
        ("store_dir", options.store_dir),
        ("max_memory_store", options.max_memory_store),
        ("max_file_store", options.max_file_store),
        ("domain", options.jetstream_domain),
    )
    if options.jetstream:
        lines.append(_block("jetstream", [f"{k}: {_quote(v)}" for k, v in jetstream if v]))
    if options.tls is not None:
        lines.append(_block("tls", [*_tls_lines(options.tls), "handshake_first: true"]))
    if options.cluster is not None:
        lines.append(_cluster_block(options.cluster))
    if options.leafnodes is not None:
        lines.append(_leafnodes_block(options.leafnodes))
    return lines


def _leafnodes_block(leafnodes: LeafnodeOptions) -> str:
    lines = []
    if leafnodes.listen:
        lines.append(f"listen: {_quote(leafnodes.listen)}")
        if leafnodes.tls is not None:
            lines.append(_block("tls", _tls_lines(leafnodes.tls)))
    remotes = []
    for remote in leafnodes.remotes:
        subjects.check_token(remote.seed_variable, "seed variable")
        body = [
            _list("urls", remote.urls),
            f"account: {_quote(ACCOUNT)}",
            # Unquoted: the value of the environment variable, so the seed stays out of files.
            f"nkey: ${remote.seed_variable}",
        ]
        if remote.tls is not None and remote.tls.ca_file:
            body.append(_block("tls", [f"ca_file: {_quote(remote.tls.ca_file)}"]))
        remotes.append(_block("", body).lstrip())
    if remotes:
        lines.append(_block("remotes", remotes, brackets=("[", "]"), separator=": "))
    return _block("leafnodes", lines)


def _tls_lines(tls: TlsOptions, *, verify: bool | None = None) -> list[str]:
    lines = [f"cert_file: {_quote(tls.cert_file)}", f"key_file: {_quote(tls.key_file)}"]
    if tls.ca_file:
        lines.append(f"ca_file: {_quote(tls.ca_file)}")
    lines.append(f"verify: {_bool(tls.verify if verify is None else verify)}")
    lines.append(f"timeout: {tls.timeout:g}")
    return lines


def _cluster_block(cluster: ClusterOptions) -> str:
    lines = [f"name: {_quote(cluster.name)}", f"listen: {_quote(cluster.listen)}"]
    if cluster.routes:
        lines.append(_list("routes", cluster.routes))
    if cluster.connect_retries:
        lines.append(f"connect_retries: {cluster.connect_retries}")
    if cluster.tls is not None:
        # A route is a full member of the cluster: only servers with a certificate join.
        lines.append(_block("tls", _tls_lines(cluster.tls, verify=True)))
    return _block("cluster", lines)


def render_accounts(identities: Sequence[Identity], *, jetstream: bool = True) -> str:
    """The accounts block: one account with JetStream, one user per identity. A leaf's
    account has no JetStream of its own: with it, the hub would not answer the leaf's
    clients' JetStream requests (both sides would claim the same, empty, domain)."""
    validate(identities)
    users = [_user(identity, on_leaf=not jetstream) for identity in identities]
    settings = ["jetstream: enabled"]
    if not jetstream:
        mapped = [f"{_quote(k)}: {_quote(v)}" for k, v in _LEAF_MAPPINGS.items()]
        settings = [_block("mappings", mapped)]
    account = _block(ACCOUNT, [*settings, _block("users", users, brackets=("[", "]"))])
    return _block("accounts", [account]) + "\n"


# A leaf's account mapping: its clients' JetStream subjects, into the hub's domain (a leaf
# forwards neither `$JS.API` nor `$KV` itself; the hub answers them under `$JS.<domain>.API`).
_LEAF_MAPPINGS: Final = {f"{_API}.>": f"{_HUB_API}.>", "$KV.>": f"{_HUB_API}.$KV.>"}


def _to_hub_domain(subject: str) -> str:
    for source, target in _LEAF_MAPPINGS.items():
        prefix = source.removesuffix(">")
        if subject.startswith(prefix):
            return target.removesuffix(">") + subject.removeprefix(prefix)
    return subject


def _in_hub_domain(subjects_: Sequence[str]) -> tuple[str, ...]:
    """`subjects_` and, for each JetStream subject, the same in the hub's domain."""
    mapped = [_to_hub_domain(s) for s in subjects_ if _to_hub_domain(s) != s]
    return (*subjects_, *mapped)


def _user(identity: Identity, *, on_leaf: bool = False) -> str:
    allowed = permissions(identity)
    if on_leaf:
        # A leaf checks a client's publish after its account's mapping into the hub domain.
        allowed = msgspec.structs.replace(
            allowed,
            publish_allow=_in_hub_domain(allowed.publish_allow),
            publish_deny=_in_hub_domain(allowed.publish_deny),
        )
    publish = [_list("allow", allowed.publish_allow), _list("deny", allowed.publish_deny)]
    body = [
        _block("publish", publish),
        _block("subscribe", [_list("allow", allowed.subscribe_allow)]),
    ]
    if allowed.allow_responses:
        body.append("allow_responses: true")
    return "\n".join(
        [
            f"# {identity.name}",
            "{",
            f"  nkey: {_quote(identity.public_key)}",
            _indent(_block("permissions", body)),
            "}",
        ]
    )


def _quote(value: str) -> str:
    # Quoted, a `$` is literal (unquoted it names a variable): JSON strings are valid here.
    return json.dumps(value)


def _bool(value: bool) -> str:
    return "true" if value else "false"


def _list(key: str, values: Sequence[str]) -> str:
    return _block(key, [_quote(v) for v in values], brackets=("[", "]"), separator=": ")


def _block(
    name: str, lines: Sequence[str], *, brackets: tuple[str, str] = ("{", "}"), separator: str = " "
) -> str:
    opening, closing = brackets
    if not lines:
        return f"{name}{separator}{opening}{closing}"
    return "\n".join([f"{name}{separator}{opening}", *map(_indent, lines), closing])


def _indent(text: str) -> str:
    return "\n".join(f"  {line}" if line else line for line in text.split("\n"))


# --------------------------------------------------------------------------- nkeys


def new_user_seed() -> str:
    """A fresh user nkey seed (`SU…`), from the OS's random source."""
    return bytes(nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)).decode()


def public_key(seed: str) -> str:
    """The public key (`U…`) of a user seed; NatsAuthError for anything else."""
    if not seed.startswith("SU"):
        raise NatsAuthError("not a NATS user nkey seed (it must start with SU)")
    try:
        pair = nkeys.from_seed(bytearray(seed.encode()))
    except nkeys.NkeysError as exc:
        raise NatsAuthError(f"not a valid nkey seed: {exc}") from exc
    try:
        return bytes(pair.public_key).decode()
    finally:
        pair.wipe()


def check_public_key(key: str) -> str:
    if len(key) != 56 or not key.startswith("U") or not key.isalnum() or not key.isupper():
        raise NatsAuthError(f"{key!r} is not a NATS user public key (56 characters, U…)")
    return key


def read_seed(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError as exc:
        raise NatsAuthError(f"cannot read the nkey seed {path}: {exc.strerror}") from exc


# Every apilane inbox starts here; nats-py makes `<prefix>.<nuid>` (and `<prefix>.<nuid>.*`
# for its request multiplexer), so an identity's `<prefix>.>` covers all of them.
INBOX_ROOT: Final = "_INBOX.apilane"
# The scope token of an operator over every cluster: not a cluster name (those are letters,
# digits, '-' and '_'), so no cluster's pattern can cover it, nor it a cluster's.
_ALL_CLUSTERS_SCOPE: Final = "~all"


def inbox_prefix_for(role: Role, cluster: str, key: str) -> str:
    """The only inbox an identity may subscribe to (nats-py's `inbox_prefix`):
    `_INBOX.apilane.<cluster>.<role>.<public key>`, `_INBOX.apilane.~all.operator.<key>` for
    an operator over every cluster."""
    return f"{inbox_pattern(role, cluster).removesuffix('>')}{check_public_key(key)}"


def inbox_pattern(role: Role, cluster: str) -> str:
    """Every inbox of `role`'s identities in `cluster` (of every-cluster operators for `*`)."""
    if cluster == ALL_CLUSTERS:
        if role is not Role.OPERATOR:
            raise NatsAuthError(f"{role}: only an operator may span every cluster")
        scope = _ALL_CLUSTERS_SCOPE
    else:
        # One token, no wildcard: nobody can widen a pattern built from it.
        scope = subjects.check_token(cluster, "cluster name")
    return f"{INBOX_ROOT}.{scope}.{Role(role)}.>"


def provision(identities: Sequence[Identity], seeds_dir: Path) -> tuple[Identity, ...]:
    """The identities with their public keys, from the seeds under `seeds_dir`; a seed that
    is missing is made (mode 0600), one that exists is kept. Identities that already carry
    a public key are left alone (their seed is kept elsewhere)."""
    provisioned = []
    for identity in identities:
        if identity.public_key:
            provisioned.append(identity)
            continue
        path = seeds_dir / identity.seed_path
        if not path.exists():
            write_seed(path, new_user_seed())
        provisioned.append(identity.with_key(public_key(read_seed(path))))
    return tuple(provisioned)


def write_seed(path: Path, seed: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as out:
        out.write(seed + "\n")


# --------------------------------------------------------------------------- identities file


class _ClusterEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    nodes: list[str] = []
    operator: str = ""  # `*`: this cluster's operator reads and controls every cluster


class _IdentitiesFile(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    cluster: list[_ClusterEntry]
    # identity name -> public key, for seeds kept elsewhere (made on the node itself, say)
    public_keys: dict[str, str] = {}


def parse_identities(text: str) -> tuple[Identity, ...]:
    """The identities a TOML file lists: per `[[cluster]]`, its `nodes`, and an optional
    `[public_keys]` table. Keys not given there come from `provision`."""
    try:
        document = msgspec.toml.decode(text.encode(), type=_IdentitiesFile)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise NatsAuthError(f"bad identities file: {exc}") from exc
    found: list[Identity] = []
    for entry in document.cluster:
        found += identities_for(entry.name, entry.nodes, operator_cluster=entry.operator or None)
    return _with_public_keys(found, document.public_keys)


def _with_public_keys(
    identities: Sequence[Identity], keys: Mapping[str, str]
) -> tuple[Identity, ...]:
    names = {identity.name for identity in identities}
    unknown = sorted(set(keys) - names)
    if unknown:
        raise NatsAuthError(f"public_keys names identities nobody lists: {', '.join(unknown)}")
    return tuple(
        identity.with_key(keys[identity.name]) if identity.name in keys else identity
        for identity in identities
    )


def load_identities(path: Path) -> tuple[Identity, ...]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise NatsAuthError(f"cannot read the identities file {path}: {exc.strerror}") from exc
    return parse_identities(text)


# --------------------------------------------------------------------------- the permission table


def permission_table(identities: Sequence[Identity]) -> str:
    """A Markdown table of what each identity may publish and subscribe to (for humans)."""
    rows = ["| identity | publish allow | publish deny | subscribe allow |", "|---|---|---|---|"]
    for identity in identities:
        allowed = permissions(identity)
        responses = " + replies to requests it receives" if allowed.allow_responses else ""
        rows.append(
            f"| {identity.name} | {_cell(allowed.publish_allow)}{responses} "
            f"| {_cell(allowed.publish_deny)} | {_cell(allowed.subscribe_allow)} |"
        )
    return "\n".join(rows) + "\n"


def _cell(values: Sequence[str]) -> str:
    return "<br>".join(f"`{value}`" for value in values)


# --------------------------------------------------------------------------- deployments

# The server options of deploy/nats.yaml and docker-compose.yml (their committed nats.conf is
# `render_server_config` of these; tests keep them equal). The accounts come from a file the
# installer (or compose's nats-auth step) generates from the identities with `accounts`.
_K8S_TLS: Final = TlsOptions(
    cert_file="/etc/nats/tls/tls.crt",
    key_file="/etc/nats/tls/tls.key",
    ca_file="/etc/nats/tls/ca.crt",
)
PROFILES: Final = {
    "kubernetes": ServerOptions(
        server_name="$POD_NAME",
        listen="0.0.0.0:4222",
        http="0.0.0.0:8222",
        pid_file="/var/run/nats/nats.pid",
        lame_duck_duration="30s",
        lame_duck_grace_period="10s",
        store_dir="/data/jetstream",
        max_file_store="1G",
        max_memory_store="64M",
        tls=_K8S_TLS,
        cluster=ClusterOptions(
            name="apilane",
            listen="0.0.0.0:6222",
            routes=tuple(f"nats://nats-{n}.nats-headless.apilane.svc:6222" for n in range(3)),
            connect_retries=120,
            tls=_K8S_TLS,
        ),
        accounts_include="../auth/accounts.conf",
    ),
    "compose": ServerOptions(
        server_name="apilane-compose",
        listen="0.0.0.0:4222",
        http="0.0.0.0:8222",
        store_dir="/data",
        tls=TlsOptions(
            cert_file="/etc/nats/auth/server.crt",
            key_file="/etc/nats/auth/server.key",
            ca_file="/etc/nats/auth/ca.crt",
            verify=True,
        ),
        accounts_include="../auth/accounts.conf",
    ),
}


SECRET_PREFIX: Final = "apilane-nats"
_MAX_SECRET_KEY: Final = 253  # Kubernetes: a Secret's data keys are at most 253 characters


def kubernetes_secrets(
    identities: Sequence[Identity], seeds_dir: Path, *, ca_pem: bytes, namespace: str = "apilane"
) -> dict[str, object]:
    """The Secrets deploy/ mounts, as one `v1/List` for `kubectl apply -f -`:
    `apilane-nats-accounts` (the server's accounts.conf), and per role its seed and the CA:
    `apilane-nats-discovery`, `-renderer`, `-operator` (`seed.nk`, `ca.crt`) and
    `apilane-nats-node-loader` (`<node>.nk` per node, `ca.crt`; each pod mounts only its
    own node's key). The server's TLS Secret `apilane-nats-tls` is not among them: it comes
    from cert-manager or your CA (deploy/README.md)."""
    import base64

    if len({i.cluster for i in identities}) != 1:
        raise NatsAuthError("one installation serves one cluster: its identities only")
    keyed = provision(identities, seeds_dir)
    ca = base64.b64encode(ca_pem).decode()
    data: dict[str, dict[str, str]] = {
        f"{SECRET_PREFIX}-accounts": {
            "accounts.conf": base64.b64encode(render_accounts(keyed).encode()).decode()
        }
    }
    for listed, identity in zip(identities, keyed, strict=True):
        if listed.public_key:
            continue  # its seed is kept elsewhere (made on the node, say): nothing to ship
        seed = read_seed(seeds_dir / identity.seed_path)
        name = f"{SECRET_PREFIX}-{identity.role}"
        key = f"{identity.node}.nk" if identity.role is Role.NODE_LOADER else "seed.nk"
        if len(key) > _MAX_SECRET_KEY:
            raise NatsAuthError(
                f"{identity.name}: a Secret key holds {_MAX_SECRET_KEY} characters, not a node "
                "name this long: make its seed on the node and list its public key instead"
            )
        entry = data.setdefault(name, {"ca.crt": ca})
        entry[key] = base64.b64encode((seed + "\n").encode()).decode()
    items = [
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "type": "Opaque",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "apilane"},
            },
            "data": entries,
        }
        for name, entries in data.items()
    ]
    return {"apiVersion": "v1", "kind": "List", "items": items}


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m apilane.runtime.natsauth`: the configuration generator's command line."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m apilane.runtime.natsauth")
    commands = parser.add_subparsers(dest="command", required=True)
    server = commands.add_parser("server-config", help="a deployment's nats.conf")
    server.add_argument("profile", choices=sorted(PROFILES))
    for name, text in (
        ("accounts", "the accounts block (users and permissions), seeds made where missing"),
        ("table", "the permission table, as Markdown"),
        ("kubernetes-secrets", "deploy/'s Secrets as a JSON v1/List, seeds made where missing"),
    ):
        command = commands.add_parser(name, help=text)
        command.add_argument("--identities", type=Path, required=True, help="a TOML file")
        command.add_argument("--seeds", type=Path, required=True, help="one seed file each")
        if name == "kubernetes-secrets":
            command.add_argument("--ca", type=Path, required=True, help="the NATS server's CA")
            command.add_argument("--namespace", default="apilane")
    args = parser.parse_args(argv)
    try:
        if args.command == "server-config":
            sys.stdout.write(render_server_config(PROFILES[args.profile]))
            return 0
        listed = load_identities(args.identities)
        if args.command == "kubernetes-secrets":
            secrets = kubernetes_secrets(
                listed, args.seeds, ca_pem=args.ca.read_bytes(), namespace=args.namespace
            )
            sys.stdout.write(json.dumps(secrets, indent=2) + "\n")
            return 0
        render = render_accounts if args.command == "accounts" else permission_table
        sys.stdout.write(render(provision(listed, args.seeds)))
    except (NatsAuthError, OSError) as exc:
        print(f"natsauth: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
