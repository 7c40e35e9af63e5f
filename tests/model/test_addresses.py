"""apilane.model.addresses: the one IP parser every package uses."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from apilane.model import addresses

pytestmark = [pytest.mark.unit]


def test_addresses_parse_to_family_canonical_text_number_and_unicast() -> None:
    assert addresses.parse("10.0.0.1") == ("IPv4", "10.0.0.1", 0x0A000001, True)
    six = addresses.parse("FD00:0::0:1")
    assert six is not None and six.family == "IPv6" and six.compressed == "fd00::1"
    # An IPv4-mapped IPv6 address is IPv6: families never mix in the maps.
    assert addresses.family_of("::ffff:10.96.0.1") == "IPv6"
    assert addresses.parse("0.0.0.0").unicast is False  # type: ignore[union-attr]
    assert addresses.parse("ff02::1").unicast is False  # type: ignore[union-attr]


@pytest.mark.parametrize("bad", ["", "banana", "10.0.0.300", " 10.0.0.1", "10.0.0.0/24"])
def test_text_that_is_no_address_gives_none_or_a_value_error(bad: str) -> None:
    assert addresses.parse(bad) is None
    assert addresses.ip_address(bad) is None
    assert addresses.family_or_none(bad) is None
    assert addresses.canonical(bad) is None
    with pytest.raises(ValueError, match="not an IP address"):
        addresses.family_of(bad)


@given(st.ip_addresses())
def test_parse_agrees_with_ipaddress(
    address: ipaddress.IPv4Address | ipaddress.IPv6Address,
) -> None:
    parsed = addresses.parse(str(address))
    assert parsed is not None
    assert parsed.compressed == address.compressed
    assert parsed.number == int(address)
    assert parsed.family == ("IPv6" if address.version == 6 else "IPv4")
    assert addresses.family_of_address(address) == parsed.family
