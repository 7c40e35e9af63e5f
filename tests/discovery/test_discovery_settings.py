"""discovery's settings: the shared Lease settings, named after the cluster; the signing key."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from apilane.discovery.settings import DiscoverySettings
from apilane.discovery.settings import load as load_settings
from apilane.model.errors import ConfigError
from apilane.testing.sealing import write_signing_key

pytestmark = [pytest.mark.unit]


@pytest.fixture
def load(tmp_path: Path) -> Callable[[dict[str, str]], DiscoverySettings]:
    _, key_file = write_signing_key(tmp_path)
    return lambda environ: load_settings({"APILANE_SIGNING_KEY_FILE": str(key_file)} | environ)


def test_the_lease_settings_are_the_shared_ones_and_the_lease_is_named_after_the_cluster(
    load: Callable[[dict[str, str]], DiscoverySettings],
) -> None:
    settings = load(
        {
            "APILANE_CLUSTER": "east",
            "APILANE_POD_NAME": "discovery-0",
            "APILANE_LEASE_NAMESPACE": "ops",
            "APILANE_LEASE_DURATION": "9s",
            "APILANE_LEASE_RENEW_INTERVAL": "2s",
            "APILANE_LEASE_RETRY_INTERVAL": "500ms",
        }
    )
    lease = settings.lease
    assert (lease.enabled, lease.namespace, lease.name) == (True, "ops", "apilane-discovery-east")
    assert (lease.duration, lease.renew_interval, lease.retry_interval) == (9.0, 2.0, 0.5)
    assert settings.identity == lease.identity == "discovery-0"


def test_leader_election_can_be_switched_off(
    load: Callable[[dict[str, str]], DiscoverySettings],
) -> None:
    assert not load({"APILANE_LEADER_ELECTION": "false"}).lease.enabled


def test_a_renew_interval_too_close_to_the_duration_is_refused(
    load: Callable[[dict[str, str]], DiscoverySettings],
) -> None:
    with pytest.raises(ConfigError, match="APILANE_LEASE_RENEW_INTERVAL"):
        load({"APILANE_LEASE_DURATION": "3s", "APILANE_LEASE_RENEW_INTERVAL": "2.5s"})


def test_the_signing_key_is_required_and_the_ttl_defaults_to_an_hour(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="APILANE_SIGNING_KEY_FILE"):
        load_settings({})
    key, key_file = write_signing_key(tmp_path)
    settings = load_settings({"APILANE_SIGNING_KEY_FILE": str(key_file)})
    assert settings.signing_key.key_id == key.key_id
    assert settings.snapshot_ttl == 3600.0
    shorter = {"APILANE_SIGNING_KEY_FILE": str(key_file), "APILANE_SNAPSHOT_TTL": "10m"}
    assert load_settings(shorter).snapshot_ttl == 600.0


def test_a_key_file_that_is_not_an_ed25519_pem_is_refused_naming_the_variable(
    tmp_path: Path,
) -> None:
    bad = tmp_path / "key.pem"
    bad.write_text("not a key")
    with pytest.raises(ConfigError, match="APILANE_SIGNING_KEY_FILE"):
        load_settings({"APILANE_SIGNING_KEY_FILE": str(bad)})


def test_the_anti_entropy_settings_default_to_a_second_and_half_a_second_to_ten(
    load: Callable[[dict[str, str]], DiscoverySettings],
) -> None:
    settings = load({})
    assert (
        settings.key_check_interval,
        settings.reassert_interval,
        settings.reassert_interval_max,
    ) == (1.0, 0.5, 10.0)
    tuned = load(
        {
            "APILANE_KEY_CHECK_INTERVAL": "250ms",
            "APILANE_REASSERT_INTERVAL": "1s",
            "APILANE_REASSERT_INTERVAL_MAX": "1m",
        }
    )
    assert (tuned.key_check_interval, tuned.reassert_interval, tuned.reassert_interval_max) == (
        0.25,
        1.0,
        60.0,
    )


def test_a_reassert_maximum_below_the_interval_is_refused(
    load: Callable[[dict[str, str]], DiscoverySettings],
) -> None:
    with pytest.raises(ConfigError, match="APILANE_REASSERT_INTERVAL_MAX"):
        load({"APILANE_REASSERT_INTERVAL": "5s", "APILANE_REASSERT_INTERVAL_MAX": "1s"})


def test_stream_replicas_default_to_one_and_are_bounded(
    load: Callable[[dict[str, str]], DiscoverySettings],
) -> None:
    assert load({}).stream_replicas == 1
    assert load({"APILANE_STREAM_REPLICAS": "3"}).stream_replicas == 3
    for bad in ("0", "6", "three"):
        with pytest.raises(ConfigError, match="APILANE_STREAM_REPLICAS"):
            load({"APILANE_STREAM_REPLICAS": bad})
