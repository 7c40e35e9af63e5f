"""The renderer's settings: the same Lease settings as discovery, and the trusted keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from apilane.model.errors import ConfigError
from apilane.model.signing import SigningKey
from apilane.renderer.settings import load

pytestmark = [pytest.mark.unit]

DISCOVERY = SigningKey.generate()
TRUSTED = {"APILANE_TRUSTED_KEYS": DISCOVERY.public_text}


def test_the_lease_settings_are_the_shared_ones_and_the_lease_is_named_after_the_cluster() -> None:
    settings = load(
        TRUSTED
        | {
            "APILANE_CLUSTER": "east",
            "APILANE_POD_NAME": "renderer-0",
            "APILANE_LEASE_NAMESPACE": "ops",
            "APILANE_LEASE_DURATION": "9s",
            "APILANE_LEASE_RENEW_INTERVAL": "2s",
            "APILANE_LEASE_RETRY_INTERVAL": "500ms",
        }
    )
    lease = settings.lease
    assert (lease.enabled, lease.namespace, lease.name) == (True, "ops", "apilane-renderer-east")
    assert (lease.duration, lease.renew_interval, lease.retry_interval) == (9.0, 2.0, 0.5)
    assert settings.identity == lease.identity == "renderer-0"


def test_leader_election_can_be_switched_off() -> None:
    assert not load(TRUSTED | {"APILANE_LEADER_ELECTION": "false"}).lease.enabled


@pytest.mark.parametrize(
    "environ",
    [
        {"APILANE_LEASE_DURATION": "3s", "APILANE_LEASE_RENEW_INTERVAL": "2.5s"},
        {"APILANE_LEASE_NAMESPACE": "Not_A_Label"},
    ],
)
def test_bad_lease_settings_are_refused_naming_the_variable(environ: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="APILANE_LEASE_"):
        load(TRUSTED | environ)


def test_without_a_trusted_key_the_renderer_does_not_start() -> None:
    with pytest.raises(ConfigError, match="APILANE_TRUSTED_KEYS"):
        load({})


def test_two_keys_are_trusted_at_once_during_a_rotation(tmp_path: Path) -> None:
    rotated = SigningKey.generate()
    keys_file = tmp_path / "trusted"
    keys_file.write_text(f"# the key discovery switches to\n{rotated.public_text}\n")
    settings = load(TRUSTED | {"APILANE_TRUSTED_KEYS_FILE": str(keys_file)})
    assert settings.trusted_keys.ids == tuple(sorted((DISCOVERY.key_id, rotated.key_id)))
