"""The environment of a node-loader under test: one node, its own NATS identity, its own
directories. Only strings: the loader itself is built by the test (in process or as a child).
"""

from __future__ import annotations

from pathlib import Path

from apilane.testing.sealing import trusted_env


def loader_env(
    nats_env: dict[str, str],
    *,
    cluster: str,
    node: str,
    workdir: Path,
    heartbeat: str = "300ms",
    **overrides: str,
) -> dict[str, str]:
    """`nats_env` is the node's APILANE_NATS_* (`NatsServer.env(Role.NODE_LOADER, …)`); maps
    in memory, pins and state below `workdir`; discovery's test key trusted. `overrides`
    are further APILANE_* variables (`APILANE_MAP_BACKEND="bpf"`, …) and win."""
    return {
        **nats_env,
        "APILANE_CLUSTER": cluster,
        "APILANE_NODE_NAME": node,
        # Test backends are addresses no probe may reach from this host: probing is off.
        "APILANE_BACKEND_PROBE": "off",
        "APILANE_MAP_BACKEND": "memory",
        "APILANE_BPF_PIN_DIR": str(workdir / "pins"),
        "APILANE_STATE_DIR": str(workdir / "state"),
        "APILANE_NODE_STATE_INTERVAL": heartbeat,
        **trusted_env(),
        **overrides,
    }
