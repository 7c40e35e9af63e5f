"""What deploy/ expects to exist before it is applied, made for one test cluster: the NATS
auth Secrets (`apilane.runtime.natsauth.kubernetes_secrets`: the generated accounts, and per
role its seed and the CA, one seed per node for the node-loaders), the NATS servers' TLS
Secret, discovery's signing key (Secret) and the trusted keys the renderer and node-loader
accept (ConfigMap). deploy/README.md says how an installer makes each; this is the same,
with a throwaway CA and keys.

The NATS server certificate names every pod's stable DNS name (the routes and the services
use those) and every address of the test cluster's pod subnet: the test itself reaches a NATS
pod by its IP from the host, which has no cluster DNS.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apilane.model.signing import SigningKey
from apilane.runtime import natsauth
from apilane.runtime.config import NatsAuth
from apilane.runtime.natsauth import Identity, Role
from apilane.testing.nats import issue_server_certificate
from apilane.testing.pki import Pki

NATS_TLS_SECRET = "apilane-nats-tls"
SIGNING_SECRET = "apilane-signing-key"
SIGNING_SECRET_KEY = "signing-key.pem"
TRUSTED_CONFIGMAP = "apilane-trusted-keys"
TRUSTED_CONFIGMAP_KEY = "keys"


@dataclass(frozen=True)
class DeploySecrets:
    """The objects to create before deploy/, and what the test needs to talk to the result."""

    objects: list[dict[str, Any]]
    signing_key: SigningKey
    operator: NatsAuth  # the test's own NATS identity: the cluster's operator


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _object(kind: str, name: str, namespace: str, **body: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/part-of": "apilane"},
        },
        **body,
    }


def signing_objects(namespace: str) -> tuple[list[dict[str, Any]], SigningKey]:
    """A fresh signing key (Secret) and the ConfigMap that trusts it, and nothing else."""
    key = SigningKey.generate()
    signing = {SIGNING_SECRET_KEY: _b64(key.to_pem())}
    trusted = {TRUSTED_CONFIGMAP_KEY: f"# {key.key_id}\n{key.public_text}\n"}
    return [
        _object("Secret", SIGNING_SECRET, namespace, type="Opaque", data=signing),
        _object("ConfigMap", TRUSTED_CONFIGMAP, namespace, data=trusted),
    ], key


def nats_server_hosts(
    pod_subnet: ipaddress.IPv4Network, *, namespace: str, replicas: int
) -> list[str]:
    names = [
        f"nats-{index}.nats-headless.{namespace}.svc{suffix}"
        for index in range(replicas)
        for suffix in ("", ".cluster.local")
    ]
    return names + [str(address) for address in pod_subnet.hosts()]


def nats_objects(
    directory: Path,
    *,
    cluster: str,
    nodes: Sequence[str],
    pod_subnet: ipaddress.IPv4Network,
    namespace: str,
    replicas: int,
) -> tuple[list[dict[str, Any]], NatsAuth]:
    """The NATS Secrets (seeds kept under `directory`) and the operator's client settings."""
    pki = Pki(directory / "nats-tls", common_name="apilane-test-nats-ca")
    hosts = nats_server_hosts(pod_subnet, namespace=namespace, replicas=replicas)
    server = issue_server_certificate(pki, hosts)
    seeds = directory / "seeds"
    identities = natsauth.identities_for(cluster, nodes)
    listed = natsauth.kubernetes_secrets(identities, seeds, ca_pem=pki.ca_pem, namespace=namespace)
    items = listed["items"]
    assert isinstance(items, list)
    tls = {
        "tls.crt": _b64(server.cert_path.read_bytes()),
        "tls.key": _b64(server.key_path.read_bytes()),
        "ca.crt": _b64(pki.ca_pem),
    }
    objects = [*items, _object("Secret", NATS_TLS_SECRET, namespace, type="Opaque", data=tls)]
    operator = Identity(role=Role.OPERATOR, cluster=cluster)
    auth = NatsAuth(
        nkey_seed_file=str(seeds / operator.seed_path), tls_ca_file=str(pki.ca_path)
    ).as_identity(operator.role, operator.cluster)
    return objects, auth


def make_deploy_secrets(
    directory: Path,
    *,
    nodes: Sequence[str],
    pod_subnet: ipaddress.IPv4Network,
    cluster: str = "default",
    namespace: str = "apilane",
    replicas: int = 3,
) -> DeploySecrets:
    """Every Secret and ConfigMap deploy/ mounts that deploy/ does not ship itself."""
    nats, operator = nats_objects(
        directory, cluster=cluster, nodes=nodes, pod_subnet=pod_subnet,
        namespace=namespace, replicas=replicas,
    )  # fmt: skip
    signing, key = signing_objects(namespace)
    return DeploySecrets(objects=nats + signing, signing_key=key, operator=operator)
