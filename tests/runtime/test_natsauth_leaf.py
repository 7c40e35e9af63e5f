"""A leaf server's identity and configuration (natsauth): what a leaf may carry to the hub."""

from __future__ import annotations

import pytest

from apilane.model import subjects
from apilane.runtime import natsauth
from apilane.runtime.natsauth import ALL_CLUSTERS, Identity, NatsAuthError, Role
from apilane.testing.nats import subject_matches as matches

pytestmark = pytest.mark.unit


def keyed(identities: tuple[Identity, ...]) -> tuple[Identity, ...]:
    return tuple(i.with_key(natsauth.public_key(natsauth.new_user_seed())) for i in identities)


@pytest.fixture(scope="module")
def listed() -> tuple[Identity, ...]:
    return keyed(
        (
            *natsauth.identities_for("east", ["node-a", "node-b"]),
            *natsauth.identities_for("west", ["node-c"], operator_cluster=ALL_CLUSTERS),
            Identity(role=Role.LEAF, cluster="east", node="zone-1"),
        )
    )


def test_a_leaf_needs_its_zone_and_is_named_by_it() -> None:
    leaf = Identity(role=Role.LEAF, cluster="east", node="zone-1")
    assert leaf.name == "leaf:east:zone-1"
    assert leaf.seed_path == "east/leaf/zone-1.nk"
    with pytest.raises(NatsAuthError, match="needs its zone"):
        natsauth.validate(keyed((Identity(role=Role.LEAF, cluster="east"),)))


def test_a_leaf_carries_its_clusters_node_loader_traffic_only(
    listed: tuple[Identity, ...],
) -> None:
    leaf = next(i for i in listed if i.role is Role.LEAF)
    allowed = natsauth.permissions(leaf)
    east_loaders = [i for i in listed if i.role is Role.NODE_LOADER and i.cluster == "east"]
    west_loader = next(i for i in listed if i.role is Role.NODE_LOADER and i.cluster == "west")
    # Every inbox of east's node-loaders, with one pattern; nobody else's.
    inboxes = [s for s in allowed.subscribe_allow if s.startswith("_INBOX")]
    assert inboxes == ["_INBOX.apilane.east.node-loader.>"]
    for loader in east_loaders:
        assert matches(inboxes[0], f"{loader.inbox_prefix}.Nuid0123456789abcdefgh")
    for other in listed:
        if other not in east_loaders:
            assert not matches(inboxes[0], f"{other.inbox_prefix}.x"), other.name
    assert not matches(inboxes[0], f"{west_loader.inbox_prefix}.x")
    assert subjects.snapshot_republish_subject("east") in allowed.subscribe_allow
    # Node state of its cluster, through the hub's domain; never a snapshot, never admin.
    assert "$JS.hub.API.$KV.apilane_v1_nodes.east.>" in allowed.publish_allow
    assert "$JS.hub.API.$KV.apilane_v1_snapshots.>" in allowed.publish_deny
    assert "$JS.hub.API.STREAM.CREATE.>" in allowed.publish_deny
    assert not [s for s in allowed.publish_allow if "west" in s or s in (">", "$JS.hub.API.>")]
    # Replies to both operators that may control east's nodes, and to no other inbox.
    replies = [s for s in allowed.publish_allow if s.startswith("_INBOX")]
    assert replies == ["_INBOX.apilane.east.operator.>", "_INBOX.apilane.~all.operator.>"]
    for other in listed:
        may_control_east = other.role is Role.OPERATOR and other.cluster in ("east", ALL_CLUSTERS)
        reaches = any(matches(r, f"{other.inbox_prefix}.x") for r in replies)
        assert reaches is may_control_east, other.name


def test_a_leafs_permissions_do_not_change_when_identities_are_added(
    listed: tuple[Identity, ...],
) -> None:
    """What keeps a connected leaf current: its hub-side user is a function of its own
    identity, so adding a node (or an operator) renders the same leaf user."""
    leaf = next(i for i in listed if i.role is Role.LEAF)
    later = keyed(
        (
            Identity(role=Role.NODE_LOADER, cluster="east", node="node-new"),
            Identity(role=Role.OPERATOR, cluster="east"),
        )
    )
    listed = tuple(i for i in listed if i.name != "operator:east")
    before = leaf_user(natsauth.render_accounts(listed), leaf)
    after = leaf_user(natsauth.render_accounts((*listed, *later)), leaf)
    assert before == after and '"_INBOX.apilane.east.node-loader.>"' in before
    assert matches(
        "_INBOX.apilane.east.node-loader.>", f"{later[0].inbox_prefix}.Nuid0123456789abcdefgh"
    )
    assert matches("_INBOX.apilane.east.operator.>", f"{later[1].inbox_prefix}.x")


def leaf_user(accounts: str, leaf: Identity) -> str:
    """The rendered user block of `leaf`, from its name comment to its closing brace."""
    start = accounts.index(f"# {leaf.name}\n")
    ends = [accounts.find(mark, start + 1) for mark in ("\n      # ", "\n    ]")]
    return accounts[start : min(end for end in ends if end > 0)]


def test_a_leaf_config_maps_jetstream_into_the_hub_domain_and_keeps_its_seed_out(
    listed: tuple[Identity, ...],
) -> None:
    leaf_options = natsauth.ServerOptions(
        listen="127.0.0.1:4222",
        jetstream=False,
        leafnodes=natsauth.LeafnodeOptions(
            remotes=(natsauth.LeafRemote(urls=("nats://hub:7422",)),)
        ),
    )
    text = natsauth.render_server_config(leaf_options, listed)
    assert "jetstream {" not in text and "jetstream: enabled" not in text
    assert '"$JS.API.>": "$JS.hub.API.>"' in text and '"$KV.>": "$JS.hub.API.$KV.>"' in text
    assert "nkey: $APILANE_LEAF_NKEY_SEED" in text and 'nkey: "SU' not in text
    # Each client's permissions hold on the leaf after the mapping, denials included.
    assert '"$JS.hub.API.$KV.apilane_v1_nodes.east.node-a"' in text
    assert '"$JS.hub.API.STREAM.DELETE.>"' in text
    hub = natsauth.ServerOptions(
        listen="127.0.0.1:4222",
        jetstream_domain=natsauth.HUB_DOMAIN,
        leafnodes=natsauth.LeafnodeOptions(listen="0.0.0.0:7422"),
    )
    hub_text = natsauth.render_server_config(hub, listed)
    assert 'domain: "hub"' in hub_text and 'listen: "0.0.0.0:7422"' in hub_text
    assert "mappings" not in hub_text
