"""deploy/ on a real kube-apiserver: every manifest passes a server-side dry-run apply, and
each ServiceAccount can do exactly what its service needs (a SubjectAccessReview matrix).

Uses the harness's etcd and kube-apiserver through the `kube` fixture (an admin client).
The static checks of the manifests' contents are in test_manifest_contents.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.kube.client import Conflict, KubeClient, NotFound
from apilane.runtime import natsauth

pytestmark = [pytest.mark.integration, pytest.mark.kube]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
NAMESPACE = "apilane"
FIELD_MANAGER = "apilane-deploy-test"
# Namespaces the manifests expect to exist already (created by Kubernetes and by Calico).
PREREQUISITE_NAMESPACES = ("calico-system",)


def manifest_files() -> list[Path]:
    """The install (deploy/*.yaml) and the demo objects `make up` seeds (deploy/demo/)."""
    return sorted(DEPLOY.glob("*.yaml")) + sorted((DEPLOY / "demo").glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


def apply_order(docs: list[tuple[Path, dict[str, Any]]]) -> list[tuple[Path, dict[str, Any]]]:
    """Namespaces first, then what pods refer to, then workloads (as `kubectl apply` would
    need them on a fresh cluster)."""
    rank = {
        "Namespace": 0,
        "ServiceAccount": 1,
        "ConfigMap": 1,
        "ClusterRole": 2,
        "Role": 2,
        "ClusterRoleBinding": 3,
        "RoleBinding": 3,
    }
    return sorted(docs, key=lambda item: rank.get(item[1]["kind"], 5))


# --------------------------------------------------------------------------- real apiserver


async def resource_paths(kube: KubeClient) -> dict[tuple[str, str], tuple[str, bool]]:
    """(apiVersion, kind) -> (URL prefix of the collection, namespaced?) from API discovery."""
    found: dict[tuple[str, str], tuple[str, bool]] = {}
    wanted = {doc["apiVersion"] for _, doc in all_documents()}
    for api_version in wanted:
        base = "/api/v1" if api_version == "v1" else f"/apis/{api_version}"
        listing = await kube.get(base)
        for resource in listing["resources"]:
            if "/" not in resource["name"]:
                found[(api_version, resource["kind"])] = (
                    f"{base}/{resource['name']}",
                    bool(resource["namespaced"]),
                )
    return found


def object_path(
    paths: dict[tuple[str, str], tuple[str, bool]], doc: dict[str, Any]
) -> tuple[str, str]:
    """(collection path, object path) for a manifest document."""
    collection, namespaced = paths[(doc["apiVersion"], doc["kind"])]
    if namespaced:
        namespace = doc["metadata"].get("namespace")
        assert namespace, f"{doc['kind']}/{doc['metadata']['name']} needs a namespace"
        base, resource = collection.rsplit("/", 1)
        collection = f"{base}/namespaces/{namespace}/{resource}"
    return collection, f"{collection}/{doc['metadata']['name']}"


async def ensure_namespace(kube: KubeClient, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    with contextlib.suppress(Conflict):
        await kube.create("/api/v1/namespaces", body)


async def test_every_manifest_passes_server_side_dry_run_apply(kube: KubeClient) -> None:
    paths = await resource_paths(kube)
    # A dry run creates nothing, so the namespaces the objects live in must exist for real.
    for namespace in (NAMESPACE, *PREREQUISITE_NAMESPACES):
        await ensure_namespace(kube, namespace)
    applied = []
    for path, doc in apply_order(all_documents()):
        _, target = object_path(paths, doc)
        result = await kube.patch(
            target, doc, patch_type="apply", field_manager=FIELD_MANAGER, dry_run=True, force=True
        )
        assert result["kind"] == doc["kind"], f"{path.name}: {result}"
        assert result["metadata"]["name"] == doc["metadata"]["name"]
        applied.append(f"{doc['kind']}/{doc['metadata']['name']}")
    kinds = {entry.split("/")[0] for entry in applied}
    assert {
        "Deployment",
        "DaemonSet",
        "StatefulSet",
        "Role",
        "ClusterRole",
        "EndpointSlice",
    } <= kinds
    # Dry run: the workloads were validated but not created.
    with pytest.raises(NotFound):
        await kube.get(f"/apis/apps/v1/namespaces/{NAMESPACE}/deployments/apilane-discovery")


async def test_the_generated_nats_secrets_pass_server_side_dry_run_apply(
    kube: KubeClient, tmp_path: Path
) -> None:
    """What `python -m apilane.runtime.natsauth kubernetes-secrets` prints for an install is
    valid to the apiserver (names, keys: a node name with dots is a valid key)."""
    await ensure_namespace(kube, NAMESPACE)
    listing = natsauth.kubernetes_secrets(
        natsauth.identities_for("default", ["node-a.example.com", "node-b"]),
        tmp_path,
        ca_pem=b"-----BEGIN CERTIFICATE-----\n",
        namespace=NAMESPACE,
    )
    names = []
    for secret in listing["items"]:
        name = secret["metadata"]["name"]
        result = await kube.patch(
            f"/api/v1/namespaces/{NAMESPACE}/secrets/{name}",
            secret,
            patch_type="apply",
            field_manager=FIELD_MANAGER,
            dry_run=True,
            force=True,
        )
        assert result["kind"] == "Secret" and set(result["data"]) == set(secret["data"])
        names.append(name)
    assert sorted(names) == [
        "apilane-nats-accounts",
        "apilane-nats-discovery",
        "apilane-nats-node-loader",
        "apilane-nats-operator",
        "apilane-nats-renderer",
    ]


# What each service needs, written down: (namespace or "" for cluster scope, API group,
# resource) -> verbs. The test derives every denial from this table: anything not listed
# must be refused.
LEASE_VERBS = {"get", "list", "watch", "create", "update", "patch"}
EVENT_VERBS = {"create", "patch"}
NEEDS: dict[str, dict[tuple[str, str, str], set[str]]] = {
    "apilane-discovery": {
        ("default", "", "services"): {"get", "list", "watch"},
        ("default", "discovery.k8s.io", "endpointslices"): {"get", "list", "watch"},
        ("kube-system", "apps", "daemonsets"): {"get", "list", "watch"},
        ("", "", "nodes"): {"get", "list", "watch"},
        ("apilane", "coordination.k8s.io", "leases"): LEASE_VERBS,
        **{
            (namespace, group, "events"): EVENT_VERBS
            for namespace in ("default", "kube-system", "apilane")
            for group in ("", "events.k8s.io")
        },
    },
    "apilane-renderer": {
        ("calico-system", "apps", "daemonsets"): {"get", "list", "watch", "patch"},
        ("apilane", "coordination.k8s.io", "leases"): LEASE_VERBS,
        **{
            (namespace, group, "events"): EVENT_VERBS
            for namespace in ("calico-system", "apilane")
            for group in ("", "events.k8s.io")
        },
    },
    "apilane-node-loader": {},
}

VERBS = ("get", "list", "watch", "create", "update", "patch", "delete", "deletecollection")
NAMESPACED_RESOURCES = (
    ("", "services"),
    ("", "endpoints"),
    ("", "pods"),
    ("", "secrets"),
    ("", "configmaps"),
    ("", "serviceaccounts"),
    ("", "events"),
    ("events.k8s.io", "events"),
    ("discovery.k8s.io", "endpointslices"),
    ("apps", "daemonsets"),
    ("apps", "deployments"),
    ("apps", "statefulsets"),
    ("coordination.k8s.io", "leases"),
    ("rbac.authorization.k8s.io", "roles"),
    ("rbac.authorization.k8s.io", "rolebindings"),
)
CLUSTER_RESOURCES = (
    ("", "nodes"),
    ("", "namespaces"),
    ("rbac.authorization.k8s.io", "clusterroles"),
    ("rbac.authorization.k8s.io", "clusterrolebindings"),
)
# "" on a namespaced resource asks about every namespace at once (a cluster-wide list).
NAMESPACES = ("default", "kube-system", "calico-system", "apilane", "")


def access_matrix() -> list[tuple[str, str, str, str, str, bool]]:
    """(service account, namespace, group, resource, verb, expected) for every combination."""
    rows = []
    for account, needs in NEEDS.items():
        for namespace, (group, resource), verb in itertools.product(
            NAMESPACES, NAMESPACED_RESOURCES, VERBS
        ):
            expected = verb in needs.get((namespace, group, resource), set())
            rows.append((account, namespace, group, resource, verb, expected))
        for (group, resource), verb in itertools.product(CLUSTER_RESOURCES, VERBS):
            expected = verb in needs.get(("", group, resource), set())
            rows.append((account, "", group, resource, verb, expected))
    return rows


async def subject_may(
    kube: KubeClient, *, account: str, namespace: str, group: str, resource: str, verb: str
) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{NAMESPACE}:{account}",
            # The groups a real token of this ServiceAccount carries.
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{NAMESPACE}",
                "system:authenticated",
            ],
            "resourceAttributes": {
                "namespace": namespace,
                "group": group,
                "resource": resource,
                "verb": verb,
            },
        },
    }
    result = await kube.request(
        "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=review
    )
    return bool(result["status"].get("allowed", False))


@pytest.fixture
async def rbac_applied(kube: KubeClient) -> AsyncIterator[KubeClient]:
    """The ServiceAccounts, Roles and bindings of deploy/rbac-*.yaml, created for real;
    removed afterwards (the namespaces stay: without a controller manager they never finish
    terminating)."""
    paths = await resource_paths(kube)
    for namespace in (NAMESPACE, *PREREQUISITE_NAMESPACES):
        await ensure_namespace(kube, namespace)
    rbac_docs = [(p, d) for p in sorted(DEPLOY.glob("rbac-*.yaml")) for d in documents(p)]
    created = []
    try:
        for _, doc in apply_order(rbac_docs):
            _, target = object_path(paths, doc)
            await kube.patch(
                target, doc, patch_type="apply", field_manager=FIELD_MANAGER, force=True
            )
            created.append(target)
        yield kube
    finally:
        for target in reversed(created):
            with contextlib.suppress(NotFound):
                await kube.delete(target)


async def test_each_service_account_can_do_exactly_what_its_service_needs(
    rbac_applied: KubeClient,
) -> None:
    kube = rbac_applied
    rows = access_matrix()
    limit = asyncio.Semaphore(16)

    async def check(row: tuple[str, str, str, str, str, bool]) -> str | None:
        account, namespace, group, resource, verb, expected = row
        async with limit:
            allowed = await subject_may(
                kube,
                account=account,
                namespace=namespace,
                group=group,
                resource=resource,
                verb=verb,
            )
        if allowed == expected:
            return None
        where = namespace or "(cluster)"
        what = f"{group or 'core'}/{resource}"
        return f"{account} {'CAN' if allowed else 'cannot'} {verb} {what} in {where}"

    wrong = [m for m in await asyncio.gather(*(check(r) for r in rows)) if m]
    assert not wrong, "RBAC differs from what the services need:\n" + "\n".join(wrong)
    # The matrix really asked both ways (an AlwaysAllow apiserver would fail above).
    assert any(row[-1] for row in rows) and not all(row[-1] for row in rows)


async def test_spot_checks_named_in_the_issue(rbac_applied: KubeClient) -> None:
    """The examples a reader looks for, spelled out (the matrix above covers them too)."""
    kube = rbac_applied

    async def may(account: str, verb: str, resource: str, group: str, ns: str) -> bool:
        return await subject_may(
            kube,
            account=account,
            namespace=ns,
            group=group,
            resource=resource,
            verb=verb,
        )

    assert not await may("apilane-node-loader", "patch", "daemonsets", "apps", "calico-system")
    assert await may("apilane-renderer", "patch", "daemonsets", "apps", "calico-system")
    assert not await may("apilane-renderer", "patch", "daemonsets", "apps", "kube-system")
    assert not await may("apilane-discovery", "patch", "daemonsets", "apps", "kube-system")
    assert not await may("apilane-discovery", "patch", "services", "", "default")
    assert await may("apilane-discovery", "patch", "events", "", "default")
    assert await may("apilane-discovery", "update", "leases", "coordination.k8s.io", NAMESPACE)
    for account in NEEDS:
        for ns in NAMESPACES:
            assert not await may(account, "get", "secrets", "", ns), (account, ns)
