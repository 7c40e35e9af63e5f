"""NATS credentials for a stack that runs apart from the tests: docker compose's `nats-auth`
step (`python -m apilane.testing.nats_credentials`), made on the machine that runs it.

From an identities file (`apilane.runtime.natsauth`), it writes one directory per identity
(its nkey seed, the CA, and with mutual TLS a client certificate) and one for the server
(the generated accounts block, its certificate and key, the CA):

    OUT/server/                    accounts.conf  ca.crt  server.crt  server.key
    OUT/discovery/                 seed.nk  ca.crt  [client.crt  client.key]
    OUT/renderer/  OUT/operator/   (the same)
    OUT/node-loader-<node>/        (the same, one per node)

Compose mounts each directory as its own volume, so a service sees only its own seed. Run
again, it keeps what it made (the servers and services already use it): `docker compose
down -v` starts over. The certificates come from the throwaway CA of `apilane.testing.pki`,
valid for a year here; for a real cluster, see deploy/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

from apilane.runtime import natsauth
from apilane.runtime.natsauth import Identity, NatsAuthError, Role
from apilane.testing.nats import issue_server_certificate
from apilane.testing.pki import Pki

VALID_FOR = datetime.timedelta(days=365)


def directory_of(identity: Identity) -> str:
    if identity.role is Role.NODE_LOADER:
        return f"node-loader-{identity.node}"
    return str(identity.role)


def write_stack_credentials(
    out: Path,
    identities: Sequence[Identity],
    *,
    server_hosts: Sequence[str],
    mutual_tls: bool = True,
    owner: tuple[int, int] | None = None,
) -> bool:
    """Write everything (see the module docstring); False when it was there already.
    `owner` (uid, gid) gets the identities' directories, for services that do not run as
    root; the server's stays with the caller."""
    accounts = out / "server" / "accounts.conf"
    if accounts.exists():
        return False
    if len({i.cluster for i in identities}) != 1:
        raise NatsAuthError("a stack's identities belong to one cluster")
    work = out / ".work"
    pki = Pki(work / "pki", common_name="apilane-nats-stack-ca", valid_for=VALID_FOR)
    keyed = natsauth.provision(identities, work / "seeds")
    for identity in keyed:
        target = out / directory_of(identity)
        target.mkdir(parents=True, exist_ok=True)
        _copy(work / "seeds" / identity.seed_path, target / "seed.nk")
        _copy(pki.ca_path, target / "ca.crt", mode=0o644)
        if mutual_tls:
            pair = pki.issue(directory_of(identity), common_name=identity.name, client=True)
            _copy(pair.cert_path, target / "client.crt", mode=0o644)
            _copy(pair.key_path, target / "client.key")
        if owner is not None:
            for path in (target, *target.iterdir()):
                os.chown(path, *owner)
    server = issue_server_certificate(pki, server_hosts)
    (out / "server").mkdir(parents=True, exist_ok=True)
    _copy(pki.ca_path, out / "server" / "ca.crt", mode=0o644)
    _copy(server.cert_path, out / "server" / "server.crt", mode=0o644)
    _copy(server.key_path, out / "server" / "server.key")
    # Last: its presence says everything else is in place.
    accounts.write_text(natsauth.render_accounts(keyed))
    shutil.rmtree(work, ignore_errors=True)
    return True


def _copy(source: Path, target: Path, *, mode: int = 0o600) -> None:
    shutil.copyfile(source, target)
    target.chmod(mode)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m apilane.testing.nats_credentials")
    parser.add_argument("--identities", type=Path, required=True, help="a natsauth TOML file")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument(
        "--server-host", action="append", required=True, help="a name in the server cert"
    )
    parser.add_argument("--no-mutual-tls", action="store_true", help="no client certificates")
    parser.add_argument("--owner", default="", help="uid:gid for the identities' directories")
    args = parser.parse_args(argv)
    owner = None
    if args.owner:
        uid, _, gid = args.owner.partition(":")
        owner = (int(uid), int(gid or uid))
    try:
        made = write_stack_credentials(
            args.out,
            natsauth.load_identities(args.identities),
            server_hosts=args.server_host,
            mutual_tls=not args.no_mutual_tls,
            owner=owner,
        )
    except NatsAuthError as exc:
        print(f"nats_credentials: {exc}", file=sys.stderr)
        return 1
    print(f"nats credentials {'written to' if made else 'kept in'} {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
