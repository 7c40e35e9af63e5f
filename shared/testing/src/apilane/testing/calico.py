"""calico-node's env as the kubelet would give it to a container, for tests that follow
endpoints into the DaemonSet: literal values, and the configMapKeyRefs the renderer's
configmap mode writes, read from the live ConfigMaps."""

from __future__ import annotations

from typing import Any

from apilane.kube.client import KubeClient, NotFound


async def container_env(
    kube: KubeClient, daemonset: dict[str, Any], kind: str, container: str
) -> dict[str, str]:
    """`kind` is "initContainers" or "containers". Other valueFrom kinds (fieldRef, ...) and
    references to a missing ConfigMap or key are left out, as the kubelet would fail them."""
    namespace = daemonset["metadata"]["namespace"]
    configmaps: dict[str, dict[str, str]] = {}
    resolved: dict[str, str] = {}
    for entry in daemonset["spec"]["template"]["spec"].get(kind, []):
        if entry["name"] != container:
            continue
        for item in entry.get("env", []):
            if "valueFrom" not in item:
                resolved[item["name"]] = item.get("value", "")
                continue
            ref = item["valueFrom"].get("configMapKeyRef")
            if ref is None:
                continue
            if ref["name"] not in configmaps:
                try:
                    found = await kube.get(
                        f"/api/v1/namespaces/{namespace}/configmaps/{ref['name']}"
                    )
                except NotFound:
                    found = {}
                configmaps[ref["name"]] = dict(found.get("data") or {})
            if ref["key"] in configmaps[ref["name"]]:
                resolved[item["name"]] = configmaps[ref["name"]][ref["key"]]
    return resolved
