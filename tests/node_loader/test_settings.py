"""node-loader settings: node names as Kubernetes allows them, state file names that fit."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.model.signing import SigningKey
from apilane.node_loader import __main__ as node_loader_main
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.statefile import PersistedState, StateFile
from apilane.testing.sealing import trusted_env

pytestmark = [pytest.mark.unit]

LONGEST_NODE = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
BASE = {"APILANE_MAP_BACKEND": "memory", **trusted_env()}


def test_a_253_character_node_name_is_accepted() -> None:
    loaded = loader_settings.load(BASE | {"APILANE_NODE_NAME": LONGEST_NODE})
    assert loaded.node_name == LONGEST_NODE
    assert subjects.node_state_key(loaded.common.cluster, loaded.node_name).endswith(
        LONGEST_NODE.replace(".", "_")
    )


@pytest.mark.parametrize("bad", ["x" * 254, "node_1", "-node", "node."])
def test_a_node_name_kubernetes_would_refuse_stops_the_loader_at_start(bad: str) -> None:
    with pytest.raises(ConfigError, match="APILANE_NODE_NAME"):
        loader_settings.load(BASE | {"APILANE_NODE_NAME": bad})


def test_the_state_file_name_fits_whatever_the_pin_dir(tmp_path: Path) -> None:
    deep = "/sys/fs/bpf/" + "/".join(["p" * 60] * 8)  # a 500-character pin dir
    names = set()
    for pin_dir in (deep, deep + "x", "/sys/fs/bpf/apilane"):
        loaded = loader_settings.load(
            BASE | {"APILANE_BPF_PIN_DIR": pin_dir, "APILANE_STATE_DIR": str(tmp_path)}
        )
        name = loaded.state_file.name
        assert len(name.encode()) <= 255 - len(".-4194304.tmp") - 1, name
        names.add(name)
        # The file can really be written and read under that name.
        StateFile(loaded.state_file).save(PersistedState())
        assert StateFile(loaded.state_file).load() == PersistedState()
    assert len(names) == 3  # distinct pin dirs never share a state file
    short = loader_settings.load(BASE | {"APILANE_BPF_PIN_DIR": "/sys/fs/bpf/apilane"})
    assert short.state_file.name == "sys_fs_bpf_apilane.state.json"


def test_serving_needs_a_trusted_key_and_uninstall_does_not(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for name in list(os.environ):
        if name.startswith("APILANE_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("APILANE_MAP_BACKEND", "memory")
    assert node_loader_main.main(["serve"]) == 2
    assert "APILANE_TRUSTED_KEYS" in capsys.readouterr().err
    unkeyed = loader_settings.load({"APILANE_MAP_BACKEND": "memory"}, serving=False)
    assert not unkeyed.trusted() and not unkeyed.operators()


def test_trusted_and_operator_keys_are_read_from_their_variables_and_files(
    tmp_path: Path,
) -> None:
    snapshots, rotated, operator = (SigningKey.generate() for _ in range(3))
    keys_file = tmp_path / "operators"
    keys_file.write_text(f"# the on-call operator\n{operator.public_text}\n")
    loaded = loader_settings.load(
        BASE
        | {
            "APILANE_TRUSTED_KEYS": f"{snapshots.public_text},{rotated.public_text}",
            "APILANE_OPERATOR_KEYS_FILE": str(keys_file),
        }
    )
    assert set(loaded.trusted().ids) == {snapshots.key_id, rotated.key_id}
    assert loaded.operators().ids == (operator.key_id,)
    with pytest.raises(ConfigError, match="APILANE_TRUSTED_KEYS"):
        loader_settings.load(BASE | {"APILANE_TRUSTED_KEYS": "bm90IGEga2V5"})


def test_backend_probes_default_to_tcp_every_300ms_three_failures() -> None:
    probe = loader_settings.load(BASE).probe
    assert probe == loader_settings.ProbeSettings(
        kind="tcp", interval=0.3, timeout=1.0, failures_to_fail=3, passes_to_recover=2
    )
    assert probe.enabled
    assert not loader_settings.load(BASE | {"APILANE_BACKEND_PROBE": "off"}).probe.enabled


def test_backend_probe_settings_are_read(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not parsed here")
    probe = loader_settings.load(
        BASE
        | {
            "APILANE_BACKEND_PROBE": "https",
            "APILANE_PROBE_INTERVAL": "100ms",
            "APILANE_PROBE_TIMEOUT": "50ms",
            "APILANE_PROBE_FAILURES": "5",
            "APILANE_PROBE_PASSES": "1",
            "APILANE_PROBE_NETNS": "/run/netns/x",
            "APILANE_PROBE_CA_FILE": str(ca),
        }
    ).probe
    assert (probe.kind, probe.interval, probe.timeout) == ("https", 0.1, 0.05)
    assert (probe.failures_to_fail, probe.passes_to_recover) == (5, 1)
    assert (probe.netns, probe.ca_file) == ("/run/netns/x", str(ca))


@pytest.mark.parametrize(
    ("name", "value", "fragment"),
    [
        ("APILANE_BACKEND_PROBE", "icmp", "one of tcp, https, off"),
        ("APILANE_PROBE_INTERVAL", "10ms", "APILANE_PROBE_INTERVAL"),
        ("APILANE_PROBE_INTERVAL", "soon", "APILANE_PROBE_INTERVAL"),
        ("APILANE_PROBE_TIMEOUT", "0s", "APILANE_PROBE_TIMEOUT"),
        ("APILANE_PROBE_FAILURES", "0", "APILANE_PROBE_FAILURES"),
        ("APILANE_PROBE_FAILURES", "101", "APILANE_PROBE_FAILURES"),
        ("APILANE_PROBE_PASSES", "0", "APILANE_PROBE_PASSES"),
        ("APILANE_PROBE_NETNS", "run/netns/x", "absolute path"),
        ("APILANE_PROBE_CA_FILE", "/nonexistent/ca.pem", "no such file"),
    ],
)
def test_bad_backend_probe_settings_stop_the_loader_at_start(
    name: str, value: str, fragment: str
) -> None:
    with pytest.raises(ConfigError, match=fragment):
        loader_settings.load(BASE | {name: value})
