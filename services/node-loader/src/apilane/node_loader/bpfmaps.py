"""`BccNatMaps`: the `NatMaps` interface over the pinned kernel NAT maps, through bcc.

The C layout lives once, in `bpf/nat.h`. This adapter never re-declares it: the ctypes key and
leaf types are bcc's, generated from that header when the program is compiled, and the byte
codecs below are derived from those types (field order, offsets, sizes) at start.

Writes use the kernel's batch operations (BPF_MAP_UPDATE_BATCH / DELETE_BATCH, Linux >= 5.6)
when the map supports them, and fall back to one syscall per element otherwise, or to find the
element a failed batch stopped at. Deleting a key that is not there succeeds (ENOENT).

`bcc` is imported lazily (only via the `bpf` object handed in), so the pure core and its tests
run on machines without it.
"""

from __future__ import annotations

import ctypes
import errno
import ipaddress
import os
import socket
import struct
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from apilane.node_loader.memmaps import MapWriteError
from apilane.node_loader.nat import (
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
    MapContents,
)
from apilane.shared.errors import ApilaneError

# Map names as declared in bpf/nat.h.
TABLE_NAMES: dict[Family, tuple[str, str]] = {
    "IPv4": ("apilane_fe4", "apilane_be4"),
    "IPv6": ("apilane_fe6", "apilane_be6"),
}
REVERSE_TABLE_NAMES: dict[Family, str] = {"IPv4": "apilane_rev4", "IPv6": "apilane_rev6"}

# Address fields: packed as raw bytes (network order), not integers. Ports are integers that
# callers convert with socket.htons/ntohs.
_BYTE_FIELDS = frozenset({"addr"})
_ADDRESS_FAMILY: dict[Family, int] = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}
# errno values meaning "this map or kernel has no batch operations".
_BATCH_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})  # 524: kernel ENOTSUPP
_BATCH_CHUNK = 8192


class MapReadError(ApilaneError):
    """A kernel map could not be read back."""


@dataclass(frozen=True, slots=True)
class FieldLayout:
    name: str
    offset: int
    size: int


class StructCodec:
    """Packs and unpacks one bcc-generated ctypes struct as bytes, in bulk.

    The `struct` format is derived from the ctypes type (fields by offset, gaps as pad bytes),
    so the layout still has a single source: nat.h -> bcc -> here. A codec for a subset of the
    fields treats the others (the pads) as zero bytes. Address fields (`addr`) are raw bytes in
    network order; integer fields are native, so callers pass ports through `socket.htons`.
    """

    _INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}

    def __init__(self, ctype: type[ctypes.Structure], names: Sequence[str] | None = None) -> None:
        self.ctype = ctype
        self.size = ctypes.sizeof(ctype)
        self.fields = layout_of(ctype)
        selected = set(names) if names is not None else {f.name for f in self.fields}
        unknown = selected - {f.name for f in self.fields}
        if unknown:
            raise ApilaneError(f"{ctype.__name__} has no field {sorted(unknown)}")
        fmt = ["="]  # native byte order, no implicit alignment: offsets come from ctypes
        position = 0
        chosen = []
        for field in self.fields:
            if field.name not in selected:
                continue
            if field.offset > position:
                fmt.append(f"{field.offset - position}x")
            if field.name in _BYTE_FIELDS or field.size not in self._INT_CODES:
                fmt.append(f"{field.size}s")
            else:
                fmt.append(self._INT_CODES[field.size])
            position = field.offset + field.size
            chosen.append(field.name)
        if self.size > position:
            fmt.append(f"{self.size - position}x")
        self.struct = struct.Struct("".join(fmt))
        if self.struct.size != self.size:
            raise ApilaneError(f"codec for {ctype.__name__}: {self.struct.size} != {self.size}")
        self.names = tuple(chosen)

    def pack_array(self, rows: Sequence[Sequence[Any]]) -> ctypes.Array[Any]:
        """An array of the ctypes type; each row holds the values of `names`, in order.
        Raises struct.error when a value does not fit its field."""
        pack = self.struct.pack
        buffer = b"".join([pack(*row) for row in rows])
        return (self.ctype * len(rows)).from_buffer_copy(buffer)

    def unpack_buffer(self, buffer: bytes) -> Iterator[tuple[Any, ...]]:
        return self.struct.iter_unpack(buffer)

    def unpack(self, instance: Any) -> dict[str, Any]:
        return dict(zip(self.names, self.struct.unpack(bytes(instance)), strict=True))


