"""Whether a controller renders the target DaemonSet whole: pure, no I/O.

tigera-operator renders `calico-system/calico-node` from its Installation resource and
reverts any outside edit of it on its next reconcile. Patching it would start a fight: every
patch a rollout, every revert another. So a DaemonSet the operator manages is never patched;
the renderer says so, keeps its ConfigMap current, and points at the operator's own switch.

What the operator leaves on the objects it manages (tigera/operator, the component handler):
a controller ownerReference to its `Installation` (API group operator.tigera.io), and the
labels `app.kubernetes.io/managed-by: tigera-operator` and
`app.kubernetes.io/component: Installation.operator.tigera.io`. It skips an object annotated
`unsupported.operator.tigera.io/ignore: "true"`: such a DaemonSet is the person's again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from apilane.model.objects import as_dict, as_list, as_str

OPERATOR: Final = "tigera-operator"
OPERATOR_GROUP: Final = "operator.tigera.io"
IGNORE_ANNOTATION: Final = "unsupported.operator.tigera.io/ignore"
MANAGED_BY_LABEL: Final = "app.kubernetes.io/managed-by"
COMPONENT_LABEL: Final = "app.kubernetes.io/component"


def operator_evidence(daemonset: Mapping[str, Any]) -> str | None:
    """Why tigera-operator manages this DaemonSet, or None when it does not (or was told
    to leave it alone)."""
    metadata = as_dict(daemonset.get("metadata"))
    if as_dict(metadata.get("annotations")).get(IGNORE_ANNOTATION) == "true":
        return None
    for owner in as_list(metadata.get("ownerReferences")):
        ref = as_dict(owner)
        group = as_str(ref.get("apiVersion")).partition("/")[0]
        if group == OPERATOR_GROUP:
            return (
                f"ownerReference {as_str(ref.get('kind'))}/{as_str(ref.get('name'))}"
                f" ({as_str(ref.get('apiVersion'))})"
            )
    labels = as_dict(metadata.get("labels"))
    if labels.get(MANAGED_BY_LABEL) == OPERATOR:
        return f"label {MANAGED_BY_LABEL}={OPERATOR}"
    component = as_str(labels.get(COMPONENT_LABEL))
    if component.endswith("." + OPERATOR_GROUP):
        return f"label {COMPONENT_LABEL}={component}"
    return None


def not_patched_message(daemonset_ref: str, evidence: str, *, configmap_ref: str | None) -> str:
    """What a person reads when apilane leaves an operator's DaemonSet alone, and what to do."""
    kept = (
        f" apilane keeps ConfigMap {configmap_ref} current with the same values."
        if configmap_ref is not None
        else ""
    )
    return (
        f"DaemonSet {daemonset_ref} is managed by {OPERATOR} ({evidence}): apilane does not"
        " patch it, the operator would revert the change on its next reconcile (and every"
        " round would roll calico-node). Let the operator render the API server endpoints:"
        " set spec.calicoNetwork.bpfNetworkBootstrap: Enabled (with linuxDataplane: BPF) in"
        " the Installation; it then writes KUBERNETES_SERVICE_IPS_PORTS and"
        " KUBERNETES_APISERVER_ENDPOINTS into calico-node from the kubernetes Service and its"
        " endpoints. The node-loaders keep programming every change live." + kept
    )
