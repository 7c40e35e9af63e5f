"""`apilane keys generate`: an Ed25519 key pair for signing snapshots or control requests.

The private key goes to a PEM file only its owner can read (discovery's APILANE_SIGNING_KEY_FILE,
or the operator's APILANE_OPERATOR_KEY_FILE); the public key is printed, and written beside
it, in the form APILANE_TRUSTED_KEYS / APILANE_OPERATOR_KEYS take.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TextIO

from apilane.cli.errors import CliError
from apilane.model.signing import SigningKey


def generate(out_dir: Path, name: str, *, force: bool, out: TextIO) -> int:
    private_path, public_path = out_dir / f"{name}.pem", out_dir / f"{name}.pub"
    if not force and (private_path.exists() or public_path.exists()):
        raise CliError(f"{private_path} or {public_path} exists: keep it, or pass --force")
    key = SigningKey.generate()
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_private(private_path, key.to_pem())
        public_path.write_text(f"# {key.key_id}\n{key.public_text}\n")
    except OSError as exc:
        raise CliError(f"cannot write the key pair to {out_dir}: {exc.strerror}") from exc
    print(f"key id:      {key.key_id}", file=out)
    print(f"private key: {private_path} (mode 0600)", file=out)
    print(f"public key:  {key.public_text}  (also in {public_path})", file=out)
    return 0


def write_private(path: Path, pem: bytes) -> None:
    """Created 0600 from the start, so the key is never readable by others, not even briefly."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    descriptor = os.open(path, flags, 0o600)
    try:
        os.fchmod(descriptor, 0o600)  # an existing file (--force) keeps no wider mode
        os.write(descriptor, pem)
    finally:
        os.close(descriptor)