def layout_of(ctype: type[ctypes.Structure]) -> tuple[FieldLayout, ...]:
    """Name, offset and size of every field of a ctypes struct, in offset order."""
    fields = []
    for field in ctype._fields_:
        name, field_type = field[0], field[1]
        descriptor = getattr(ctype, name)
        fields.append(FieldLayout(name, descriptor.offset, ctypes.sizeof(field_type)))
    return tuple(sorted(fields, key=lambda f: f.offset))


@dataclass
class _Table:
    """One bcc table, codecs for the fields we write, and whether batch ops work on it."""

    name: str
    table: Any  # bcc.table.HashTable
    key: StructCodec
    leaf: StructCodec
    batch: bool

    @property
    def fd(self) -> int:
        return int(self.table.map_fd)


_FRONTEND_KEY_FIELDS = ("addr", "port", "proto")
_FRONTEND_VALUE_FIELDS = ("service_id", "count", "flags")
_BACKEND_KEY_FIELDS = ("service_id", "ordinal")
_BACKEND_VALUE_FIELDS = ("addr", "port")


class BccNatMaps:
    """`NatMaps` over the pinned kernel maps of a compiled bcc module (see programs.py).

    `use_batch`: None = use batch operations when the kernel accepts them; False = never
    (benchmarks compare both); True = require them (an error if the kernel refuses).
    Every write validates and encodes all its items before the first syscall, so bad input
    never changes the maps.
    """

    def __init__(self, bpf: Any, *, use_batch: bool | None = None) -> None:
        self._use_batch = use_batch
        self._frontends: dict[Family, _Table] = {}
        self._backends: dict[Family, _Table] = {}
        for family, (fe_name, be_name) in TABLE_NAMES.items():
            self._frontends[family] = self._open(
                bpf, fe_name, _FRONTEND_KEY_FIELDS, _FRONTEND_VALUE_FIELDS
            )
            self._backends[family] = self._open(
                bpf, be_name, _BACKEND_KEY_FIELDS, _BACKEND_VALUE_FIELDS
            )
        self.batch_supported: bool | None = None if use_batch is None else use_batch

    def _open(
        self, bpf: Any, name: str, key_fields: Sequence[str], value_fields: Sequence[str]
    ) -> _Table:
        table = bpf.get_table(name.encode())
        return _Table(
            name=name,
            table=table,
            key=StructCodec(table.Key, key_fields),
            leaf=StructCodec(table.Leaf, value_fields),
            batch=self._use_batch is not False,
        )

    # --- reads -------------------------------------------------------------------------------

    def dump(self, family: Family) -> MapContents:
        fe_table = self._frontends[family]
        be_table = self._backends[family]
        fe_keys, fe_values = self._read_all(fe_table)
        frontends = {
            FrontendKey(_ip_text(addr), socket.ntohs(port), proto): FrontendValue(
                service_id, count, flags
            )
            for (addr, port, proto), (service_id, count, flags) in zip(
                fe_table.key.unpack_buffer(fe_keys),
                fe_table.leaf.unpack_buffer(fe_values),
                strict=True,
            )
        }
        be_keys, be_values = self._read_all(be_table)
        backends = {
            BackendKey(service_id, ordinal): BackendValue(_ip_text(addr), socket.ntohs(port))
            for (service_id, ordinal), (addr, port) in zip(
                be_table.key.unpack_buffer(be_keys),
                be_table.leaf.unpack_buffer(be_values),
                strict=True,
            )
        }
        return MapContents(frontends=frontends, backends=backends)

    def _read_all(self, table: _Table) -> tuple[bytes, bytes]:
        """Every key and value of the map, as two packed byte strings."""
        if table.batch:
            try:
                return _lookup_batch(table)
            except _BatchRefused:
                self._batch_refused(table)
        try:
            items = table.table.items()
        except Exception as exc:
            raise MapReadError(f"reading {table.name}: {exc}") from exc
        return b"".join(bytes(k) for k, _ in items), b"".join(bytes(v) for _, v in items)

    # --- writes ------------------------------------------------------------------------------

    def update_frontends(self, family: Family, items: Mapping[FrontendKey, FrontendValue]) -> None:
        table = self._frontends[family]
        key_rows = [_frontend_key_row(family, key) for key in items]
        value_rows = [(v.service_id, v.count, v.flags) for v in items.values()]
        keys = _encode(table.key, key_rows, "frontend key")
        values = _encode(table.leaf, value_rows, "frontend value (service id, count, flags)")
        self._update(table, keys, values)

    def update_backends(self, family: Family, items: Mapping[BackendKey, BackendValue]) -> None:
        table = self._backends[family]
        key_rows = [(key.service_id, key.ordinal) for key in items]
        pton, address_family, htons = socket.inet_pton, _ADDRESS_FAMILY[family], socket.htons
        try:  # the hot path of a large reconcile: no per-element function of ours
            value_rows = [(pton(address_family, v.ip), htons(v.port)) for v in items.values()]
        except (OSError, TypeError, ValueError, OverflowError):
            value_rows = [
                (_ip_bytes(family, v.ip, "backend"), _port_nbo(v.port, "backend"))
                for v in items.values()
            ]
        keys = _encode(table.key, key_rows, "backend key (service id, ordinal)")
        values = _encode(table.leaf, value_rows, "backend value")
        self._update(table, keys, values)

    def delete_frontends(self, family: Family, keys: Iterable[FrontendKey]) -> None:
        table = self._frontends[family]
        rows = [_frontend_key_row(family, key) for key in keys]
        self._delete(table, _encode(table.key, rows, "frontend key"))

    def delete_backends(self, family: Family, keys: Iterable[BackendKey]) -> None:
        table = self._backends[family]
        rows = [(key.service_id, key.ordinal) for key in keys]
        self._delete(table, _encode(table.key, rows, "backend key (service id, ordinal)"))

    def _update(self, table: _Table, keys: list[Any], values: list[Any]) -> None:
        for key_array, value_array in zip(keys, values, strict=True):
            if table.batch:
                try:
                    table.table.items_update_batch(key_array, value_array)
                    if self.batch_supported is None:
                        self.batch_supported = True
                    continue
                except Exception:
                    if ctypes.get_errno() in _BATCH_UNSUPPORTED:
                        self._batch_refused(table)
                # Per element: finds the entry the batch stopped at (updates are idempotent).
            lib = _lib()
            for key, value in zip(key_array, value_array, strict=True):
                if lib.bpf_update_elem(table.fd, ctypes.byref(key), ctypes.byref(value), 0) < 0:
                    code = ctypes.get_errno()
                    raise MapWriteError(
                        f"{table.name}: update {table.key.unpack(key)} failed: "
                        f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
                    )

    def _delete(self, table: _Table, keys: list[Any]) -> None:
        for key_array in keys:
            if table.batch:
                try:
                    table.table.items_delete_batch(key_array)
                    continue
                except Exception:
                    # ENOENT stops a batch at a missing key; finish one by one.
                    if ctypes.get_errno() in _BATCH_UNSUPPORTED:
                        self._batch_refused(table)
            lib = _lib()
            for key in key_array:
                if lib.bpf_delete_elem(table.fd, ctypes.byref(key)) < 0:
                    code = ctypes.get_errno()
                    if code == errno.ENOENT:
                        continue
                    raise MapWriteError(
                        f"{table.name}: delete {table.key.unpack(key)} failed: "
                        f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
                    )

    def _batch_refused(self, table: _Table) -> None:
        if self._use_batch:
            raise MapWriteError(f"{table.name}: the kernel refused batch map operations")
        table.batch = False
        self.batch_supported = False

    def clear(self) -> None:
        """Delete every entry of every NAT map (reverse-translation maps are left alone)."""
        for family in TABLE_NAMES:
            contents = self.dump(family)
            self.delete_frontends(family, contents.frontends)
            self.delete_backends(family, contents.backends)

    def summary(self) -> dict[str, int]:
        """Entries per map, e.g. {"apilane_fe4": 1, "apilane_be4": 3, ...}."""
        result: dict[str, int] = {}
        for family in TABLE_NAMES:
            contents = self.dump(family)
            result[self._frontends[family].name] = len(contents.frontends)
            result[self._backends[family].name] = len(contents.backends)
        return result


