"""node-loader settings: node names as Kubernetes allows them, state file names that fit."""

from __future__ import annotations

from pathlib import Path

import pytest

from apilane.model import subjects
from apilane.model.errors import ConfigError
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.statefile import PersistedState, StateFile

pytestmark = [pytest.mark.unit]

LONGEST_NODE = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters
BASE = {"APILANE_MAP_BACKEND": "memory"}


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
