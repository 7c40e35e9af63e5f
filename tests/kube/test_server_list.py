"""The client's API server list: the configured server first, then the endpoints its service
saw last; a failure moves on to the next, once per failure of the current one."""

from __future__ import annotations

import pytest

from apilane.kube.client import ServerList, endpoint_url

pytestmark = [pytest.mark.unit]

CONFIGURED = "https://10.96.0.1:443"


def test_the_configured_server_comes_first_then_the_endpoints_without_duplicates() -> None:
    servers = ServerList(CONFIGURED + "/")
    assert servers.urls == (CONFIGURED,)
    servers.update(["https://198.18.0.10:6443", CONFIGURED, "https://198.18.0.10:6443/"])
    assert servers.urls == (CONFIGURED, "https://198.18.0.10:6443")
    assert servers.current == CONFIGURED


def test_a_failure_moves_on_round_the_list_once_per_failure() -> None:
    servers = ServerList(CONFIGURED)
    assert servers.failed(CONFIGURED) is None  # nothing else to go to
    servers.update(["https://198.18.0.10:6443", "https://198.18.0.11:6443"])
    assert servers.failed(CONFIGURED) == "https://198.18.0.10:6443"
    # A second request that failed against the old server does not skip the new one.
    assert servers.failed(CONFIGURED) is None
    assert servers.current == "https://198.18.0.10:6443"
    assert servers.failed("https://198.18.0.10:6443") == "https://198.18.0.11:6443"
    assert servers.failed("https://198.18.0.11:6443") == CONFIGURED


def test_the_current_server_stays_while_listed_else_the_configured_one_is_used() -> None:
    servers = ServerList(CONFIGURED)
    servers.update(["https://198.18.0.10:6443", "https://198.18.0.11:6443"])
    servers.failed(CONFIGURED)
    servers.update(["https://198.18.0.12:6443", "https://198.18.0.10:6443"])
    assert servers.current == "https://198.18.0.10:6443"
    servers.update(["https://198.18.0.12:6443"])
    assert servers.current == CONFIGURED
    servers.update([])
    assert servers.urls == (CONFIGURED,)


def test_endpoint_urls_bracket_ipv6_and_refuse_bad_addresses() -> None:
    assert endpoint_url("198.18.0.10", 6443) == "https://198.18.0.10:6443"
    assert endpoint_url("fd00:10:96::1", 443) == "https://[fd00:10:96::1]:443"
    with pytest.raises(ValueError):
        endpoint_url("not-an-ip", 6443)
    with pytest.raises(ValueError):
        endpoint_url("198.18.0.10", 0)
