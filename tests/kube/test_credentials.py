"""Credentials as kubernetes-asyncio loads them, against the real kube-apiserver: an exec
credential plugin (how EKS, GKE and AKS kubeconfigs authenticate) and its renewal when the
credential expires, the in-cluster service account with a rotating token file, and a
kubeconfig's `tls-server-name`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime
import json
import logging
import os
import signal
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes_asyncio.config import incluster_config

from apilane.kube import credentials
from apilane.kube.client import KubeClient, Unavailable
from apilane.kube.credentials import load_in_cluster
from apilane.model.errors import ConfigError
from apilane.testing.kube import SNI_NAME, ControlPlane, service_account_token

pytestmark = [pytest.mark.integration, pytest.mark.kube]

EXEC_API = "client.authentication.k8s.io/v1"
# An exec credential plugin: prints an ExecCredential with the token in file $1 (and the
# expirationTimestamp $3 when given), and logs the request it was called with to file $2.
PLUGIN = """#!/bin/sh
printf '%s\\n' "$KUBERNETES_EXEC_INFO" >> "$2"
expiry=""
if [ -n "$3" ]; then expiry=", \\"expirationTimestamp\\": \\"$3\\""; fi
printf '{"apiVersion": "%s", "kind": "ExecCredential", "status": {"token": "%s"%s}}\\n' \\
    "client.authentication.k8s.io/v1" "$(cat "$1")" "$expiry"
"""


def derived_kubeconfig(
    control_plane: ControlPlane,
    path: Path,
    *,
    cluster: dict[str, Any] | None = None,
    user: dict[str, Any] | None = None,
) -> str:
    """The harness's admin kubeconfig with fields of its cluster replaced, or another user."""
    document = yaml.safe_load(control_plane.kubeconfig_path.read_text())
    document["clusters"][0]["cluster"].update(cluster or {})
    if user is not None:
        document["users"][0]["user"] = user
    path.write_text(yaml.safe_dump(document))
    return str(path)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class Plugin:
    """The exec plugin above, its token file and its log of requests, in `directory`."""

    def __init__(self, directory: Path, *, expires_in: datetime.timedelta | None = None) -> None:
        directory.mkdir(exist_ok=True)
        self.script = directory / "credential-plugin"
        self.script.write_text(PLUGIN)
        self.script.chmod(0o755)
        self.token_file = directory / "plugin-token"
        self.runs_file = directory / "plugin-runs"
        expiry = ""
        if expires_in is not None:
            moment = datetime.datetime.now(datetime.UTC) + expires_in
            expiry = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
        self.user = {
            "exec": {
                "apiVersion": EXEC_API,
                "command": str(self.script),
                "args": [str(self.token_file), str(self.runs_file), expiry],
                "interactiveMode": "Never",
            }
        }

    def runs(self) -> list[dict[str, Any]]:
        lines = self.runs_file.read_text().splitlines() if self.runs_file.exists() else []
        return [json.loads(line) for line in lines]


async def whoami(client: KubeClient) -> str:
    review = await client.create(
        "/apis/authentication.k8s.io/v1/selfsubjectreviews",
        {"apiVersion": "authentication.k8s.io/v1", "kind": "SelfSubjectReview"},
    )
    return str(review["status"]["userInfo"]["username"])


async def let_service_accounts_list_configmaps(kube: KubeClient, namespace: str) -> None:
    rbac = f"/apis/rbac.authorization.k8s.io/v1/namespaces/{namespace}"
    await kube.create(
        f"{rbac}/roles",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "list-configmaps"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
        },
    )
    await kube.create(
        f"{rbac}/rolebindings",
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "list-configmaps"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "Role",
                "name": "list-configmaps",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "Group",
                    "name": f"system:serviceaccounts:{namespace}",
                }
            ],
        },
    )


# --------------------------------------------------------------------------- exec plugins


async def test_an_exec_plugin_token_is_accepted_and_lists_objects(
    kube: KubeClient, kube_namespace: str, control_plane: ControlPlane, tmp_path: Path
) -> None:
    await let_service_accounts_list_configmaps(kube, kube_namespace)
    configmaps = f"/api/v1/namespaces/{kube_namespace}/configmaps"
    await kube.create(
        configmaps, {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "visible"}}
    )
    plugin = Plugin(tmp_path)
    plugin.token_file.write_text(await service_account_token(kube, kube_namespace, "exec-user"))
    path = derived_kubeconfig(control_plane, tmp_path / "config", user=plugin.user)
    async with await KubeClient.from_config(path) as client:
        listing = await client.list(configmaps)
        assert [item["metadata"]["name"] for item in listing["items"]] == ["visible"]
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:exec-user"
    [request] = plugin.runs()
    assert (request["apiVersion"], request["kind"]) == (EXEC_API, "ExecCredential")


