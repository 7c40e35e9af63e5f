"""discovery's settings: the shared Lease settings, named after the cluster."""

from __future__ import annotations

import pytest

from apilane.discovery.settings import load
from apilane.model.errors import ConfigError

pytestmark = [pytest.mark.unit]


def test_the_lease_settings_are_the_shared_ones_and_the_lease_is_named_after_the_cluster() -> None:
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


def test_leader_election_can_be_switched_off() -> None:
    assert not load({"APILANE_LEADER_ELECTION": "false"}).lease.enabled


def test_a_renew_interval_too_close_to_the_duration_is_refused() -> None:
    with pytest.raises(ConfigError, match="APILANE_LEASE_RENEW_INTERVAL"):
        load({"APILANE_LEASE_DURATION": "3s", "APILANE_LEASE_RENEW_INTERVAL": "2.5s"})
