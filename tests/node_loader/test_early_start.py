"""The compile child's settings read at process start (early.py) agree with settings.py."""

from __future__ import annotations

import pytest

from apilane.model.errors import ConfigError
from apilane.node_loader import __main__ as node_loader_main
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.early import CompileTarget, compile_target
from apilane.testing.sealing import trusted_env

pytestmark = [pytest.mark.unit]

BPF = {"APILANE_MAP_BACKEND": "bpf", "APILANE_CGROUP_PATH": "/sys/fs/cgroup/x", **trusted_env()}


@pytest.mark.parametrize(
    "extra",
    [
        {},
        {"APILANE_MAP_BACKEND": ""},  # empty: the default backend (bpf)
        {"APILANE_BPF_PIN_DIR": "/sys/fs/bpf/other"},
        {"APILANE_BPF_PIN_DIR": "  /sys/fs/bpf/spaced  "},
        {"APILANE_CGROUP_PATH": " /sys/fs/cgroup/y "},
        {"APILANE_ALLOW_ROOT_CGROUP": "TRUE"},
        {"APILANE_ALLOW_ROOT_CGROUP": " yes "},
        {"APILANE_ALLOW_ROOT_CGROUP": "on"},
        {"APILANE_ALLOW_ROOT_CGROUP": "0"},
        {"APILANE_ALLOW_ROOT_CGROUP": "Off"},
        {"APILANE_ALLOW_ROOT_CGROUP": ""},
        {"APILANE_STATE_DIR": "/var/run/loader-state"},
    ],
)
def test_the_early_read_gives_what_the_settings_give(extra: dict[str, str]) -> None:
    environ = BPF | extra
    loaded = loader_settings.load(environ)
    assert compile_target(environ) == CompileTarget(
        cgroup_path=loaded.cgroup_path,
        pin_dir=loaded.pin_dir,
        allow_root_cgroup=loaded.allow_root_cgroup,
        state_dir=loaded.state_dir,
    )
    target = compile_target(environ)
    assert target is not None and target.build_stamp == loaded.build_stamp


@pytest.mark.parametrize(
    "extra",
    [
        {"APILANE_MAP_BACKEND": "memory"},
        {"APILANE_MAP_BACKEND": "BPF"},  # not a backend settings.py knows
        {"APILANE_CGROUP_PATH": ""},
        {"APILANE_BPF_PIN_DIR": "relative/pins"},
        {"APILANE_STATE_DIR": "relative/state"},
        {"APILANE_ALLOW_ROOT_CGROUP": "maybe"},
    ],
)
def test_whatever_the_early_read_is_unsure_of_starts_no_child(extra: dict[str, str]) -> None:
    environ = BPF | extra
    assert compile_target(environ) is None
    # ... and is either no bpf backend or a bad setting the loader reports itself.
    try:
        loaded = loader_settings.load(environ)
    except ConfigError:
        return
    assert loaded.map_backend == "memory"


def test_allow_root_cgroup_is_true_only_when_plainly_said() -> None:
    for value in ("1", "true", "yes", "on", "True"):
        target = compile_target(BPF | {"APILANE_ALLOW_ROOT_CGROUP": value})
        assert target is not None and target.allow_root_cgroup, value
    unset = compile_target(BPF)
    assert unset is not None and not unset.allow_root_cgroup


@pytest.mark.parametrize("arguments", [["uninstall"], ["--help"], ["serve", "extra"]])
def test_only_serving_starts_the_compiler_early(
    arguments: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in BPF.items():
        monkeypatch.setenv(name, value)
    assert node_loader_main.start_compiler_early(arguments) is None


def test_a_refused_cgroup_starts_no_early_child(monkeypatch: pytest.MonkeyPatch) -> None:
    # The safety check runs before the child: a cgroup that is no cgroup2 directory.
    for name, value in (BPF | {"APILANE_CGROUP_PATH": "/nonexistent/cgroup"}).items():
        monkeypatch.setenv(name, value)
    assert node_loader_main.start_compiler_early([]) is None
