"""apilane.runtime.natsauth: identities in, nats-server configuration out (the pure part, plus
`nats-server -t` on what it renders). What the real server then allows and refuses is in
test_nats_permissions.py."""

from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import msgspec
import pytest

from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.runtime import natsauth
from apilane.runtime.natsauth import ALL_CLUSTERS, Identity, NatsAuthError, Role
from apilane.testing.nats import find_nats_server
from apilane.testing.nats import subject_matches as matches
from apilane.testing.pki import Pki

pytestmark = [pytest.mark.unit]

SNAPSHOT_KEYS = subjects.kv_subject(subjects.SNAPSHOT_BUCKET, ">")


def keyed(identities: tuple[Identity, ...]) -> tuple[Identity, ...]:
    return tuple(i.with_key(natsauth.public_key(natsauth.new_user_seed())) for i in identities)


@pytest.fixture(scope="module")
def two_clusters() -> tuple[Identity, ...]:
    return keyed(
        natsauth.identities_for("east", ["node-a", "node-b.example"])
        + natsauth.identities_for("west", ["node-a"], operator_cluster=ALL_CLUSTERS)
    )


def test_a_cluster_gets_discovery_renderer_operator_and_one_loader_per_node() -> None:
    identities = natsauth.identities_for("east", ["n1", "n2"])
    assert [(i.role, i.cluster, i.node) for i in identities] == [
        (Role.DISCOVERY, "east", ""),
        (Role.RENDERER, "east", ""),
        (Role.OPERATOR, "east", ""),
        (Role.NODE_LOADER, "east", "n1"),
        (Role.NODE_LOADER, "east", "n2"),
    ]
    assert len({i.name for i in identities}) == len({i.seed_path for i in identities}) == 5


def test_only_discovery_may_publish_to_the_snapshot_key(two_clusters: tuple[Identity, ...]) -> None:
    for identity in two_clusters:
        allowed = natsauth.permissions(identity)
        snapshot_writes = [s for s in allowed.publish_allow if s.startswith("$KV.apilane_v1_snap")]
        if identity.role is Role.DISCOVERY:
            assert snapshot_writes == [f"$KV.{subjects.SNAPSHOT_BUCKET}.{identity.cluster}"]
        else:
            assert snapshot_writes == []
            assert SNAPSHOT_KEYS in allowed.publish_deny or "$KV.>" in allowed.publish_deny


def test_each_node_loader_may_write_only_its_own_node_state(
    two_clusters: tuple[Identity, ...],
) -> None:
    for identity in two_clusters:
        writes = [
            s
            for s in natsauth.permissions(identity).publish_allow
            if s.startswith(f"$KV.{subjects.NODE_STATE_BUCKET}")
        ]
        if identity.role is Role.NODE_LOADER:
            key = subjects.node_state_key(identity.cluster, identity.node)
            assert writes == [subjects.kv_subject(subjects.NODE_STATE_BUCKET, key)]
        else:
            assert writes == []


def test_control_subjects_are_sent_by_operators_and_received_by_their_node_only(
    two_clusters: tuple[Identity, ...],
) -> None:
    for identity in two_clusters:
        allowed = natsauth.permissions(identity)
        sends = [s for s in allowed.publish_allow if s.endswith(".control")]
        receives = [s for s in allowed.subscribe_allow if s.endswith(".control")]
        if identity.role is Role.OPERATOR:
            assert sends == [f"apilane.v1.{identity.cluster}.nodes.*.control"] and not receives
        elif identity.role is Role.NODE_LOADER:
            assert not sends
            assert receives == [subjects.node_control_subject(identity.cluster, identity.node)]
            assert allowed.allow_responses
        else:
            assert not sends and not receives and not allowed.allow_responses


def test_only_the_provisioner_may_create_or_update_and_nobody_may_destroy(
    two_clusters: tuple[Identity, ...],
) -> None:
    destructive = ("DELETE", "PURGE", "MSG.DELETE", "RESTORE", "SNAPSHOT")
    for identity in two_clusters:
        allowed = natsauth.permissions(identity)
        admin = [s for s in allowed.publish_allow if ".STREAM.CREATE." in s or ".UPDATE." in s]
        assert bool(admin) is (identity.role is Role.DISCOVERY), identity.name
        for verb in destructive:
            assert f"$JS.API.STREAM.{verb}.>" in allowed.publish_deny, (identity.name, verb)
            assert not any(f".STREAM.{verb}." in s for s in allowed.publish_allow)
        if identity.role is not Role.DISCOVERY:
            assert {"$JS.API.STREAM.CREATE.>", "$JS.API.STREAM.UPDATE.>"} <= set(
                allowed.publish_deny
            )


