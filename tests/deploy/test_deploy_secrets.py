"""The Secrets and ConfigMaps made for the one-node cluster (apilane.testing.deploy_secrets):
everything deploy/ mounts exists, each key a pod reads is there, and the keys made work
together (the signing key is the trusted one; the operator's seed and CA are on disk)."""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509

from apilane.model.signing import TrustedKeys
from apilane.runtime import natsauth
from apilane.testing import deploy_secrets

pytestmark = [pytest.mark.unit]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
SUBNET = ipaddress.IPv4Network("198.18.7.0/24")
NODE = "apilane-node"


def shipped() -> list[dict[str, Any]]:
    return [
        doc
        for path in sorted(DEPLOY.glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc
    ]


def pod_specs(docs: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for doc in docs:
        if doc["kind"] in ("Deployment", "DaemonSet", "StatefulSet"):
            yield doc["spec"]["template"]["spec"]


def mounted(docs: list[dict[str, Any]]) -> set[tuple[str, str]]:
    """(kind, name) of every Secret and ConfigMap a pod of deploy/ mounts or reads env from."""
    found: set[tuple[str, str]] = set()
    for spec in pod_specs(docs):
        for volume in spec.get("volumes", []):
            if "secret" in volume:
                found.add(("Secret", volume["secret"]["secretName"]))
            if "configMap" in volume:
                found.add(("ConfigMap", volume["configMap"]["name"]))
        for container in spec.get("containers", []) + spec.get("initContainers", []):
            for source in container.get("envFrom", []):
                if "secretRef" in source:
                    found.add(("Secret", source["secretRef"]["name"]))
                if "configMapRef" in source:
                    found.add(("ConfigMap", source["configMapRef"]["name"]))
    return found


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> deploy_secrets.DeploySecrets:
    return deploy_secrets.make_deploy_secrets(
        tmp_path_factory.mktemp("secrets"), nodes=[NODE], pod_subnet=SUBNET
    )


def test_every_secret_and_configmap_deploy_mounts_is_made(
    made: deploy_secrets.DeploySecrets,
) -> None:
    docs = shipped()
    shipped_here = {(d["kind"], d["metadata"]["name"]) for d in docs}
    made_here = {(o["kind"], o["metadata"]["name"]) for o in made.objects}
    missing = mounted(docs) - shipped_here - made_here
    assert not missing, missing
    assert {o["metadata"]["namespace"] for o in made.objects} == {"apilane"}


def data_of(made: deploy_secrets.DeploySecrets, kind: str, name: str) -> dict[str, str]:
    found = next(o for o in made.objects if o["kind"] == kind and o["metadata"]["name"] == name)
    if kind == "ConfigMap":
        return dict(found["data"])
    return {key: base64.b64decode(value).decode() for key, value in found["data"].items()}


def test_the_trusted_keys_name_the_signing_key(made: deploy_secrets.DeploySecrets) -> None:
    trusted = data_of(made, "ConfigMap", deploy_secrets.TRUSTED_CONFIGMAP)[
        deploy_secrets.TRUSTED_CONFIGMAP_KEY
    ]
    pem = data_of(made, "Secret", deploy_secrets.SIGNING_SECRET)[deploy_secrets.SIGNING_SECRET_KEY]
    assert TrustedKeys.parse(trusted).ids == (made.signing_key.key_id,)
    assert "PRIVATE KEY" in pem


def test_the_server_certificate_names_every_pod_and_the_pod_subnet(
    made: deploy_secrets.DeploySecrets,
) -> None:
    tls = data_of(made, "Secret", deploy_secrets.NATS_TLS_SECRET)
    cert = x509.load_pem_x509_certificate(tls["tls.crt"].encode())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    dns = set(names.get_values_for_type(x509.DNSName))
    ips = {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}
    assert {f"nats-{i}.nats-headless.apilane.svc" for i in range(3)} <= dns
    assert ips == {str(host) for host in SUBNET.hosts()}
    assert tls["ca.crt"] == Path(made.operator.tls_ca_file).read_text()


def test_the_operator_connects_with_a_seed_the_accounts_know(
    made: deploy_secrets.DeploySecrets,
) -> None:
    seed = natsauth.read_seed(Path(made.operator.nkey_seed_file))
    accounts = data_of(made, "Secret", f"{natsauth.SECRET_PREFIX}-accounts")["accounts.conf"]
    assert natsauth.public_key(seed) in accounts
    loader = data_of(made, "Secret", f"{natsauth.SECRET_PREFIX}-node-loader")
    assert f"{NODE}.nk" in loader