async def test_an_exec_credential_is_renewed_only_when_it_is_about_to_expire(
    kube: KubeClient,
    kube_namespace: str,
    control_plane: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(credentials, "REFRESH_SECONDS", 0.0)  # check before every request
    first = await service_account_token(kube, kube_namespace, "first")
    second = await service_account_token(kube, kube_namespace, "second")

    lasting = Plugin(tmp_path / "lasting", expires_in=datetime.timedelta(hours=1))
    lasting.token_file.write_text(first)
    path = derived_kubeconfig(control_plane, tmp_path / "lasting.config", user=lasting.user)
    async with await KubeClient.from_config(path) as client:
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:first"
        lasting.token_file.write_text(second)
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:first"
    assert len(lasting.runs()) == 1

    # Inside kubernetes-asyncio's five-minute margin before expirationTimestamp: renewed.
    expiring = Plugin(tmp_path / "expiring", expires_in=datetime.timedelta(minutes=2))
    expiring.token_file.write_text(first)
    path = derived_kubeconfig(control_plane, tmp_path / "expiring.config", user=expiring.user)
    async with await KubeClient.from_config(path) as client:
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:first"
        expiring.token_file.write_text(second)
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:second"
    assert len(expiring.runs()) >= 2


async def test_a_failing_exec_plugin_is_a_config_error_with_its_message(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    script = tmp_path / "refusing-plugin"
    script.write_text("#!/bin/sh\necho 'no credentials for this cluster' >&2\nexit 3\n")
    script.chmod(0o755)
    user = {"exec": {"apiVersion": EXEC_API, "command": str(script)}}
    path = derived_kubeconfig(control_plane, tmp_path / "config", user=user)
    with pytest.raises(ConfigError) as caught:
        await KubeClient.from_config(path)
    assert "exec: process returned 3" in str(caught.value)
    assert "no credentials for this cluster" in str(caught.value)
    assert path in str(caught.value)


async def test_an_exec_plugin_that_hangs_is_a_config_error_not_a_hang(
    control_plane: ControlPlane, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(credentials, "CREDENTIAL_TIMEOUT", 0.5)
    pid_file = tmp_path / "plugin.pid"
    script = tmp_path / "hanging-plugin"
    script.write_text(f"#!/bin/sh\necho $$ > {pid_file}\nexec sleep 30\n")
    script.chmod(0o755)
    user = {"exec": {"apiVersion": EXEC_API, "command": str(script)}}
    path = derived_kubeconfig(control_plane, tmp_path / "config", user=user)
    try:
        with pytest.raises(ConfigError, match=r"no credentials after 0.5 s"):
            await KubeClient.from_config(path)
    finally:
        for _ in range(50):  # the plugin may not have written its pid yet
            if pid_file.exists() and pid_file.read_text().strip():
                break
            await asyncio.sleep(0.1)
        with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
            os.kill(int(pid_file.read_text()), signal.SIGKILL)


# --------------------------------------------------------------------------- in-cluster


async def test_in_cluster_credentials_follow_the_rotating_token_file(
    kube: KubeClient,
    kube_namespace: str,
    control_plane: ControlPlane,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # kubernetes-asyncio re-reads the token file once this period has passed (a minute).
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    mounted = tmp_path / "serviceaccount"
    mounted.mkdir()
    (mounted / "ca.crt").write_bytes(control_plane.pki.ca_pem)
    token = mounted / "token"
    token.write_text(await service_account_token(kube, kube_namespace, "before"))
    environ = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(control_plane.apiserver.port),
    }
    async with KubeClient(load_in_cluster(environ, base=mounted)) as client:
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:before"
        # The kubelet swaps the projected file atomically; so does this test.
        rotated = mounted / "token.new"
        rotated.write_text(await service_account_token(kube, kube_namespace, "after"))
        rotated.rename(token)
        assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:after"

        token.unlink()
        with caplog.at_level(logging.WARNING, logger="apilane.kube.credentials"):
            assert await whoami(client) == f"system:serviceaccount:{kube_namespace}:after"
        assert "keeping the previous ones" in caplog.text


# --------------------------------------------------------------------------- tls-server-name


async def test_tls_server_name_is_sent_and_verified_instead_of_the_url_host(
    control_plane: ControlPlane, tmp_path: Path
) -> None:
    sni_ca = control_plane.sni_pki.ca_pem
    by_name = derived_kubeconfig(
        control_plane,
        tmp_path / "by-name",
        cluster={"certificate-authority-data": b64(sni_ca), "tls-server-name": SNI_NAME},
    )
    async with await KubeClient.from_config(by_name) as client:
        assert (await client.get("/version"))["gitVersion"] == "v1.34.4"

    # By IP without the name, the server presents its other certificate, which this CA
    # did not sign.
    by_ip = derived_kubeconfig(
        control_plane, tmp_path / "by-ip", cluster={"certificate-authority-data": b64(sni_ca)}
    )
    async with await KubeClient.from_config(by_ip) as client:
        with pytest.raises(Unavailable, match="certificate verify failed"):
            await client.get("/version")

    # A name the certificate does not carry fails, although it is valid for the URL's IP.
    elsewhere = derived_kubeconfig(
        control_plane, tmp_path / "elsewhere", cluster={"tls-server-name": "elsewhere.test"}
    )
    async with await KubeClient.from_config(elsewhere) as client:
        with pytest.raises(Unavailable, match="certificate verify failed: Hostname mismatch"):
            await client.get("/version")