def test_renderer_and_node_loader_consume_only_the_snapshot_stream(
    two_clusters: tuple[Identity, ...],
) -> None:
    for identity in two_clusters:
        if identity.role in (Role.RENDERER, Role.NODE_LOADER):
            consumers = [s for s in natsauth.permissions(identity).publish_allow if "CONSUMER" in s]
            assert consumers and all(".KV_apilane_v1_snapshots" in s for s in consumers)


def test_each_identity_subscribes_to_its_own_inbox_only(
    two_clusters: tuple[Identity, ...],
) -> None:
    prefixes = [i.inbox_prefix for i in two_clusters]
    assert len(set(prefixes)) == len(prefixes)
    for identity in two_clusters:
        inboxes = [
            s for s in natsauth.permissions(identity).subscribe_allow if s.startswith("_INBOX")
        ]
        scope = "~all" if identity.cluster == ALL_CLUSTERS else identity.cluster
        assert inboxes == [f"_INBOX.apilane.{scope}.{identity.role}.{identity.public_key}.>"]
        assert ">" not in natsauth.permissions(identity).subscribe_allow


def test_no_identitys_inbox_pattern_covers_another_identitys_replies(
    two_clusters: tuple[Identity, ...],
) -> None:
    """Each own-inbox allow covers what nats-py makes under the prefix (`<prefix>.<nuid>`,
    and `<prefix>.<nuid>.*` for requests), and nobody else's inbox."""
    for identity in two_clusters:
        [own] = [s for s in natsauth.permissions(identity).subscribe_allow if s.startswith("_")]
        for other in two_clusters:
            reply = f"{other.inbox_prefix}.Nuid0123456789abcdefgh"
            assert matches(own, reply) is (other == identity), (identity.name, other.name)
            assert matches(own, f"{reply}.7") is (other == identity)


def test_a_role_pattern_covers_that_role_of_that_cluster_only(
    two_clusters: tuple[Identity, ...],
) -> None:
    scopes = {(i.role, i.cluster) for i in two_clusters}
    for role, cluster in scopes:
        pattern = natsauth.inbox_pattern(role, cluster)
        for identity in two_clusters:
            covered = matches(pattern, f"{identity.inbox_prefix}.x")
            assert covered is ((identity.role, identity.cluster) == (role, cluster)), (
                pattern,
                identity.name,
            )


@pytest.mark.parametrize("cluster", ["a.b", "a*", "*.x", ">", "a b", "", "~all"])
def test_an_inbox_scope_is_one_literal_cluster_token(cluster: str) -> None:
    """Nobody widens a pattern through the cluster name: a dot, a wildcard, a space or the
    every-cluster scope token is not a cluster name."""
    key = natsauth.public_key(natsauth.new_user_seed())
    with pytest.raises(ConfigError, match="cluster name"):
        natsauth.inbox_pattern(Role.NODE_LOADER, cluster)
    with pytest.raises(ConfigError, match="cluster name"):
        natsauth.inbox_prefix_for(Role.NODE_LOADER, cluster, key)
    with pytest.raises(ConfigError, match="cluster name"):
        natsauth.identities_for(cluster, ["n"])


def test_only_an_operator_has_an_every_cluster_inbox() -> None:
    key = natsauth.public_key(natsauth.new_user_seed())
    prefix = natsauth.inbox_prefix_for(Role.OPERATOR, ALL_CLUSTERS, key)
    assert prefix == f"_INBOX.apilane.~all.operator.{key}"
    assert natsauth.inbox_pattern(Role.OPERATOR, ALL_CLUSTERS) == "_INBOX.apilane.~all.operator.>"
    with pytest.raises(NatsAuthError, match="only an operator"):
        natsauth.inbox_pattern(Role.NODE_LOADER, ALL_CLUSTERS)
    with pytest.raises(NatsAuthError, match="public key"):
        natsauth.inbox_prefix_for(Role.NODE_LOADER, "c", "U-not-a-key")


