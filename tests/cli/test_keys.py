"""`apilane keys generate` writes a key pair the services load."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from apilane.cli.main import main
from apilane.model.signing import SigningKey
from apilane.runtime.config import Env, load_signing_key, require_trusted_keys

pytestmark = [pytest.mark.unit]


def test_generate_writes_a_private_pem_only_its_owner_reads_and_the_public_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", str(tmp_path / "keys"), "--name", "discovery"]) == 0
    private, public = tmp_path / "keys/discovery.pem", tmp_path / "keys/discovery.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    key = load_signing_key(Env({"APILANE_SIGNING_KEY_FILE": str(private)}))
    trusted = require_trusted_keys(Env({"APILANE_TRUSTED_KEYS_FILE": str(public)}))
    assert trusted.ids == (key.key_id,)
    printed = capsys.readouterr().out
    assert key.key_id in printed and key.public_text in printed


def test_generate_refuses_to_overwrite_unless_forced(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["keys", "generate", str(tmp_path)]) == 0
    first = SigningKey.load(tmp_path / "signing.pem").key_id
    assert main(["keys", "generate", str(tmp_path)]) == 1
    assert "--force" in capsys.readouterr().err
    assert SigningKey.load(tmp_path / "signing.pem").key_id == first
    (tmp_path / "signing.pem").chmod(0o644)
    assert main(["keys", "generate", str(tmp_path), "--force"]) == 0
    assert SigningKey.load(tmp_path / "signing.pem").key_id != first
    assert stat.S_IMODE((tmp_path / "signing.pem").stat().st_mode) == 0o600
