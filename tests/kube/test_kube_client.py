"""KubeClient against the real kube-apiserver: verbs, pagination, watch, typed errors,
kubeconfig validation, and best-effort Events."""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path

import pytest

from apilane.kube import client as kube_module
from apilane.kube import recorder as recorder_module
from apilane.kube.client import (
    Conflict,
    Forbidden,
    Gone,
    Invalid,
    KubeClient,
    NotFound,
    Unavailable,
)
from apilane.kube.recorder import record_event
from apilane.testing.kube import ControlPlane

pytestmark = [pytest.mark.integration, pytest.mark.kube]


def configmap(name: str, **data: str) -> dict[str, object]:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name}, "data": data}


# --------------------------------------------------------------------------- real apiserver


async def test_create_get_replace_patch_delete_round_trip(
    kube: KubeClient, kube_namespace: str
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    created = await kube.create(base, configmap("one", a="1"))
    assert created["metadata"]["managedFields"][0]["manager"] == "apilane"
    fetched = await kube.get(f"{base}/one")
    fetched["data"]["b"] = "2"
    replaced = await kube.replace(f"{base}/one", fetched)
    assert replaced["data"] == {"a": "1", "b": "2"}
    merged = await kube.patch(f"{base}/one", {"data": {"c": "3"}}, patch_type="merge")
    assert merged["data"] == {"a": "1", "b": "2", "c": "3"}
    patched = await kube.patch(
        f"{base}/one", [{"op": "remove", "path": "/data/a"}], patch_type="json"
    )
    assert patched["data"] == {"b": "2", "c": "3"}
    applied = await kube.patch(
        f"{base}/one",
        configmap("one", d="4"),
        patch_type="apply",
        field_manager="applier",
        force=True,
    )
    assert applied["data"]["d"] == "4"
    await kube.delete(f"{base}/one")
    with pytest.raises(NotFound):
        await kube.get(f"{base}/one")


async def test_dry_run_create_and_patch_change_nothing(
    kube: KubeClient, kube_namespace: str
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    await kube.create(base, configmap("dry"), dry_run=True)
    with pytest.raises(NotFound):
        await kube.get(f"{base}/dry")
    await kube.create(base, configmap("real", a="1"))
    preview = await kube.patch(f"{base}/real", {"data": {"a": "2"}}, dry_run=True)
    assert preview["data"]["a"] == "2"
    assert (await kube.get(f"{base}/real"))["data"]["a"] == "1"


async def test_conflict_on_duplicate_create_and_on_stale_replace(
    kube: KubeClient, kube_namespace: str
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    first = await kube.create(base, configmap("c", a="1"))
    with pytest.raises(Conflict) as duplicate:
        await kube.create(base, configmap("c"))
    assert duplicate.value.status == 409
    assert duplicate.value.reason == "AlreadyExists"
    await kube.patch(f"{base}/c", {"data": {"a": "2"}})
    stale = dict(first, data={"a": "3"})
    with pytest.raises(Conflict) as outdated:
        await kube.replace(f"{base}/c", stale)
    assert "the object has been modified" in outdated.value.message


async def test_not_found_invalid_and_forbidden_are_typed(
    kube: KubeClient, kube_namespace: str, control_plane: ControlPlane, tmp_path: Path
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    with pytest.raises(NotFound) as missing:
        await kube.get(f"{base}/absent")
    assert (missing.value.status, missing.value.reason) == (404, "NotFound")
    with pytest.raises(Invalid) as invalid:
        await kube.create(base, configmap("Not_A_Valid_Name"))
    assert invalid.value.status == 422
    assert invalid.value.details["causes"]
    nobody = await KubeClient.from_config(
        str(control_plane.write_kubeconfig(tmp_path / "nobody", user="nobody", groups=()))
    )
    try:
        with pytest.raises(Forbidden) as forbidden:
            await nobody.get(f"{base}/absent")
        assert 'User "nobody" cannot get resource "configmaps"' in forbidden.value.message
    finally:
        await nobody.close()


async def test_an_unreachable_server_is_unavailable(
    tmp_path: Path, control_plane: ControlPlane
) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    path = control_plane.pki.kubeconfig(
        tmp_path / "closed", server=f"https://127.0.0.1:{closed_port}"
    )
    client = await KubeClient.from_config(str(path))
    try:
        with pytest.raises(Unavailable):
            await client.get("/version")
    finally:
        await client.close()


async def test_kubeconfig_from_the_environment_variable(
    control_plane: ControlPlane, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(control_plane.kubeconfig_path))
    client = await KubeClient.from_config(None)
    try:
        assert (await client.get("/version"))["gitVersion"] == "v1.34.4"
    finally:
        await client.close()


async def test_list_follows_continue_pages(
    kube: KubeClient, kube_namespace: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    for index in range(5):
        await kube.create(
            base,
            {
                **configmap(f"page-{index}"),
                "metadata": {"name": f"page-{index}", "labels": {"p": "y"}},
            },
        )
    monkeypatch.setattr(kube_module, "LIST_PAGE_SIZE", 2)
    listing = await kube.list(base, label_selector="p=y")
    assert sorted(item["metadata"]["name"] for item in listing["items"]) == [
        f"page-{i}" for i in range(5)
    ]
    assert listing["metadata"]["resourceVersion"]
    assert "continue" not in listing["metadata"]


async def test_watch_streams_changes_in_order(kube: KubeClient, kube_namespace: str) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    listing = await kube.list(base)
    stream = kube.watch(
        base, resource_version=listing["metadata"]["resourceVersion"], timeout_seconds=10
    )
    async with contextlib.aclosing(stream):
        await kube.create(base, configmap("w", a="1"))
        await kube.patch(f"{base}/w", {"data": {"a": "2"}})
        await kube.delete(f"{base}/w")
        seen = []
        async for event in stream:
            if event["type"] != "BOOKMARK":
                seen.append((event["type"], event["object"]["data"]["a"]))
            if len(seen) == 3:
                break
    assert seen == [("ADDED", "1"), ("MODIFIED", "2"), ("DELETED", "2")]


async def test_watch_from_an_expired_resource_version_raises_gone(
    control_plane: ControlPlane, kube_namespace: str
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    client = await control_plane.client()
    try:
        old = (await client.list(base))["metadata"]["resourceVersion"]
        control_plane.restart_apiserver(expire_watches=True)
        with pytest.raises(Gone) as gone:
            async for _ in client.watch(base, resource_version=old, timeout_seconds=5):
                pass
        assert gone.value.status == 410
        assert "too old resource version" in gone.value.message
    finally:
        await client.close()


async def test_events_are_recorded_and_repeats_count_up(
    kube: KubeClient, kube_namespace: str
) -> None:
    base = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    involved = await kube.create(base, configmap("subject"))
    first = await record_event(
        kube,
        involved=involved,
        reason="KubeProxyMissing",
        message="kube-proxy DaemonSet not found",
        type_="Warning",
        component="apilane-discovery",
        api_version="v1",
        kind="ConfigMap",
    )
    second = await record_event(
        kube,
        involved=involved,
        reason="KubeProxyMissing",
        message="kube-proxy DaemonSet not found",
        type_="Warning",
        component="apilane-discovery",
        api_version="v1",
        kind="ConfigMap",
    )
    assert first is not None and second is not None
    assert first["metadata"]["name"] == second["metadata"]["name"]
    assert second["count"] == 2
    assert second["involvedObject"]["uid"] == involved["metadata"]["uid"]
    events = await kube.list(f"/api/v1/namespaces/{kube_namespace}/events")
    assert len(events["items"]) == 1


async def test_repeats_count_up_with_only_create_and_patch_on_events(
    control_plane: ControlPlane,
    kube: KubeClient,
    kube_namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The services' grant on Events: create and patch, never get or update. A restart (the
    counts this process knows forgotten) and a replica counting the same Event continue the
    count instead of restarting it."""
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{kube_namespace}"
    rule = {"apiGroups": [""], "resources": ["events"], "verbs": ["create", "patch"]}
    await kube.create(
        f"{rbac}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "events"},
            "rules": [rule],
        },
    )
    await kube.create(
        f"{rbac}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "events"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "events"},
            "subjects": [
                {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "recorder"}
            ],
        },
    )
    involved = await kube.create(
        f"/api/v1/namespaces/{kube_namespace}/configmaps", configmap("subject")
    )
    kubeconfig = control_plane.write_kubeconfig(tmp_path / "recorder", user="recorder")
    recorder = await KubeClient.from_config(str(kubeconfig))

    async def record() -> int:
        event = await record_event(
            recorder,
            involved=involved,
            reason="Repeated",
            message="again",
            type_="Warning",
            component="apilane-test",
            api_version="v1",
            kind="ConfigMap",
        )
        assert event is not None, "not recorded (see the log)"
        return int(event["count"])

    try:
        with pytest.raises(Forbidden):
            await recorder.list(f"/api/v1/namespaces/{kube_namespace}/events")
        assert [await record() for _ in range(3)] == [1, 2, 3]
        monkeypatch.setattr(recorder_module, "_KNOWN", recorder_module._KnownCounts())  # restarted
        assert await record() == 4
        events = await kube.list(f"/api/v1/namespaces/{kube_namespace}/events")
        [stored] = events["items"]
        stored["count"] = 10  # another replica counted meanwhile
        await kube.replace(
            f"/api/v1/namespaces/{kube_namespace}/events/{stored['metadata']['name']}", stored
        )
        assert await record() == 11
        await kube.delete(
            f"/api/v1/namespaces/{kube_namespace}/events/{stored['metadata']['name']}"
        )
        assert await record() == 1  # expired: recorded afresh
    finally:
        await recorder.close()


async def test_recording_an_event_never_raises(kube: KubeClient) -> None:
    # The namespace does not exist: the API refuses, record_event logs and returns None.
    ghost = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "x", "namespace": "no-such-ns"},
    }
    assert (
        await record_event(
            kube,
            involved=ghost,
            reason="Test",
            message="m",
            type_="Normal",
            component="apilane-test",
        )
        is None
    )
    assert (
        await record_event(
            kube,
            involved={"metadata": {"name": "no-kind"}},
            reason="Test",
            message="m",
            type_="Normal",
            component="t",
        )
        is None
    )