def test_only_discovery_subscribes_to_a_snapshot_key_and_only_to_its_own(
    two_clusters: tuple[Identity, ...],
) -> None:
    for identity in two_clusters:
        keys = [
            s
            for s in natsauth.permissions(identity).subscribe_allow
            if s.startswith(f"$KV.{subjects.SNAPSHOT_BUCKET}")
        ]
        if identity.role is Role.DISCOVERY:
            own = subjects.snapshot_key(identity.cluster)
            assert keys == [subjects.kv_subject(subjects.SNAPSHOT_BUCKET, own)]
        else:
            assert keys == [], identity.name


def test_nothing_is_allowed_by_a_bare_wildcard(two_clusters: tuple[Identity, ...]) -> None:
    for identity in two_clusters:
        allowed = natsauth.permissions(identity)
        for subject in (*allowed.publish_allow, *allowed.subscribe_allow):
            assert subject not in (">", "*", "$JS.API.>", "$KV.>", "apilane.>"), identity.name


def test_the_operator_of_every_cluster_reads_and_controls_every_cluster(
    two_clusters: tuple[Identity, ...],
) -> None:
    [everywhere] = [i for i in two_clusters if i.cluster == ALL_CLUSTERS]
    allowed = natsauth.permissions(everywhere)
    assert "apilane.v1.*.nodes.*.control" in allowed.publish_allow
    assert "apilane.v1.*.warnings" in allowed.subscribe_allow


@pytest.mark.parametrize(
    ("identities", "message"),
    [
        ((), "unauthenticated"),
        ((Identity(role=Role.RENDERER, cluster=ALL_CLUSTERS),), "only an operator"),
        ((Identity(role=Role.NODE_LOADER, cluster="c"),), "needs its node"),
        ((Identity(role=Role.DISCOVERY, cluster="c", node="n"),), "only a node-loader"),
        ((Identity(role=Role.DISCOVERY, cluster="c"),), "not a NATS user public key"),
    ],
)
def test_validation_refuses_unsafe_lists(identities: tuple[Identity, ...], message: str) -> None:
    with pytest.raises((NatsAuthError, ConfigError), match=message):
        natsauth.validate(keyed(identities) if "key" not in message else identities)


def test_validation_refuses_twice_listed_identities_and_shared_keys() -> None:
    [discovery] = keyed((Identity(role=Role.DISCOVERY, cluster="c"),))
    with pytest.raises(NatsAuthError, match="twice"):
        natsauth.validate([discovery, discovery])
    renderer = Identity(role=Role.RENDERER, cluster="c", public_key=discovery.public_key)
    with pytest.raises(NatsAuthError, match="shares its nkey"):
        natsauth.validate([discovery, renderer])


def test_rendering_is_a_pure_function_of_its_inputs(two_clusters: tuple[Identity, ...]) -> None:
    options = natsauth.ServerOptions(listen="127.0.0.1:4222", store_dir="/tmp/js")
    first = natsauth.render_server_config(options, two_clusters)
    assert first == natsauth.render_server_config(options, two_clusters)
    for identity in two_clusters:
        assert f'nkey: "{identity.public_key}"' in first
        assert f"# {identity.name}" in first
    # No seed ever reaches the configuration.
    assert '"SU' not in first


def test_an_included_accounts_file_replaces_the_identities() -> None:
    options = natsauth.ServerOptions(listen="0.0.0.0:4222", accounts_include="auth/accounts.conf")
    text = natsauth.render_server_config(options)
    assert 'include "auth/accounts.conf"' in text and "accounts {" not in text
    with pytest.raises(NatsAuthError):
        natsauth.render_server_config(natsauth.ServerOptions(listen="0.0.0.0:4222"))


def test_seeds_are_made_once_and_kept(tmp_path: Path) -> None:
    identities = natsauth.identities_for("c", ["n1"])
    first = natsauth.provision(identities, tmp_path)
    again = natsauth.provision(identities, tmp_path)
    assert first == again
    seed_file = tmp_path / "c" / "node-loader" / "n1.nk"
    assert seed_file.stat().st_mode & 0o777 == 0o600
    seed = natsauth.read_seed(seed_file)
    assert natsauth.public_key(seed) == first[-1].public_key
    with pytest.raises(NatsAuthError):
        natsauth.public_key("SAnot-a-user-seed")


