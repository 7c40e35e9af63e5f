"""For manifest installs: the two env lines and a DaemonSet snippet, pure.

The snapshot they are rendered from comes from the bus, or, with `--kubeconfig`, from
`apilane.model.endpoints.build_snapshot` over the API objects (see cli.py): the same rules
discovery publishes by.
"""

from __future__ import annotations

from typing import Any

import yaml

from apilane.renderer.render import DesiredEnv


def env_lines(desired: DesiredEnv) -> str:
    """`NAME=value` lines, in a stable order."""
    return "".join(f"{name}={desired.env[name]}\n" for name in sorted(desired.env))


def daemonset_snippet(desired: DesiredEnv, *, namespace: str, name: str) -> str:
    """YAML to merge into the calico-node DaemonSet (usable as `kubectl patch --patch-file`)."""
    pod_spec: dict[str, Any] = {}
    for kind, containers in desired.by_kind():
        if containers:
            pod_spec[kind] = [
                {"name": container, "env": [{"name": k, "value": env[k]} for k in sorted(env)]}
                for container, env in containers.items()
            ]
    header = (
        f"# calico-node DaemonSet {namespace}/{name}: merge this env into your manifest, or apply it with\n"
        f"#   kubectl -n {namespace} patch daemonset {name} --type strategic --patch-file <this file>\n"
    )
    return header + yaml.safe_dump(
        {"spec": {"template": {"spec": pod_spec}}}, sort_keys=False, default_flow_style=False
    )
