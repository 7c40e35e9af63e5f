"""The pure parts of watching: ObjectCache, Backoff, metric labels."""

from __future__ import annotations

import random

import pytest

from apilane.kube.watch import ObjectCache, WatchEvent, resource_name
from apilane.runtime.aio import Backoff

pytestmark = [pytest.mark.unit]


def obj(name: str, version: str, namespace: str = "default", **extra: object) -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": namespace, "resourceVersion": version}, **extra}


def test_the_cache_is_not_synced_until_the_first_listing() -> None:
    cache = ObjectCache()
    assert not cache.synced
    assert cache.apply(WatchEvent(type="LISTED", resource_version="5", objects=()))
    assert cache.synced
    assert cache.resource_version == "5"


def test_added_modified_deleted_keep_the_current_objects_by_namespace_and_name() -> None:
    cache = ObjectCache()
    cache.apply(
        WatchEvent(type="LISTED", resource_version="1", objects=(obj("b", "1"), obj("a", "1")))
    )
    assert [o["metadata"]["name"] for o in cache.objects()] == ["a", "b"]
    assert cache.apply(
        WatchEvent(type="ADDED", resource_version="2", object=obj("c", "2", namespace="x"))
    )
    assert cache.apply(WatchEvent(type="MODIFIED", resource_version="3", object=obj("a", "3")))
    assert cache.get("default", "a") == obj("a", "3")
    assert cache.apply(WatchEvent(type="DELETED", resource_version="4", object=obj("b", "4")))
    assert not cache.apply(WatchEvent(type="DELETED", resource_version="5", object=obj("b", "5")))
    assert [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in cache.objects()] == [
        ("default", "a"),
        ("x", "c"),
    ]
    assert ("x", "c") in cache
    assert len(cache) == 2


def test_a_relist_replaces_everything_including_objects_deleted_meanwhile() -> None:
    cache = ObjectCache()
    cache.apply(
        WatchEvent(type="LISTED", resource_version="1", objects=(obj("a", "1"), obj("b", "1")))
    )
    assert cache.apply(WatchEvent(type="LISTED", resource_version="9", objects=(obj("a", "7"),)))
    assert cache.objects() == [obj("a", "7")]
    assert not cache.apply(
        WatchEvent(type="LISTED", resource_version="10", objects=(obj("a", "7"),))
    )


def test_an_unchanged_modification_reports_no_change() -> None:
    cache = ObjectCache()
    cache.apply(WatchEvent(type="LISTED", resource_version="1", objects=(obj("a", "1"),)))
    assert not cache.apply(WatchEvent(type="MODIFIED", resource_version="1", object=obj("a", "1")))


def test_backoff_grows_exponentially_with_jitter_up_to_the_maximum_and_resets() -> None:
    backoff = Backoff(initial=0.2, maximum=2.0, rng=random.Random(7))
    delays = [backoff.next_delay() for _ in range(8)]
    ceilings = [min(2.0, 0.2 * 2**i) for i in range(8)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 2.0
    backoff.reset()
    assert backoff.next_delay() <= 0.2


def test_the_metric_label_is_the_collection_name() -> None:
    assert (
        resource_name("/apis/discovery.k8s.io/v1/namespaces/default/endpointslices")
        == "endpointslices"
    )
    assert resource_name("/api/v1/nodes/") == "nodes"