def test_a_node_name_of_253_characters_gets_a_seed_file_name_that_fits(tmp_path: Path) -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    other = longest[:-1] + "e"
    loaders = natsauth.identities_for("default", [longest, other])[3:]
    paths = [Path(identity.seed_path) for identity in loaders]
    assert all(len(path.name.encode()) <= 255 for path in paths)
    assert paths[0] != paths[1]  # distinct names stay distinct
    provisioned = natsauth.provision(loaders, tmp_path)
    assert all(identity.public_key for identity in provisioned)
    # A Secret key cannot hold such a name: refused with a typed error, not a bad Secret.
    with pytest.raises(NatsAuthError, match="Secret key holds 253 characters"):
        natsauth.kubernetes_secrets(
            natsauth.identities_for("default", [longest]), tmp_path, ca_pem=b"a CA"
        )


def test_the_identities_file_names_clusters_nodes_and_optional_public_keys() -> None:
    key = natsauth.public_key(natsauth.new_user_seed())
    text = f"""
[[cluster]]
name = "east"
nodes = ["n1", "n2.example"]
operator = "*"

[public_keys]
"node-loader:east:n2.example" = "{key}"
"""
    identities = natsauth.parse_identities(text)
    assert [i.name for i in identities] == [
        "discovery:east",
        "renderer:east",
        "operator:all",
        "node-loader:east:n1",
        "node-loader:east:n2.example",
    ]
    assert identities[-1].public_key == key and identities[0].public_key == ""
    for bad in ("[[cluster]]\nname='e'\nnodez=[]\n", f'{text}\n"nobody:x" = "{key}"\n'):
        with pytest.raises(NatsAuthError):
            natsauth.parse_identities(bad)


def test_the_permission_table_lists_every_identity(two_clusters: tuple[Identity, ...]) -> None:
    table = natsauth.permission_table(two_clusters)
    assert table.count("\n") == len(two_clusters) + 2
    assert "replies to requests it receives" in table


# --------------------------------------------------------------------------- the real parser


def _rebased(options: natsauth.ServerOptions, root: Path, tls: natsauth.TlsOptions) -> object:
    """The options with every path moved under `root` (the server only checks them here)."""
    cluster = options.cluster and msgspec.structs.replace(options.cluster, tls=tls)
    return msgspec.structs.replace(
        options,
        store_dir=str(root / "store"),
        pid_file=str(root / "nats.pid") if options.pid_file else "",
        tls=tls,
        cluster=cluster,
    )


@pytest.mark.integration
@pytest.mark.nats
@pytest.mark.parametrize("profile", sorted(natsauth.PROFILES))
def test_nats_server_accepts_each_deployment_profile(profile: str, tmp_path: Path) -> None:
    """`nats-server -t` (parse and check only: nothing listens, no route is dialled)."""
    pki = Pki(tmp_path / "tls")
    pair = pki.issue("server", common_name="nats", dns_names=["nats"], server=True, client=True)
    tls = natsauth.TlsOptions(
        cert_file=str(pair.cert_path), key_file=str(pair.key_path), ca_file=str(pki.ca_path)
    )
    options = _rebased(natsauth.PROFILES[profile], tmp_path, tls)
    assert isinstance(options, natsauth.ServerOptions)
    config = tmp_path / "config" / "nats.conf"
    config.parent.mkdir()
    config.write_text(natsauth.render_server_config(options))
    accounts = tmp_path / "config" / options.accounts_include
    accounts.parent.mkdir(parents=True, exist_ok=True)
    identities = natsauth.provision(natsauth.identities_for("c", ["n"]), tmp_path / "seeds")
    accounts.write_text(natsauth.render_accounts(identities))
    checked = subprocess.run(
        [find_nats_server(), "-t", "-c", str(config)],
        capture_output=True,
        text=True,
        env=os.environ | {"POD_NAME": "nats-0"},
        check=False,
        timeout=30,
    )
    assert checked.returncode == 0, checked.stderr + checked.stdout
    assert "is valid" in checked.stderr + checked.stdout


def test_every_role_appears_in_the_permission_builders() -> None:
    for role, cluster in itertools.product(Role, ("c",)):
        node = "n" if role is Role.NODE_LOADER else ""
        [identity] = keyed((Identity(role=role, cluster=cluster, node=node),))
        assert natsauth.permissions(identity).subscribe_allow
