"""`PinnedNatMaps` and `PinnedConnections`: the kernel maps opened by their pins, without bcc.

The long-running loader never imports bcc (LLVM would stay resident): a short-lived child
compiles bpf/connect_lb.c and pins the maps (compile.py), and this process opens the pins
with bpf_obj_get and does the same map I/O as `BccNatMaps` (batch operations, one codec per
struct) through libbpf's calls.

The C layouts are mirrored here as ctypes structs. They are checked, not trusted: the child
reports the layouts bcc derived from bpf/nat.h, `check_layouts` compares them field by field,
and opening a pin compares its kernel key and value sizes with the structs.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import socket
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from apilane.node_loader import libbpf
from apilane.node_loader.bpfmaps import (
    CONNECTION_TABLE_NAME,
    TABLE_NAMES,
    KernelNatMaps,
    KernelTable,
    ip_text,
    layout_of,
    nat_codecs,
)
from apilane.node_loader.libbpf import ProgramError
from apilane.node_loader.nat import BackendValue

_U8, _U16, _U32 = ctypes.c_uint8, ctypes.c_uint16, ctypes.c_uint32


class FeKey4(ctypes.Structure):
    _fields_ = [("addr", _U32), ("port", _U16), ("proto", _U8), ("pad", _U8)]


class FeKey6(ctypes.Structure):
    _fields_ = [("addr", _U32 * 4), ("port", _U16), ("proto", _U8), ("pad", _U8)]


class FeValue(ctypes.Structure):
    _fields_ = [("service_id", _U32), ("count", _U32), ("flags", _U32)]


class BeKey(ctypes.Structure):
    _fields_ = [("service_id", _U32), ("ordinal", _U32)]


class BeValue4(ctypes.Structure):
    _fields_ = [("addr", _U32), ("port", _U16), ("pad", _U16)]


class BeValue6(ctypes.Structure):
    _fields_ = [("addr", _U32 * 4), ("port", _U16), ("pad", _U16)]


class ConnValue(ctypes.Structure):
    _fields_ = [("addr", _U32 * 4), ("port", _U16), ("family", _U8), ("pad", _U8)]


# bpf/nat.h: map name -> (key struct, value struct). The connections map's key is a __u64.
LAYOUTS: dict[str, tuple[type[Any], type[Any]]] = {
    "apilane_fe4": (FeKey4, FeValue),
    "apilane_fe6": (FeKey6, FeValue),
    "apilane_be4": (BeKey, BeValue4),
    "apilane_be6": (BeKey, BeValue6),
    CONNECTION_TABLE_NAME: (ctypes.c_uint64, ConnValue),
}


def describe_layout(ctype: type[Any]) -> list[list[Any]]:
    """[name, offset, size] of each field of a struct, or [["", 0, size]] for a scalar."""
    if issubclass(ctype, ctypes.Structure):
        return [[f.name, f.offset, f.size] for f in layout_of(ctype)]
    return [["", 0, ctypes.sizeof(ctype)]]


def check_layouts(reported: Mapping[str, Mapping[str, Any]]) -> None:
    """Compare the layouts the compiler reported (bcc's types from nat.h) with the mirrored
    structs; a difference is a ProgramError naming the map and side."""
    for name, (key_type, value_type) in LAYOUTS.items():
        got = reported.get(name)
        if got is None:
            raise ProgramError(f"the compiler reported no layout for {name}")
        for side, ctype in (("key", key_type), ("leaf", value_type)):
            expected = describe_layout(ctype)
            actual = [list(field) for field in got.get(side, [])]
            if actual != expected:
                raise ProgramError(
                    f"{name} {side} layout from bpf/nat.h {actual} != the loader's {expected}"
                )


def open_pinned_map(pin: Path, key_type: type[Any], value_type: type[Any]) -> int:
    """A descriptor of the map pinned at `pin`, checked against the mirrored struct sizes."""
    fd = libbpf.open_pinned(pin)
    if fd is None:
        raise ProgramError(f"no map pinned at {pin}")
    try:
        info = libbpf.map_info(fd)
        sizes = (ctypes.sizeof(key_type), ctypes.sizeof(value_type))
        if (info.key_size, info.value_size) != sizes:
            raise ProgramError(
                f"{pin}: key/value sizes {info.key_size}/{info.value_size} != {sizes}"
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


class PinnedNatMaps(KernelNatMaps):
    """`NatMaps` over the NAT maps pinned at `pins` (map name -> pin path)."""

    def __init__(self, pins: Mapping[str, Path], *, use_batch: bool | None = None) -> None:
        self._fds: list[int] = []
        tables: dict[str, KernelTable] = {}
        try:
            for pair in TABLE_NAMES.values():
                for name in pair:
                    tables[name] = self._open(name, pins[name])
        except BaseException:
            self.close()
            raise
        super().__init__(
            {family: tables[fe] for family, (fe, _) in TABLE_NAMES.items()},
            {family: tables[be] for family, (_, be) in TABLE_NAMES.items()},
            use_batch=use_batch,
        )

    def _open(self, name: str, pin: Path) -> KernelTable:
        key_type, value_type = LAYOUTS[name]
        fd = open_pinned_map(pin, key_type, value_type)
        self._fds.append(fd)
        key, leaf = nat_codecs(name, key_type, value_type)
        calls = libbpf.MapCalls()
        return KernelTable(
            name=name,
            fd=fd,
            max_entries=libbpf.map_info(fd).max_entries,
            key=key,
            leaf=leaf,
            batch=True,
            ops=calls,
            read_items=lambda: _items(calls, fd, key.size, leaf.size),
        )

    def close(self) -> None:
        fds, self._fds = self._fds, []
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _items(calls: libbpf.MapCalls, fd: int, key_size: int, value_size: int) -> Iterator[Any]:
    """Every (key, value) of a map, one get_next_key + lookup each (no batch operations)."""
    key = ctypes.create_string_buffer(key_size)
    next_key = ctypes.create_string_buffer(key_size)
    value = ctypes.create_string_buffer(value_size)
    previous = None
    while calls.bpf_get_next_key(fd, previous, next_key) == 0:
        ctypes.memmove(key, next_key, key_size)
        previous = key
        if calls.bpf_lookup_elem(fd, key, value) == 0:  # deleted meanwhile: skip it
            yield key.raw, value.raw


class PinnedConnections:
    """The connections map (apilane_conn) by its pin: socket cookie -> backend."""

    def __init__(self, pin: Path) -> None:
        key_type, value_type = LAYOUTS[CONNECTION_TABLE_NAME]
        self._fd = open_pinned_map(pin, key_type, value_type)
        self._calls = libbpf.MapCalls()

    def lookup(self, cookies: Iterable[int]) -> dict[int, BackendValue]:
        """The recorded backend of each cookie that has one (point lookups)."""
        found: dict[int, BackendValue] = {}
        leaf = ConnValue()
        for cookie in cookies:
            key = ctypes.c_uint64(cookie)
            if self._calls.bpf_lookup_elem(self._fd, ctypes.byref(key), ctypes.byref(leaf)):
                continue
            packed = bytes(leaf.addr)
            found[cookie] = BackendValue(
                ip=ip_text(packed[:4] if leaf.family == 4 else packed),
                port=socket.ntohs(leaf.port),
            )
        return found

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self._fd)
