"""Calico's ip:port env format: table tests for every refusal, property tests for the rest."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from apilane.model.envformat import (
    EnvFormatError,
    EnvFormatErrorKind,
    IpPort,
    canonical,
    parse_ip_ports,
    render_ip_ports,
)
from apilane.model.errors import ApilaneError

pytestmark = [pytest.mark.unit]


def ip_port(ip: str, port: int) -> IpPort:
    return IpPort.of(ip, port)


@pytest.mark.parametrize(
    ("entries", "expected"),
    [
        pytest.param([ip_port("10.96.0.1", 443)], "10.96.0.1:443", id="one-ipv4"),
        pytest.param([ip_port("fd00:10:96::1", 443)], "[fd00:10:96::1]:443", id="one-ipv6"),
        pytest.param(
            [ip_port("fd00:10:96::1", 443), ip_port("10.96.0.1", 443)],
            "10.96.0.1:443,[fd00:10:96::1]:443",
            id="dual-stack-ipv4-first",
        ),
        pytest.param(
            [
                ip_port("192.168.5.5", 6443),
                ip_port("192.168.5.4", 6443),
                ip_port("fd00::5:5", 6443),
            ],
            "192.168.5.4:6443,192.168.5.5:6443,[fd00::5:5]:6443",
            id="numeric-address-order",
        ),
        pytest.param(
            [ip_port("10.0.0.10", 443), ip_port("10.0.0.9", 443)],
            "10.0.0.9:443,10.0.0.10:443",
            id="numeric-not-lexical",
        ),
        pytest.param(
            [ip_port("10.0.0.1", 8443), ip_port("10.0.0.1", 443)],
            "10.0.0.1:443,10.0.0.1:8443",
            id="then-port",
        ),
        pytest.param(
            [ip_port("10.0.0.1", 443), ip_port("10.0.0.1", 443)], "10.0.0.1:443", id="dedup"
        ),
        pytest.param(
            [ip_port("FD00:0:0::0001", 443)], "[fd00::1]:443", id="ipv6-compressed-lowercase"
        ),
        pytest.param([], "", id="empty"),
    ],
)
def test_render_is_canonical(entries: list[IpPort], expected: str) -> None:
    assert render_ip_ports(entries) == expected
    assert render_ip_ports(reversed(entries)) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("10.96.0.1:443", [("10.96.0.1", 443)]),
        ("10.96.0.1:443,[fd00:10:96::1]:443", [("10.96.0.1", 443), ("fd00:10:96::1", 443)]),
        (" 10.0.0.2:6443 , 10.0.0.1:6443 ", [("10.0.0.2", 6443), ("10.0.0.1", 6443)]),
        ("[::1]:65535", [("::1", 65535)]),
        ("127.0.0.1:1", [("127.0.0.1", 1)]),
        ("10.0.0.1:0443", [("10.0.0.1", 443)]),
        ("[::ffff:1.2.3.4]:443", [("::ffff:1.2.3.4", 443)]),
    ],
)
def test_parse_accepts_calico_format(text: str, expected: list[tuple[str, int]]) -> None:
    assert parse_ip_ports(text) == tuple(ip_port(ip, port) for ip, port in expected)


@pytest.mark.parametrize(
    ("text", "kind"),
    [
        ("", EnvFormatErrorKind.EMPTY_ENTRY),
        ("   ", EnvFormatErrorKind.EMPTY_ENTRY),
        ("10.0.0.1:443,", EnvFormatErrorKind.EMPTY_ENTRY),
        (",10.0.0.1:443", EnvFormatErrorKind.EMPTY_ENTRY),
        ("10.0.0.1:443,,10.0.0.2:443", EnvFormatErrorKind.EMPTY_ENTRY),
        ("10.0.0.1", EnvFormatErrorKind.MISSING_PORT),
        ("10.0.0.1:", EnvFormatErrorKind.MISSING_PORT),
        ("[fd00::1]", EnvFormatErrorKind.MISSING_PORT),
        ("[fd00::1]:", EnvFormatErrorKind.MISSING_PORT),
        ("10.0.0.1:0", EnvFormatErrorKind.PORT_OUT_OF_RANGE),
        ("10.0.0.1:65536", EnvFormatErrorKind.PORT_OUT_OF_RANGE),
        ("10.0.0.1:99999999999999999999", EnvFormatErrorKind.PORT_OUT_OF_RANGE),
        ("[fd00::1]:0", EnvFormatErrorKind.PORT_OUT_OF_RANGE),
        ("10.0.0.1:https", EnvFormatErrorKind.INVALID_PORT),
        ("10.0.0.1:-1", EnvFormatErrorKind.INVALID_PORT),
        ("10.0.0.1:+443", EnvFormatErrorKind.INVALID_PORT),
        ("10.0.0.1:\u0664\u0664\u0663", EnvFormatErrorKind.INVALID_PORT),  # Arabic-Indic digits
        ("[fd00::1]443", EnvFormatErrorKind.INVALID_PORT),
        ("10.0.0:443", EnvFormatErrorKind.INVALID_IP),  # Calico's 3-octet case
        ("010.0.0.1:443", EnvFormatErrorKind.INVALID_IP),
        ("kubernetes.default:443", EnvFormatErrorKind.INVALID_IP),
        (":443", EnvFormatErrorKind.INVALID_IP),
        ("[10.0.0.1]:443", EnvFormatErrorKind.INVALID_IP),
        ("[fe80::1%eth0]:443", EnvFormatErrorKind.INVALID_IP),
        ("[fd00::1:443", EnvFormatErrorKind.INVALID_IP),
        ("fd00::1:443", EnvFormatErrorKind.UNBRACKETED_IPV6),
        ("fd00::1", EnvFormatErrorKind.UNBRACKETED_IPV6),
        ("10.0.0.1:443,10.0.0.1:443", EnvFormatErrorKind.DUPLICATE),
        ("[fd00::1]:443,[fd00:0::1]:443", EnvFormatErrorKind.DUPLICATE),
    ],
)
def test_parse_refuses_with_a_typed_reason(text: str, kind: EnvFormatErrorKind) -> None:
    with pytest.raises(EnvFormatError) as caught:
        parse_ip_ports(text)
    assert caught.value.kind is kind
    assert isinstance(caught.value, ApilaneError)


def test_errors_name_the_entry_and_its_position() -> None:
    with pytest.raises(EnvFormatError) as caught:
        parse_ip_ports("10.0.0.1:443,10.0.0.2")
    assert caught.value.index == 1
    assert caught.value.entry == "10.0.0.2"
    assert "entry 2" in str(caught.value)


def test_empty_is_allowed_only_when_asked() -> None:
    assert parse_ip_ports("", allow_empty=True) == ()


def test_an_entry_cannot_be_built_with_a_bad_port() -> None:
    with pytest.raises(EnvFormatError):
        IpPort.of("10.0.0.1", 0)
    with pytest.raises(EnvFormatError):
        IpPort.of("not-an-ip", 443)


ipv4 = st.ip_addresses(v=4)
ipv6 = st.ip_addresses(v=6).filter(lambda a: a.scope_id is None)
ports = st.integers(min_value=1, max_value=65535)
entries = st.builds(
    IpPort, st.one_of(ipv4, ipv6).map(lambda a: ipaddress.ip_address(str(a))), ports
)


@given(st.sets(entries, max_size=20))
def test_render_then_parse_gives_back_the_set(values: set[IpPort]) -> None:
    text = render_ip_ports(values)
    if not values:
        assert text == ""
        return
    parsed = parse_ip_ports(text)
    assert set(parsed) == values
    assert parsed == canonical(values)  # rendered order is the canonical order
    assert render_ip_ports(parsed) == text


@given(st.lists(entries, max_size=20))
def test_render_does_not_depend_on_input_order(values: list[IpPort]) -> None:
    assert render_ip_ports(values) == render_ip_ports(sorted(values, key=str, reverse=True))


_alphabet = st.sampled_from([*"0123456789abcdefABCDEF.:[],% \t\n-+x\u0664", "::", "]:"])


@settings(max_examples=500)
@given(st.one_of(st.text(), st.lists(_alphabet, max_size=40).map("".join)))
def test_parser_raises_only_its_own_error(text: str) -> None:
    try:
        parsed = parse_ip_ports(text)
    except EnvFormatError:
        return
    # Whatever it accepts renders back to an equivalent, parseable value.
    assert set(parse_ip_ports(render_ip_ports(parsed))) == set(parsed)