class _BatchRefused(Exception):
    pass


def _encode(codec: StructCodec, rows: list[tuple[Any, ...]], what: str) -> list[Any]:
    """All rows as ctypes arrays of at most _BATCH_CHUNK elements; MapWriteError if any value
    does not fit its field (nothing has been written yet)."""
    chunks = []
    for start in range(0, len(rows), _BATCH_CHUNK):
        chunk = rows[start : start + _BATCH_CHUNK]
        try:
            chunks.append(codec.pack_array(chunk))
        except struct.error as exc:
            culprit = next((row for row in chunk if not _fits(codec, row)), None)
            raise MapWriteError(f"{what} {culprit} does not fit the map: {exc}") from exc
    return chunks


def _fits(codec: StructCodec, row: tuple[Any, ...]) -> bool:
    try:
        codec.struct.pack(*row)
    except struct.error:
        return False
    return True


def _lookup_batch(table: _Table) -> tuple[bytes, bytes]:
    """BPF_MAP_LOOKUP_BATCH over the whole map into one buffer per side (libbcc's call; bcc's
    own generator yields element by element, which costs more than the syscall)."""
    lib = _lib()
    capacity = int(table.table.max_entries)
    key_size, value_size = table.key.size, table.leaf.size
    keys = ctypes.create_string_buffer(key_size * capacity)
    values = ctypes.create_string_buffer(value_size * capacity)
    in_token, out_token = ctypes.c_uint32(0), ctypes.c_uint32(0)  # htab: a bucket index
    total = 0
    first = True
    while total < capacity:
        count = ctypes.c_uint32(capacity - total)
        result = lib.bpf_lookup_batch(
            table.fd,
            None if first else ctypes.byref(in_token),
            ctypes.byref(out_token),
            ctypes.byref(keys, key_size * total),
            ctypes.byref(values, value_size * total),
            ctypes.byref(count),
        )
        code = ctypes.get_errno()
        total += count.value
        if result != 0:
            if code == errno.ENOENT:
                break  # the whole map has been read
            if code in _BATCH_UNSUPPORTED:
                raise _BatchRefused
            raise MapReadError(f"reading {table.name}: {os.strerror(code)}")
        if count.value == 0:
            break
        first = False
        in_token.value = out_token.value
    return keys.raw[: key_size * total], values.raw[: value_size * total]


def _lib() -> Any:
    from bcc.libbcc import lib

    return lib


def _frontend_key_row(family: Family, key: FrontendKey) -> tuple[bytes, int, int]:
    return (_ip_bytes(family, key.ip, "frontend"), _port_nbo(key.port, "frontend"), key.proto)


def _ip_bytes(family: Family, ip: str, what: str) -> bytes:
    try:
        return socket.inet_pton(_ADDRESS_FAMILY[family], ip)
    except (OSError, ValueError, TypeError) as exc:
        raise MapWriteError(f"{what} address {ip!r} is not an {family} address") from exc


def _port_nbo(port: int, what: str) -> int:
    """The port as the native integer whose bytes are the port in network order."""
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise MapWriteError(f"{what} port {port!r} does not fit in 16 bits")
    return socket.htons(port)


def _ip_text(packed: bytes) -> str:
    """The canonical text (Python's `ipaddress` compressed form, as the pure core writes)."""
    if len(packed) == 4:
        return socket.inet_ntoa(packed)
    text = socket.inet_ntop(socket.AF_INET6, packed)
    # inet_ntop writes embedded IPv4 (::ffff:1.2.3.4) where `ipaddress` writes hex words.
    return str(ipaddress.IPv6Address(packed)) if "." in text else text
