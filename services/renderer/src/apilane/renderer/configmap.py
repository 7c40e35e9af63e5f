"""The ConfigMap the DaemonSet reads its API server endpoints from: pure, no I/O.

    live ConfigMap + the rendered env + what the live DaemonSet references --> ConfigMapPlan

In configmap mode the values live in one ConfigMap beside calico-node (one key per
variable, named like the variable), and the DaemonSet's target containers read them with
`valueFrom.configMapKeyRef`. An endpoint change is then a change of this ConfigMap alone:
the pod template, and with it the DaemonSet's generation, stays as it is, and no
calico-node pod restarts (only an init container reads the values, once, at pod start;
the node-loaders program every change live).

apilane creates the ConfigMap and marks it as its own (a label); a ConfigMap of that name
that is not marked is someone else's and is never written. A key apilane no longer
renders is removed only once no container of the live DaemonSet references it, so a pod
that starts from the old template in between still finds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from apilane.model.objects import as_dict, as_list, as_str
from apilane.renderer.ownership import CONTAINER_KINDS

MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
MANAGED_BY: Final = "apilane-renderer"


@dataclass(frozen=True, kw_only=True)
class DataChange:
    key: str
    old: str | None  # None: a new key
    new: str | None  # None: the key is removed


@dataclass(frozen=True, kw_only=True)
class ConfigMapPlan:
    namespace: str
    name: str
    exists: bool
    foreign: bool = False  # exists, but is not apilane's: never written
    changes: tuple[DataChange, ...] = ()
    resource_version: str = ""

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def unchanged(self) -> bool:
        return self.foreign or not self.changes

    @property
    def problems(self) -> tuple[str, ...]:
        if not self.foreign:
            return ()
        return (
            f"ConfigMap {self.ref} exists and was not made by apilane (no label"
            f" {MANAGED_BY_LABEL}={MANAGED_BY}); not written: name another with"
            " APILANE_CONFIGMAP_NAME",
        )

    def data(self) -> dict[str, str]:
        """The data after the changes (only the keys that stay)."""
        return {c.key: c.new for c in self.changes if c.new is not None}

    def body(self, *, annotations: Mapping[str, str] | None = None) -> dict[str, Any] | None:
        """The object to create, or the merge patch to send (guarded by the resourceVersion
        read); None when there is nothing to write."""
        if self.unchanged:
            return None
        metadata: dict[str, Any] = {"annotations": dict(annotations or {})}
        data: dict[str, str | None] = {change.key: change.new for change in self.changes}
        if not self.exists:
            metadata |= {
                "name": self.name,
                "namespace": self.namespace,
                "labels": {MANAGED_BY_LABEL: MANAGED_BY},
            }
            return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": metadata, "data": data}
        metadata["resourceVersion"] = self.resource_version
        return {"metadata": metadata, "data": data}

    def text(self) -> str:
        """The data change, in the diff style of `EnvDiff.text`."""
        where = "live" if self.exists else "absent"
        lines = [f"--- ConfigMap/{self.ref} ({where})", f"+++ ConfigMap/{self.ref} (desired)"]
        if self.changes and not self.foreign:
            lines.append("@@ data @@")
        for change in () if self.foreign else self.changes:
            if change.old is not None:
                lines.append(f"-{change.key}={change.old}")
            if change.new is not None:
                lines.append(f"+{change.key}={change.new}")
        lines += [f"! {problem}" for problem in self.problems]
        if self.unchanged and not self.foreign:
            lines.append("  (no change)")
        return "\n".join(lines) + "\n"


def is_ours(configmap: Mapping[str, Any]) -> bool:
    labels = as_dict(as_dict(configmap.get("metadata")).get("labels"))
    return labels.get(MANAGED_BY_LABEL) == MANAGED_BY


def referenced_keys(daemonset: Mapping[str, Any] | None, configmap: str) -> frozenset[str]:
    """The keys of `configmap` that any container of the DaemonSet reads."""
    if daemonset is None:
        return frozenset()
    pod_spec = as_dict(as_dict(as_dict(daemonset.get("spec")).get("template")).get("spec"))
    keys = set()
    for kind in CONTAINER_KINDS:
        for container in as_list(pod_spec.get(kind)):
            for entry in as_list(as_dict(container).get("env")):
                ref = as_dict(as_dict(as_dict(entry).get("valueFrom")).get("configMapKeyRef"))
                if as_str(ref.get("name")) == configmap and as_str(ref.get("key")):
                    keys.add(as_str(ref.get("key")))
    return frozenset(keys)


def plan(
    live: Mapping[str, Any] | None,
    wanted: Mapping[str, str],
    *,
    namespace: str,
    name: str,
    referenced: frozenset[str] = frozenset(),
) -> ConfigMapPlan:
    """What writing `wanted` into the ConfigMap changes. Keys not wanted go, unless the live
    DaemonSet still references them (`referenced`)."""
    if live is None:
        changes = tuple(DataChange(key=k, old=None, new=wanted[k]) for k in sorted(wanted))
        return ConfigMapPlan(namespace=namespace, name=name, exists=False, changes=changes)
    version = as_str(as_dict(live.get("metadata")).get("resourceVersion"))
    if not is_ours(live):
        return ConfigMapPlan(
            namespace=namespace, name=name, exists=True, foreign=True, resource_version=version
        )
    data = {k: as_str(v) for k, v in as_dict(live.get("data")).items()}
    found = []
    for key in sorted(set(wanted) | set(data)):
        old, new = data.get(key), wanted.get(key)
        if new is None and key in referenced:
            continue  # still read by the live template: it goes once nothing reads it
        if old != new:
            found.append(DataChange(key=key, old=old, new=new))
    return ConfigMapPlan(
        namespace=namespace,
        name=name,
        exists=True,
        changes=tuple(found),
        resource_version=version,
    )
