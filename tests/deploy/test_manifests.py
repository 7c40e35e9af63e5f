"""deploy/ on a real kube-apiserver: every manifest passes a server-side dry-run apply, and
each ServiceAccount can do exactly what its service needs (a SubjectAccessReview matrix).

Uses the harness's etcd and kube-apiserver through the `kube` fixture (an admin client); the
dry-run and matrix helpers are apilane.testing.manifests, shared with the chart's tests
(test_chart.py). The static checks of the manifests' contents are in
test_manifest_contents.py.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.kube.client import KubeClient, NotFound
from apilane.runtime import natsauth
from apilane.testing.manifests import (
    FIELD_MANAGER,
    NAMESPACE,
    access_matrix,
    dry_run_apply_all,
    ensure_namespace,
    named_access_matrix,
    named_needs,
    rbac_created,
    service_needs,
    subject_may,
    wrong_accesses,
)

pytestmark = [pytest.mark.integration, pytest.mark.kube]

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
# Namespaces the manifests expect to exist already (created by Kubernetes and by Calico).
PREREQUISITE_NAMESPACES = ("calico-system",)
NEEDS = service_needs()
NAMESPACES = ("default", "kube-system", "calico-system", "apilane", "")


def manifest_files() -> list[Path]:
    """The install (deploy/*.yaml) and the demo objects `make up` seeds (deploy/demo/)."""
    return sorted(DEPLOY.glob("*.yaml")) + sorted((DEPLOY / "demo").glob("*.yaml"))


def documents(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def all_documents() -> list[tuple[Path, dict[str, Any]]]:
    return [(path, doc) for path in manifest_files() for doc in documents(path)]


async def test_every_manifest_passes_server_side_dry_run_apply(kube: KubeClient) -> None:
    applied = await dry_run_apply_all(
        kube, all_documents(), namespaces=(NAMESPACE, *PREREQUISITE_NAMESPACES)
    )
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


@pytest.fixture
async def rbac_applied(kube: KubeClient) -> AsyncIterator[KubeClient]:
    """The ServiceAccounts, Roles and bindings of deploy/rbac-*.yaml, created for real."""
    docs = [doc for path in sorted(DEPLOY.glob("rbac-*.yaml")) for doc in documents(path)]
    async with rbac_created(kube, docs, namespaces=(NAMESPACE, *PREREQUISITE_NAMESPACES)):
        yield kube


async def test_each_service_account_can_do_exactly_what_its_service_needs(
    rbac_applied: KubeClient,
) -> None:
    rows = access_matrix(NEEDS, NAMESPACES) + named_access_matrix(NEEDS, named_needs())
    wrong = await wrong_accesses(rbac_applied, rows)
    assert not wrong, "RBAC differs from what the services need:\n" + "\n".join(wrong)
    # The matrix really asked both ways (an AlwaysAllow apiserver would fail above).
    assert any(row.expected for row in rows) and not all(row.expected for row in rows)


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
    # Its one ConfigMap by name, nothing else of the kind but create (not limitable by name).
    configmap = "apilane-kubernetes-endpoints"
    for verb, allowed in (("get", True), ("patch", True), ("create", True), ("delete", False)):
        assert (
            await subject_may(
                kube,
                account="apilane-renderer",
                namespace="calico-system",
                group="",
                resource="configmaps",
                verb=verb,
                name=configmap,
            )
            is allowed
        ), verb
    assert not await may("apilane-renderer", "get", "configmaps", "", "calico-system")
    assert not await may("apilane-renderer", "list", "configmaps", "", "calico-system")
    assert not await may("apilane-discovery", "patch", "daemonsets", "apps", "kube-system")
    assert not await may("apilane-discovery", "patch", "services", "", "default")
    assert await may("apilane-discovery", "patch", "events", "", "default")
    assert await may("apilane-discovery", "update", "leases", "coordination.k8s.io", NAMESPACE)
    for account in NEEDS:
        for ns in NAMESPACES:
            assert not await may(account, "get", "secrets", "", ns), (account, ns)
