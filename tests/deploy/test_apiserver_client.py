"""The API client pod's pure parts (apilane.testing.apiserver_client): its script compiles,
its objects grant it exactly one read, its log lines parse, and `recovery` reads what the
lines after an apiserver's kill say."""

from __future__ import annotations

import json

import pytest

from apilane.testing import apiserver_client
from apilane.testing.apiserver_client import ClientLine, parse_lines, recovery, served_on

pytestmark = [pytest.mark.unit]

KILLED = "kube-apiserver-2"


def cri(*records: dict[str, object]) -> str:
    return "".join(
        f"2026-12-01T15:00:00.{i:09d}Z stdout F {json.dumps(r)}\n" for i, r in enumerate(records)
    )


def ok(n: int, at: float, connection: int, server: str) -> ClientLine:
    return ClientLine(number=n, at=at, connection=connection, local_port=40000 + connection,
                      server=server, status=200)  # fmt: skip


def failed(n: int, at: float, connection: int) -> ClientLine:
    return ClientLine(number=n, at=at, connection=connection, error="ConnectionResetError()")


def test_the_script_compiles_and_reads_the_slice_through_the_service_variables() -> None:
    compile(apiserver_client.CLIENT_SCRIPT, "client", "exec")
    assert "KUBERNETES_SERVICE_HOST" in apiserver_client.CLIENT_SCRIPT
    assert repr(apiserver_client.SLICE_PATH) in apiserver_client.CLIENT_SCRIPT


def test_the_client_may_get_the_kubernetes_slice_and_nothing_else() -> None:
    objects = apiserver_client.client_objects(namespace="apilane", image="img")
    kinds = {o["kind"]: o for o in objects}
    assert set(kinds) == {"ServiceAccount", "Role", "RoleBinding", "Pod"}
    assert kinds["Role"]["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "resourceNames": ["kubernetes"],
            "verbs": ["get"],
        }
    ]
    assert kinds["RoleBinding"]["subjects"] == [
        {"kind": "ServiceAccount", "name": apiserver_client.NAME, "namespace": "apilane"}
    ]
    pod = kinds["Pod"]["spec"]
    assert pod["serviceAccountName"] == apiserver_client.NAME
    assert pod["containers"][0]["image"] == "img"
    assert "hostNetwork" not in pod


def test_log_lines_parse_and_anything_else_is_skipped() -> None:
    text = cri(
        {"n": 1, "connection": 1, "local_port": 41000, "server": "kube-apiserver-1",
         "status": 200, "endpoints": ["198.18.9.1", "198.18.9.253"], "t": 10.5},
        {"n": 2, "connection": 2, "error": "ConnectionRefusedError(111)", "t": 11.0},
    )  # fmt: skip
    text += "2026-12-01T15:00:01Z stderr F Traceback (most recent call last):\n"
    text += "2026-12-01T15:00:01Z stdout F {not json\n"
    lines = parse_lines(text)
    assert lines == [
        ClientLine(number=1, at=10.5, connection=1, local_port=41000, server="kube-apiserver-1",
                   status=200, endpoints=("198.18.9.1", "198.18.9.253")),
        ClientLine(number=2, at=11.0, connection=2, error="ConnectionRefusedError(111)"),
    ]  # fmt: skip
    assert lines[0].ok and not lines[1].ok
    assert served_on(lines, 1) == 1 and served_on(lines, 2) == 0


def test_recovery_after_the_kill_of_the_apiserver_the_client_was_on() -> None:
    lines = [
        ok(1, 1.0, 1, KILLED),
        ok(2, 1.5, 1, KILLED),
        failed(3, 2.5, 1),  # killed at 2.0: the connection breaks
        failed(4, 3.0, 4),  # a new connection to the dead backend, not yet left out
        ok(5, 3.5, 5, "kube-apiserver-0"),
        ok(6, 4.0, 5, "kube-apiserver-0"),
        ok(7, 4.5, 7, "kube-apiserver-1"),
    ]
    assert recovery(lines, connection=1, killed_at=2.0, run=4) is None
    found = recovery(lines, connection=1, killed_at=2.0, run=3)
    assert found is not None
    assert found.broken and found.errors == 2
    assert found.first_ok == lines[4]
    assert found.after == tuple(lines[4:])


def test_a_request_ending_well_as_the_kill_is_sent_then_the_break() -> None:
    lines = [ok(1, 1.0, 1, KILLED), ok(2, 2.01, 1, KILLED), failed(3, 2.5, 1)]
    lines += [ok(4, 3.0, 4, "kube-apiserver-0")]
    found = recovery(lines, connection=1, killed_at=2.0, run=1)
    assert found is not None and found.broken and found.errors == 1
    assert found.first_ok == lines[3]


def test_a_connection_still_serving_after_the_kill_is_no_break() -> None:
    lines = [ok(1, 1.0, 1, KILLED), ok(2, 2.5, 1, KILLED), ok(3, 3.0, 3, "kube-apiserver-0")]
    found = recovery(lines, connection=1, killed_at=2.0, run=1)
    assert found is not None and not found.broken and found.errors == 0


def test_no_recovery_while_every_request_since_the_kill_fails() -> None:
    lines = [ok(1, 1.0, 1, KILLED), failed(2, 2.5, 1), failed(3, 3.0, 3), failed(4, 3.5, 4)]
    assert recovery(lines, connection=1, killed_at=2.0, run=1) is None
