"""What deploy/ expects to exist before it is applied, made for one test cluster: discovery's
signing key (Secret) and the trusted keys the renderer and node-loader accept (ConfigMap).
deploy/README.md says how an installer makes each; this is the same, with a throwaway key.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

from apilane.model.signing import SigningKey

SIGNING_SECRET = "apilane-signing-key"
SIGNING_SECRET_KEY = "signing-key.pem"
TRUSTED_CONFIGMAP = "apilane-trusted-keys"
TRUSTED_CONFIGMAP_KEY = "keys"


@dataclass(frozen=True)
class DeploySecrets:
    """The objects to create before deploy/, and the keys they hold."""

    objects: list[dict[str, Any]]
    signing_key: SigningKey


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


def make_deploy_secrets(*, namespace: str = "apilane") -> DeploySecrets:
    """Every Secret and ConfigMap deploy/ mounts that deploy/ does not ship itself."""
    objects, key = signing_objects(namespace)
    return DeploySecrets(objects=objects, signing_key=key)
