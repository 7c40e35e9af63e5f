"""StructCodec without the kernel: layouts derived from ctypes, byte order of port fields."""

from __future__ import annotations

import ctypes
import socket
import struct

import pytest

from apilane.model.errors import ApilaneError
from apilane.node_loader.bpfmaps import StructCodec

pytestmark = [pytest.mark.unit]


class _Key(ctypes.Structure):  # the shape of struct apilane_fe_key4
    _fields_ = [
        ("addr", ctypes.c_uint8 * 4),
        ("port", ctypes.c_uint16),
        ("proto", ctypes.c_uint8),
        ("pad", ctypes.c_uint8),
    ]


class _Value(ctypes.Structure):  # the shape of struct apilane_fe_value
    _fields_ = [
        ("service_id", ctypes.c_uint32),
        ("count", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


def test_a_network_order_codec_packs_ports_big_endian_and_pads_with_zeros() -> None:
    codec = StructCodec(_Key, ("addr", "port", "proto"), byte_order="network")
    packed = codec.struct.pack(socket.inet_aton("10.96.0.1"), 443, 6)
    assert packed == bytes([10, 96, 0, 1, 0x01, 0xBB, 6, 0])
    assert codec.unpack(packed) == {"addr": socket.inet_aton("10.96.0.1"), "port": 443, "proto": 6}


def test_a_native_codec_keeps_native_integers() -> None:
    codec = StructCodec(_Value)
    packed = codec.struct.pack(1, 2, 3)
    assert packed == bytes(_Value(1, 2, 3))


def test_network_order_is_refused_for_a_struct_with_native_integers() -> None:
    with pytest.raises(ApilaneError, match="not in network order"):
        StructCodec(_Value, byte_order="network")


def test_out_of_range_ports_do_not_pack() -> None:
    codec = StructCodec(_Key, ("addr", "port", "proto"), byte_order="network")
    for port in (-1, 65536):
        with pytest.raises(struct.error):
            codec.struct.pack(b"\0\0\0\0", port, 6)
