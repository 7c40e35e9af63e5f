"""`apilane node lb on|off NODE` against the real pieces: a nats-server with the production
authentication and permissions, and a node-loader in-process on MemoryNatMaps (the programs
recorded, not attached; the kernel side is tests/node_loader). The command runs through the
console script's `main`, in a thread of its own, as the operator's NATS identity."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from apilane.cli.errors import CliError
from apilane.cli.main import main
from apilane.cli.node import Refusal, outcome, parse_reply, sealed_request
from apilane.cli.target import Flags, StackInfo
from apilane.model import events, signing
from apilane.model.events import NodeState
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.node_loader import settings as loader_settings
from apilane.node_loader.memmaps import MemoryNatMaps
from apilane.node_loader.service import DataPlane, NodeLoader
from apilane.node_loader.testing import RecordedPrograms, running
from apilane.runtime import natsauth
from apilane.runtime.bus import Bus
from apilane.runtime.natsauth import Role
from apilane.testing.loaders import loader_env
from apilane.testing.nats import NatsServer
from apilane.testing.sealing import trusted_env

CLUSTER = "lb-test"
NODE = "node-a.example"
NOW = signing.utcnow()


# --------------------------------------------------------------------------- pure


@pytest.mark.unit
def test_the_request_is_sealed_for_that_node_and_cluster_only() -> None:
    key = SigningKey.generate()
    data = sealed_request(key, cluster=CLUSTER, node=NODE, enabled=False, now=NOW)
    request = signing.open_control(
        data, TrustedKeys.of(key), cluster=CLUSTER, node=NODE, now=NOW, last_accepted=None
    )
    assert (request.connect_time_lb, request.issued_at) == (False, NOW)
    with pytest.raises(signing.Refused) as refused:
        signing.open_control(
            data, TrustedKeys.of(key), cluster=CLUSTER, node="node-b", now=NOW, last_accepted=None
        )
    assert refused.value.reason == "misdirected"


@pytest.mark.unit
def test_replies_are_a_node_state_or_a_refusal() -> None:
    state = NodeState(
        cluster=CLUSTER, node=NODE, generation=3, digest="sha256:x", connect_time_lb=False
    )
    assert parse_reply(events.encode(state)) == state
    refusal = b'{"error": "bad control request: replayed", "reason": "replay"}'
    assert parse_reply(refusal) == Refusal(reason="replay", error="bad control request: replayed")
    with pytest.raises(CliError, match="not a node state"):
        parse_reply(b"what")


@pytest.mark.unit
def test_the_exit_code_says_whether_the_switch_happened() -> None:
    off = NodeState(cluster=CLUSTER, node=NODE, generation=3, digest="x", connect_time_lb=False)
    assert outcome(NODE, False, off) == (
        0,
        f"node {NODE}: connect-time LB off, 0 programs attached, generation 3",
    )
    code, text = outcome(NODE, True, off)
    assert code == 1 and text.endswith("asked for on, not done")
    failed = NodeState(
        cluster=CLUSTER,
        node=NODE,
        generation=3,
        digest="x",
        connect_time_lb=True,
        last_error="attaching programs: EPERM",
    )
    code, text = outcome(NODE, True, failed)
    assert code == 1 and text.endswith("not done: attaching programs: EPERM")
    assert outcome(NODE, False, Refusal("stale", "too old"))[0] == 1


@pytest.mark.unit
def test_without_an_operator_key_it_says_how_to_get_one(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("APILANE_OPERATOR_KEY_FILE", raising=False)
    code = main(["--nats-url", "nats://127.0.0.1:1", "node", "lb", "off", NODE])
    assert code == 1
    assert "no operator key: set APILANE_OPERATOR_KEY_FILE" in capsys.readouterr().err


# --------------------------------------------------------------------------- real pieces


class Node:
    """One node-loader in-process, trusting `operator` for control requests."""

    def __init__(self, nats_server: NatsServer, operator: SigningKey, tmp_path: Path) -> None:
        self.env = loader_env(
            nats_server.env(Role.NODE_LOADER, CLUSTER, NODE),
            cluster=CLUSTER,
            node=NODE,
            workdir=tmp_path,
            heartbeat="30s",
            **trusted_env(operator, name="APILANE_OPERATOR_KEYS"),
        )
        self.maps = MemoryNatMaps()
        self.programs = RecordedPrograms(names=("apilane_connect4",))

    def running(self) -> contextlib.AbstractAsyncContextManager[NodeLoader]:
        loader = NodeLoader(
            settings=loader_settings.load(self.env),
            data_plane=DataPlane(maps=self.maps, programs=self.programs),
            registry=CollectorRegistry(),
        )
        return running(loader)


def write_key(tmp_path: Path, key: SigningKey, name: str) -> Path:
    path = tmp_path / f"{name}.pem"
    path.write_bytes(key.to_pem())
    path.chmod(0o600)
    return path


async def apilane(env: dict[str, str], *argv: str) -> int:
    """The command line with `env` as its environment's APILANE_* (the operator's)."""

    def run() -> int:
        with pytest.MonkeyPatch.context() as patch:
            for name, value in env.items():
                patch.setenv(name, value)
            return main(list(argv))

    return await asyncio.to_thread(run)


@pytest.fixture
def operator() -> SigningKey:
    return SigningKey.generate()


@pytest.fixture
def operator_env(nats_server: NatsServer, operator: SigningKey, tmp_path: Path) -> dict[str, str]:
    """What an operator has: NATS as the operator's identity, the operator's private key."""
    return nats_server.env(Role.OPERATOR, CLUSTER) | {
        "APILANE_CLUSTER": CLUSTER,
        "APILANE_OPERATOR_KEY_FILE": str(write_key(tmp_path, operator, "operator")),
    }


@pytest.mark.integration
@pytest.mark.nats
async def test_lb_off_then_on_switches_the_node_and_keeps_its_maps(
    bus: Bus,
    nats_server: NatsServer,
    operator: SigningKey,
    operator_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = Node(nats_server, operator, tmp_path)
    async with node.running() as loader:
        assert node.programs.calls == ["enable"]
        operations = node.maps.operations
        assert await apilane(operator_env, "node", "lb", "off", NODE) == 0
        assert capsys.readouterr().out == (
            f"node {NODE}: connect-time LB off, 0 programs attached, generation 0\n"
        )
        assert loader.connect_time_lb is False and node.programs.calls[-1] == "disable"
        # Options after the command work too; a second request is a new one (issued later).
        assert await apilane(operator_env, "node", "lb", "on", NODE, "--cluster", CLUSTER) == 0
        assert "connect-time LB on, 1 programs attached" in capsys.readouterr().out
        assert loader.connect_time_lb is True and node.programs.calls[-1] == "enable"
        assert node.maps.operations == operations  # the maps were never touched
        assert loader.reconciler.control_issued_at is not None


@pytest.mark.integration
@pytest.mark.nats
async def test_a_key_the_node_does_not_trust_is_refused_and_changes_nothing(
    bus: Bus,
    nats_server: NatsServer,
    operator: SigningKey,
    operator_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    node = Node(nats_server, operator, tmp_path)
    stranger = write_key(tmp_path, SigningKey.generate(), "stranger")
    async with node.running() as loader:
        code = await apilane(
            operator_env | {"APILANE_OPERATOR_KEY_FILE": str(stranger)}, "node", "lb", "off", NODE
        )
        assert code == 1
        assert f"node {NODE} refused the request (unknown-key)" in capsys.readouterr().out
        assert loader.connect_time_lb is True and node.programs.calls == ["enable"]


@pytest.mark.integration
@pytest.mark.nats
async def test_only_the_operator_identity_may_send_control_requests(
    bus: Bus,
    nats_server: NatsServer,
    operator: SigningKey,
    operator_env: dict[str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With the operator's signing key but the renderer's NATS identity, the request never
    reaches the node: the server refuses the control subject to that identity."""
    node = Node(nats_server, operator, tmp_path)
    as_renderer = operator_env | nats_server.env(Role.RENDERER, CLUSTER)
    async with node.running() as loader:
        assert await apilane(as_renderer, "node", "lb", "off", NODE) == 1
        err = capsys.readouterr().err
        assert "NATS refused the request to this identity" in err
        assert "permissions violation" in err.lower()
        assert loader.connect_time_lb is True and node.programs.calls == ["enable"]


@pytest.mark.integration
@pytest.mark.nats
async def test_a_node_without_a_loader_is_named_in_the_error(
    bus: Bus, operator_env: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    assert await apilane(operator_env, "node", "lb", "off", "node-gone") == 1
    err = capsys.readouterr().err
    assert f"no answer from node node-gone in cluster {CLUSTER!r}" in err


@pytest.mark.unit
def test_a_named_stack_takes_the_operator_key_and_identity_from_the_environment(
    tmp_path: Path,
) -> None:
    seed = tmp_path / "operator.nk"
    natsauth.write_seed(seed, natsauth.new_user_seed())
    info = StackInfo.load(
        Flags(nats_urls=("nats://127.0.0.1:4222",)),
        environ={
            "APILANE_OPERATOR_KEY_FILE": "/keys/operator.pem",
            "APILANE_NATS_NKEY_SEED_FILE": str(seed),
        },
    )
    assert info.operator_key_file == "/keys/operator.pem"
    assert info.nats_auth.nkey_seed_file == str(seed)
