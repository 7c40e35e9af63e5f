"""A small API client pod for the one-node cluster: it talks to the API server at the
`kubernetes` ClusterIP only, and logs which apiserver answered each request.

The pod (`client_objects`) runs a stdlib-only Python loop on a local image: every INTERVAL it
GETs the `kubernetes` EndpointSlice with its service account's token, over one keep-alive
connection that it replaces after PER_CONNECTION requests or at the first error (a connect()
to the ClusterIP each time, so the connect-time load balancer picks a backend each time). Each
request is one JSON line on stdout (`ClientLine`): when it ended, the request's number, the
connection's number (that of the request which opened it) and local port, and either the
serving certificate's common name (the apiserver, `HAControlPlane.apiserver_name`) with the
HTTP status and the addresses listed, or the error.

`recovery` is the pure core of "kill the apiserver the pod is talking to": what the lines
after the kill say.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

NAME = "apiserver-client"
INTERVAL = 0.5
PER_CONNECTION = 6
SLICE_PATH = "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices/kubernetes"

CLIENT_SCRIPT = f"""
import http.client, json, os, ssl, time
SA = "/var/run/secrets/kubernetes.io/serviceaccount/"
context = ssl.create_default_context(cafile=SA + "ca.crt")
host, port = os.environ["KUBERNETES_SERVICE_HOST"], int(os.environ["KUBERNETES_SERVICE_PORT"])
conn, number, served, opened, server, local = None, 0, 0, 0, "", 0
while True:
    number += 1
    line = {{"n": number}}
    try:
        if conn is None:
            opened, served = number, 0
            conn = http.client.HTTPSConnection(host, port, context=context, timeout=2)
            conn.connect()
            local = conn.sock.getsockname()[1]
            subject = dict(pair[0] for pair in conn.sock.getpeercert()["subject"])
            server = subject["commonName"]
        line.update(connection=opened, local_port=local)
        token = open(SA + "token").read().strip()
        conn.request("GET", {SLICE_PATH!r}, headers={{"Authorization": "Bearer " + token}})
        response = conn.getresponse()
        body = json.loads(response.read() or b"{{}}")
        served += 1
        addresses = [a for e in body.get("endpoints") or [] for a in e.get("addresses", [])]
        line.update(server=server, status=response.status, endpoints=sorted(addresses))
        if served >= {PER_CONNECTION}:
            conn.close()
            conn = None
    except Exception as exc:
        line.update(connection=opened, error=repr(exc))
        if conn is not None:
            conn.close()
        conn = None
    line["t"] = time.time()
    print(json.dumps(line), flush=True)
    time.sleep({INTERVAL})
"""


def client_objects(*, namespace: str, image: str) -> list[dict[str, Any]]:
    """The client's ServiceAccount, its one permission (get the `kubernetes` EndpointSlice)
    and the pod, which runs on `image` (a local one with python3)."""
    labels = {"app.kubernetes.io/name": NAME}
    account = {"kind": "ServiceAccount", "name": NAME, "namespace": namespace}
    return [
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": NAME, "namespace": "default", "labels": labels},
            "rules": [
                {
                    "apiGroups": ["discovery.k8s.io"],
                    "resources": ["endpointslices"],
                    "resourceNames": ["kubernetes"],
                    "verbs": ["get"],
                }
            ],
        },
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": NAME, "namespace": "default", "labels": labels},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": NAME},
            "subjects": [account],
        },
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": NAME, "namespace": namespace, "labels": labels},
            "spec": {
                "serviceAccountName": NAME,
                "terminationGracePeriodSeconds": 1,
                "containers": [
                    {
                        "name": "client",
                        "image": image,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python3", "-u", "-c", CLIENT_SCRIPT],
                        "resources": {"requests": {"cpu": "5m", "memory": "16Mi"}},
                    }
                ],
            },
        },
    ]


@dataclass(frozen=True)
class ClientLine:
    """One request of the client, as it logged it."""

    number: int
    at: float
    connection: int
    local_port: int = 0
    server: str = ""
    status: int = 0
    endpoints: tuple[str, ...] = ()
    error: str = ""

    @property
    def ok(self) -> bool:
        return not self.error and self.status == 200


def parse_lines(cri_log: str) -> list[ClientLine]:
    """The client's lines from its CRI log file (`<time> <stream> <tag> <text>` a line);
    anything else the container printed (a traceback, say) is skipped."""
    found: list[ClientLine] = []
    for raw in cri_log.splitlines():
        parts = raw.split(" ", 3)
        if len(parts) < 4 or not parts[3].startswith("{"):
            continue
        try:
            data = json.loads(parts[3])
            found.append(
                ClientLine(
                    number=int(data["n"]),
                    at=float(data["t"]),
                    connection=int(data.get("connection", 0)),
                    local_port=int(data.get("local_port", 0)),
                    server=str(data.get("server", "")),
                    status=int(data.get("status", 0)),
                    endpoints=tuple(data.get("endpoints", ())),
                    error=str(data.get("error", "")),
                )
            )
        except (ValueError, KeyError, TypeError):
            continue
    return found


def served_on(lines: Sequence[ClientLine], connection: int) -> int:
    """How many requests the connection has served so far."""
    return sum(1 for line in lines if line.connection == connection and line.ok)


@dataclass(frozen=True)
class Recovery:
    """What the client's lines after the kill of the apiserver it was on say."""

    broken: bool  # the connection that was on the killed apiserver ended in an error
    errors: int  # failed requests after the kill, before the first success
    first_ok: ClientLine  # the first request served after the kill on another connection
    after: tuple[ClientLine, ...]  # every request from the first success on


def recovery(
    lines: Iterable[ClientLine], *, connection: int, killed_at: float, run: int
) -> Recovery | None:
    """The recovery once `run` requests have ended since the first one served after the kill
    on a connection made after it (None until then). `killed_at` is when the kill was sent
    (a request to the dying process may still end well just after); `connection` is the one
    that was on the killed apiserver, which must end in an error (the client replaces a
    connection at its first error)."""
    later = [line for line in lines if line.at > killed_at]
    first = next(
        (i for i, line in enumerate(later) if line.ok and line.connection != connection), None
    )
    if first is None or len(later) - first < run:
        return None
    on_old = [line for line in later if line.connection == connection]
    return Recovery(
        broken=bool(on_old) and not on_old[-1].ok,
        errors=sum(1 for line in later[:first] if not line.ok),
        first_ok=later[first],
        after=tuple(later[first:]),
    )
