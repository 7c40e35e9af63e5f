"""A leaf server's identity and configuration (natsauth): what a leaf may carry to the hub."""

from __future__ import annotations

import pytest

from apilane.model import subjects
from apilane.runtime import natsauth
from apilane.runtime.natsauth import ALL_CLUSTERS, Identity, NatsAuthError, Role

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
    allowed = natsauth.permissions(leaf, listed)
    east_loaders = [i for i in listed if i.role is Role.NODE_LOADER and i.cluster == "east"]
    west_loader = next(i for i in listed if i.role is Role.NODE_LOADER and i.cluster == "west")
    inboxes = [s for s in allowed.subscribe_allow if s.startswith("_INBOX_")]
    assert inboxes == [f"{i.inbox_prefix}.>" for i in east_loaders]
    assert f"{west_loader.inbox_prefix}.>" not in allowed.subscribe_allow
    assert subjects.snapshot_republish_subject("east") in allowed.subscribe_allow
    # Node state of its cluster, through the hub's domain; never a snapshot, never admin.
    assert "$JS.hub.API.$KV.apilane_v1_nodes.east.>" in allowed.publish_allow
    assert "$JS.hub.API.$KV.apilane_v1_snapshots.>" in allowed.publish_deny
    assert "$JS.hub.API.STREAM.CREATE.>" in allowed.publish_deny
    assert not [s for s in allowed.publish_allow if "west" in s or s in (">", "$JS.hub.API.>")]
    # Replies to both operators that may control east's nodes.
    operators = [i for i in listed if i.role is Role.OPERATOR]
    for operator in operators:
        assert (f"{operator.inbox_prefix}.>" in allowed.publish_allow) == (
            operator.cluster in ("east", ALL_CLUSTERS)
        )


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
