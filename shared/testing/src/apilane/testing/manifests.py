"""Manifests on a real kube-apiserver: server-side dry-run apply, applying RBAC for real, and
the SubjectAccessReview matrix that proves each ServiceAccount can do exactly what its
service needs. Shared by tests/deploy's checks of deploy/*.yaml and of the Helm chart's
renderings, so both hold the same objects to the same standard.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from apilane.kube.client import Conflict, KubeClient, NotFound
from apilane.testing.kube import object_path, resource_paths

FIELD_MANAGER = "apilane-deploy-test"
NAMESPACE = "apilane"
RENDERER_TARGET = "calico-system"
RENDERER_CONFIGMAP = "apilane-kubernetes-endpoints"

Doc = dict[str, Any]
Origin = TypeVar("Origin")

APPLY_RANK = {
    "Namespace": 0,
    "ServiceAccount": 1,
    "ConfigMap": 1,
    "ClusterRole": 2,
    "Role": 2,
    "ClusterRoleBinding": 3,
    "RoleBinding": 3,
}
RBAC_KINDS = frozenset(
    {"ServiceAccount", "Role", "RoleBinding", "ClusterRole", "ClusterRoleBinding"}
)


def apply_order(docs: Iterable[tuple[Origin, Doc]]) -> list[tuple[Origin, Doc]]:
    """Namespaces first, then what pods refer to, then workloads (as `kubectl apply` would
    need them on a fresh cluster)."""
    return sorted(docs, key=lambda item: APPLY_RANK.get(item[1]["kind"], 5))


async def ensure_namespace(kube: KubeClient, name: str) -> None:
    body = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}}
    with contextlib.suppress(Conflict):
        await kube.create("/api/v1/namespaces", body)


async def dry_run_apply_all(
    kube: KubeClient, docs: Sequence[tuple[Origin, Doc]], *, namespaces: Iterable[str]
) -> list[str]:
    """Server-side dry-run apply of every document (in apply order); returns Kind/name of
    each. A dry run creates nothing, so the namespaces the objects live in are created for
    real first."""
    paths = await resource_paths(kube, {doc["apiVersion"] for _, doc in docs})
    for namespace in namespaces:
        await ensure_namespace(kube, namespace)
    applied = []
    for origin, doc in apply_order(docs):
        _, target = object_path(paths, doc)
        result = await kube.patch(
            target, doc, patch_type="apply", field_manager=FIELD_MANAGER, dry_run=True, force=True
        )
        assert result["kind"] == doc["kind"], f"{origin}: {result}"
        assert result["metadata"]["name"] == doc["metadata"]["name"]
        applied.append(f"{doc['kind']}/{doc['metadata']['name']}")
    return applied


@contextlib.asynccontextmanager
async def rbac_created(
    kube: KubeClient, docs: Iterable[Doc], *, namespaces: Iterable[str]
) -> AsyncIterator[KubeClient]:
    """The ServiceAccounts, Roles and bindings among `docs`, created for real; removed
    afterwards (the namespaces stay: without a controller manager they never finish
    terminating)."""
    rbac_docs = [(None, doc) for doc in docs if doc["kind"] in RBAC_KINDS]
    paths = await resource_paths(kube, {doc["apiVersion"] for _, doc in rbac_docs})
    for namespace in namespaces:
        await ensure_namespace(kube, namespace)
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


# --------------------------------------------------------------------------- the matrix

# What each service needs, written down: (namespace or "" for cluster scope, API group,
# resource) -> verbs. The matrix derives every denial from this table: anything not listed
# must be refused.
LEASE_VERBS = frozenset({"get", "list", "watch", "create", "update", "patch"})
EVENT_VERBS = frozenset({"create", "patch"})
Needs = dict[str, dict[tuple[str, str, str], frozenset[str]]]


def service_needs(
    *,
    namespace: str = NAMESPACE,
    renderer_target: str = RENDERER_TARGET,
    renderer_configmap: str | None = RENDERER_CONFIGMAP,
) -> Needs:
    """The permissions of an install in `namespace` whose renderer patches a DaemonSet in
    `renderer_target` (and, in configmap mode, writes `renderer_configmap` beside it: create
    cannot be limited to a name, get and patch are, see `named_needs`)."""
    renderer_configmaps: dict[tuple[str, str, str], frozenset[str]] = (
        {(renderer_target, "", "configmaps"): frozenset({"create"})}
        if renderer_configmap is not None
        else {}
    )
    return {
        "apilane-discovery": {
            ("default", "", "services"): frozenset({"get", "list", "watch"}),
            ("default", "discovery.k8s.io", "endpointslices"): frozenset({"get", "list", "watch"}),
            ("kube-system", "apps", "daemonsets"): frozenset({"get", "list", "watch"}),
            ("", "", "nodes"): frozenset({"get", "list", "watch"}),
            (namespace, "coordination.k8s.io", "leases"): LEASE_VERBS,
            **{
                (ns, group, "events"): EVENT_VERBS
                for ns in ("default", "kube-system", namespace)
                for group in ("", "events.k8s.io")
            },
        },
        "apilane-renderer": {
            (renderer_target, "apps", "daemonsets"): frozenset({"get", "list", "watch", "patch"}),
            (namespace, "coordination.k8s.io", "leases"): LEASE_VERBS,
            **renderer_configmaps,
            **{
                (ns, group, "events"): EVENT_VERBS
                for ns in (renderer_target, namespace)
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
BASE_NAMESPACES = ("default", "kube-system", "calico-system", "apilane", "")


@dataclass(frozen=True)
class Access:
    account: str
    namespace: str
    group: str
    resource: str
    verb: str
    expected: bool
    name: str = ""  # a request about one object by name ("": about the resource as a whole)


# Permissions on single objects by name: (namespace, API group, resource, name) -> verbs.
NamedNeeds = dict[str, dict[tuple[str, str, str, str], frozenset[str]]]
OTHER_NAME = "not-apilanes"  # a name no grant names: what is allowed on it is allowed on any


def named_needs(
    *, renderer_target: str = RENDERER_TARGET, renderer_configmap: str | None = RENDERER_CONFIGMAP
) -> NamedNeeds:
    """What the services may do to objects by name, beyond `service_needs`: the renderer
    reads and patches its one ConfigMap."""
    if renderer_configmap is None:
        return {}
    return {
        "apilane-renderer": {
            (renderer_target, "", "configmaps", renderer_configmap): frozenset({"get", "patch"})
        }
    }


def named_access_matrix(needs: Needs, named: NamedNeeds) -> list[Access]:
    """Every verb of every account on each named object, and on another object of the same
    kind (`OTHER_NAME`): the name grants plus whatever the account may do to any name."""
    rows = []
    objects = {key for grants in named.values() for key in grants}
    for account in needs:
        for namespace, group, resource, name in sorted(objects):
            anyone = needs[account].get((namespace, group, resource), frozenset())
            this = named.get(account, {}).get((namespace, group, resource, name), frozenset())
            for verb in VERBS:
                for target, allowed in ((name, anyone | this), (OTHER_NAME, anyone)):
                    rows.append(
                        Access(account, namespace, group, resource, verb, verb in allowed, target)
                    )
    return rows


def access_matrix(needs: Needs, namespaces: Iterable[str] = BASE_NAMESPACES) -> list[Access]:
    """Every combination of service account x namespace x resource x verb, with whether
    `needs` allows it."""
    rows = []
    spaces = tuple(dict.fromkeys(namespaces))
    for account, allowed in needs.items():
        for namespace, (group, resource), verb in itertools.product(
            spaces, NAMESPACED_RESOURCES, VERBS
        ):
            expected = verb in allowed.get((namespace, group, resource), frozenset())
            rows.append(Access(account, namespace, group, resource, verb, expected))
        for (group, resource), verb in itertools.product(CLUSTER_RESOURCES, VERBS):
            expected = verb in allowed.get(("", group, resource), frozenset())
            rows.append(Access(account, "", group, resource, verb, expected))
    return rows


async def subject_may(
    kube: KubeClient,
    *,
    account: str,
    namespace: str,
    group: str,
    resource: str,
    verb: str,
    account_namespace: str = NAMESPACE,
    name: str = "",
) -> bool:
    review = {
        "apiVersion": "authorization.k8s.io/v1",
        "kind": "SubjectAccessReview",
        "spec": {
            "user": f"system:serviceaccount:{account_namespace}:{account}",
            # The groups a real token of this ServiceAccount carries.
            "groups": [
                "system:serviceaccounts",
                f"system:serviceaccounts:{account_namespace}",
                "system:authenticated",
            ],
            "resourceAttributes": {
                "namespace": namespace,
                "group": group,
                "resource": resource,
                "verb": verb,
                **({"name": name} if name else {}),
            },
        },
    }
    result = await kube.request(
        "POST", "/apis/authorization.k8s.io/v1/subjectaccessreviews", body=review
    )
    return bool(result["status"].get("allowed", False))


async def wrong_accesses(
    kube: KubeClient, rows: Sequence[Access], *, account_namespace: str = NAMESPACE
) -> list[str]:
    """The rows where the apiserver's answer differs from the expectation, described."""
    limit = asyncio.Semaphore(16)

    async def check(row: Access) -> str | None:
        async with limit:
            allowed = await subject_may(
                kube,
                account=row.account,
                namespace=row.namespace,
                group=row.group,
                resource=row.resource,
                verb=row.verb,
                account_namespace=account_namespace,
                name=row.name,
            )
        if allowed == row.expected:
            return None
        where = row.namespace or "(cluster)"
        what = f"{row.group or 'core'}/{row.resource}" + (f"/{row.name}" if row.name else "")
        return f"{row.account} {'CAN' if allowed else 'cannot'} {row.verb} {what} in {where}"

    return [m for m in await asyncio.gather(*(check(r) for r in rows)) if m]
