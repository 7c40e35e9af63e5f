"""The Secrets and ConfigMaps made for the one-node cluster (apilane.testing.deploy_secrets):
everything deploy/ mounts exists, and the keys made work together (the signing key is the
trusted one)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from apilane.model.signing import TrustedKeys
from apilane.testing import deploy_secrets

pytestmark = [pytest.mark.unit]

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


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
def made() -> deploy_secrets.DeploySecrets:
    return deploy_secrets.make_deploy_secrets()


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
