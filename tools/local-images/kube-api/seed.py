"""The compose stack's one-shot seed: server-side apply of Kubernetes objects from YAML files.

Runs inside the kube-api image (Debian's python3 and python3-yaml, nothing else), so the
stack needs no kubectl. Usage: seed.py KUBECONFIG NAMESPACE FILE... -- creates NAMESPACE and
applies every document of every FILE. Idempotent (server-side apply with one field manager).
"""

import base64
import json
import ssl
import sys
import tempfile
import urllib.request

import yaml

FIELD_MANAGER = "apilane-compose-seed"


def tls_context(user: dict, cluster: dict) -> ssl.SSLContext:
    context = ssl.create_default_context(
        cadata=base64.b64decode(cluster["certificate-authority-data"]).decode()
    )
    with tempfile.NamedTemporaryFile("wb", suffix=".pem") as pem:
        pem.write(base64.b64decode(user["client-certificate-data"]))
        pem.write(base64.b64decode(user["client-key-data"]))
        pem.flush()
        context.load_cert_chain(pem.name)
    return context


def object_path(document: dict) -> str:
    api = document["apiVersion"]
    prefix = "/api/v1" if api == "v1" else f"/apis/{api}"
    metadata = document["metadata"]
    plural = document["kind"].lower() + "s"
    namespace = metadata.get("namespace")
    scope = f"/namespaces/{namespace}" if namespace else ""
    return f"{prefix}{scope}/{plural}/{metadata['name']}"


def apply(server: str, context: ssl.SSLContext, document: dict) -> None:
    request = urllib.request.Request(
        f"{server}{object_path(document)}?fieldManager={FIELD_MANAGER}&force=true",
        data=json.dumps(document).encode(),
        method="PATCH",
        headers={"Content-Type": "application/apply-patch+yaml"},
    )
    with urllib.request.urlopen(request, context=context, timeout=30) as response:
        response.read()
    print(f"applied {document['kind']} {document['metadata']['name']}", flush=True)


def main(kubeconfig_path: str, namespace: str, *files: str) -> int:
    with open(kubeconfig_path) as handle:
        config = yaml.safe_load(handle)
    cluster = config["clusters"][0]["cluster"]
    context = tls_context(config["users"][0]["user"], cluster)
    documents = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}}]
    for path in files:
        with open(path) as handle:
            documents += [doc for doc in yaml.safe_load_all(handle) if doc]
    for document in documents:
        apply(cluster["server"], context, document)
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
