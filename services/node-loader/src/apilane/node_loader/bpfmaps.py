"""`BccNatMaps`: the `NatMaps` interface over the pinned kernel NAT maps, through bcc.

The C layout lives once, in `bpf/nat.h`. This adapter never re-declares it: the ctypes key and
leaf types are bcc's, generated from that header when the program is compiled, and the byte
codecs below are derived from those types (field order, offsets, sizes) at start.

Writes use the kernel's batch operations (BPF_MAP_UPDATE_BATCH / DELETE_BATCH, Linux >= 5.6)
when the map supports them, and fall back to one syscall per element otherwise, or for the
element a failed batch stopped at. Deleting a key that is not there succeeds (ENOENT).

Encoding is the hot path of a large reconcile (100k entries: more time than the syscalls),
so every write packs all its elements into one buffer with `map()` over C functions (no
per-element Python frame, no intermediate row tuples), and the batch calls point into that
buffer. Only when the fast path raises does a slow path look for the culprit to name it;
either way nothing reaches the kernel before every element is encoded.

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
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from itertools import repeat
from operator import attrgetter
from typing import Any, Literal, NoReturn, Protocol

from apilane.model.errors import ApilaneError
from apilane.node_loader.memmaps import MapWriteError
from apilane.node_loader.nat import (
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
    MapContents,
)

# Map names as declared in bpf/nat.h.
TABLE_NAMES: dict[Family, tuple[str, str]] = {
    "IPv4": ("apilane_fe4", "apilane_be4"),
    "IPv6": ("apilane_fe6", "apilane_be6"),
}
REVERSE_TABLE_NAMES: dict[Family, str] = {"IPv4": "apilane_rev4", "IPv6": "apilane_rev6"}
CONNECTION_TABLE_NAME = "apilane_conn"

# Address fields: packed as raw bytes (network order), not integers.
_BYTE_FIELDS = frozenset({"addr"})
# Integer fields the C side keeps in network byte order (struct bpf_sock_addr's user_port).
_NETWORK_ORDER_FIELDS = frozenset({"port"})
_ADDRESS_FAMILY: dict[Family, int] = {"IPv4": socket.AF_INET, "IPv6": socket.AF_INET6}
# errno values meaning "this map or kernel has no batch operations".
_BATCH_UNSUPPORTED = frozenset({errno.EINVAL, errno.EOPNOTSUPP, 524})  # 524: kernel ENOTSUPP
_BATCH_CHUNK = 8192  # elements per batch syscall, and per read-back buffer
# What the bulk encoders raise on a value that does not fit (then the slow path names it).
_ENCODE_ERRORS = (struct.error, OSError, TypeError, ValueError, OverflowError)
_IP, _PORT, _PROTO = attrgetter("ip"), attrgetter("port"), attrgetter("proto")
_SERVICE_ID, _ORDINAL = attrgetter("service_id"), attrgetter("ordinal")
_COUNT, _FLAGS = attrgetter("count"), attrgetter("flags")


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
    network order. Integer fields are native, unless `byte_order="network"`: then the codec
    packs big-endian and callers pass plain port numbers (a struct whose only multi-byte
    integers are network-order ports; checked here). `struct` does the byte swap and the
    range check in C, which a per-element `socket.htons` call costs more than the rest.
    """

    _INT_CODES = {1: "B", 2: "H", 4: "I", 8: "Q"}

    def __init__(
        self,
        ctype: type[ctypes.Structure],
        names: Sequence[str] | None = None,
        *,
        byte_order: Literal["native", "network"] = "native",
    ) -> None:
        self.ctype = ctype
        self.size = ctypes.sizeof(ctype)
        self.fields = layout_of(ctype)
        selected = set(names) if names is not None else {f.name for f in self.fields}
        unknown = selected - {f.name for f in self.fields}
        if unknown:
            raise ApilaneError(f"{ctype.__name__} has no field {sorted(unknown)}")
        # "=" native, "!" network (big-endian); neither aligns: offsets come from ctypes.
        fmt = ["!" if byte_order == "network" else "="]
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
                swapped = byte_order == "network" and field.size > 1
                if swapped and field.name not in _NETWORK_ORDER_FIELDS:
                    raise ApilaneError(f"{ctype.__name__}.{field.name} is not in network order")
                fmt.append(self._INT_CODES[field.size])
            position = field.offset + field.size
            chosen.append(field.name)
        if self.size > position:
            fmt.append(f"{self.size - position}x")
        self.struct = struct.Struct("".join(fmt))
        if self.struct.size != self.size:
            raise ApilaneError(f"codec for {ctype.__name__}: {self.struct.size} != {self.size}")
        self.names = tuple(chosen)

    def unpack_buffer(self, buffer: bytes) -> Iterator[tuple[Any, ...]]:
        return self.struct.iter_unpack(buffer)

    def unpack(self, instance: Any) -> dict[str, Any]:
        """Field values of one element: a ctypes instance or its bytes."""
        return dict(zip(self.names, self.struct.unpack(bytes(instance)), strict=True))


def layout_of(ctype: type[ctypes.Structure]) -> tuple[FieldLayout, ...]:
    """Name, offset and size of every field of a ctypes struct, in offset order."""
    fields = []
    for field in ctype._fields_:
        name, field_type = field[0], field[1]
        descriptor = getattr(ctype, name)
        fields.append(FieldLayout(name, descriptor.offset, ctypes.sizeof(field_type)))
    return tuple(sorted(fields, key=lambda f: f.offset))


class MapOps(Protocol):
    """The map syscalls the adapter makes, in libbcc's call shapes (libbpf's without `opts`);
    each returns 0 or a negative errno and leaves errno for `ctypes.get_errno()`."""

    def bpf_update_batch(self, fd: int, keys: Any, values: Any, count: Any) -> int: ...

    def bpf_delete_batch(self, fd: int, keys: Any, count: Any) -> int: ...

    def bpf_lookup_batch(  # noqa: PLR0917 - libbcc's call shape
        self, fd: int, in_batch: Any, out_batch: Any, keys: Any, values: Any, count: Any
    ) -> int: ...

    def bpf_update_elem(self, fd: int, key: Any, value: Any, flags: int) -> int: ...

    def bpf_delete_elem(self, fd: int, key: Any) -> int: ...


@dataclass
class KernelTable:
    """One kernel map, codecs for the fields we write, and whether batch ops work on it."""

    name: str
    fd: int
    max_entries: int
    key: StructCodec
    leaf: StructCodec
    batch: bool
    ops: MapOps
    # Every (key, value) as bytes-convertible pairs, element by element: the path for a
    # kernel without batch operations.
    read_items: Callable[[], Iterable[tuple[Any, Any]]]


_FRONTEND_KEY_FIELDS = ("addr", "port", "proto")
_FRONTEND_VALUE_FIELDS = ("service_id", "count", "flags")
_BACKEND_KEY_FIELDS = ("service_id", "ordinal")
_BACKEND_VALUE_FIELDS = ("addr", "port")


def _byte_order(fields: Sequence[str]) -> Literal["native", "network"]:
    """Structs holding a port (and otherwise only bytes) are packed in network order."""
    return "network" if _NETWORK_ORDER_FIELDS.intersection(fields) else "native"


class KernelNatMaps:
    """`NatMaps` over kernel maps, however they were opened (`BccNatMaps`: a compiled bcc
    module; pinnedmaps.PinnedNatMaps: the pins, with libbpf only).

    `use_batch`: None = use batch operations when the kernel accepts them; False = never
    (benchmarks compare both); True = require them (an error if the kernel refuses).
    Every write validates and encodes all its items before the first syscall, so bad input
    never changes the maps.
    """

    def __init__(
        self,
        frontends: Mapping[Family, KernelTable],
        backends: Mapping[Family, KernelTable],
        *,
        use_batch: bool | None = None,
    ) -> None:
        self._use_batch = use_batch
        self._frontends = dict(frontends)
        self._backends = dict(backends)
        for table in (*self._frontends.values(), *self._backends.values()):
            table.batch = use_batch is not False
        self.batch_supported: bool | None = None if use_batch is None else use_batch

    # --- reads -------------------------------------------------------------------------------

    def dump(self, family: Family) -> MapContents:
        fe_table = self._frontends[family]
        be_table = self._backends[family]
        fe_keys, fe_values = self._read_all(fe_table)
        frontends = {
            FrontendKey(ip_text(addr), port, proto): FrontendValue(service_id, count, flags)
            for (addr, port, proto), (service_id, count, flags) in zip(
                fe_table.key.unpack_buffer(fe_keys),
                fe_table.leaf.unpack_buffer(fe_values),
                strict=True,
            )
        }
        be_keys, be_values = self._read_all(be_table)
        backends = {
            BackendKey(service_id, ordinal): BackendValue(ip_text(addr), port)
            for (service_id, ordinal), (addr, port) in zip(
                be_table.key.unpack_buffer(be_keys),
                be_table.leaf.unpack_buffer(be_values),
                strict=True,
            )
        }
        return MapContents(frontends=frontends, backends=backends)

    def _read_all(self, table: KernelTable) -> tuple[bytes, bytes]:
        """Every key and value of the map, as two packed byte strings."""
        if table.batch:
            try:
                return _lookup_batch(table)
            except _BatchRefused:
                self._batch_refused(table)
        try:
            items = list(table.read_items())
        except Exception as exc:
            raise MapReadError(f"reading {table.name}: {exc}") from exc
        return b"".join(bytes(k) for k, _ in items), b"".join(bytes(v) for _, v in items)

    # --- writes ------------------------------------------------------------------------------

    def update_frontends(self, family: Family, items: Mapping[FrontendKey, FrontendValue]) -> None:
        table = self._frontends[family]
        keys = _frontend_keys(table.key, family, items.keys())
        values = _frontend_values(table.leaf, items.values())
        self._update(table, keys, values)

    def update_backends(self, family: Family, items: Mapping[BackendKey, BackendValue]) -> None:
        table = self._backends[family]
        keys = _backend_keys(table.key, items.keys())
        values = _backend_values(table.leaf, family, items.values())
        self._update(table, keys, values)

    def delete_frontends(self, family: Family, keys: Iterable[FrontendKey]) -> None:
        table = self._frontends[family]
        self._delete(table, _frontend_keys(table.key, family, _collection(keys)))

    def delete_backends(self, family: Family, keys: Iterable[BackendKey]) -> None:
        table = self._backends[family]
        self._delete(table, _backend_keys(table.key, _collection(keys)))

    def _update(self, table: KernelTable, keys: _Packed, values: _Packed) -> None:
        lib = table.ops
        position = 0
        while position < keys.count:  # every pass advances by at least one element
            if table.batch:
                chunk = min(_BATCH_CHUNK, keys.count - position)
                done = ctypes.c_uint32(chunk)
                result = lib.bpf_update_batch(
                    table.fd, keys.at(position), values.at(position), ctypes.byref(done)
                )
                if result == 0:
                    position += chunk
                    if self.batch_supported is None:
                        self.batch_supported = True
                    continue
                if _errno_of(result) in _BATCH_UNSUPPORTED:
                    self._batch_refused(table)
                else:  # the kernel wrote `done` elements and stopped at the next one
                    position += min(done.value, chunk - 1)
            # One element by itself: names the culprit if it fails again.
            if lib.bpf_update_elem(table.fd, keys.at(position), values.at(position), 0) < 0:
                code = ctypes.get_errno()
                raise MapWriteError(
                    f"{table.name}: update {table.key.unpack(keys.element(position))} failed: "
                    f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"
                )
            position += 1

    def _delete(self, table: KernelTable, keys: _Packed) -> None:
        lib = table.ops
        position = 0
        while position < keys.count:  # every pass advances by at least one element
            if table.batch:
                chunk = min(_BATCH_CHUNK, keys.count - position)
                done = ctypes.c_uint32(chunk)
                result = lib.bpf_delete_batch(table.fd, keys.at(position), ctypes.byref(done))
                if result == 0:
                    position += chunk
                    continue
                if _errno_of(result) in _BATCH_UNSUPPORTED:
                    self._batch_refused(table)
                else:  # ENOENT stops a batch at a missing key: skip past it, then go on
                    position += min(done.value, chunk - 1)
            if lib.bpf_delete_elem(table.fd, keys.at(position)) < 0:
                code = ctypes.get_errno()
                if code != errno.ENOENT:
                    raise MapWriteError(
                        f"{table.name}: delete {table.key.unpack(keys.element(position))} "
                        f"failed: {errno.errorcode.get(code, code)} ({os.strerror(code)})"
                    )
            position += 1

    def _batch_refused(self, table: KernelTable) -> None:
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


def nat_codecs(
    name: str, key_type: type[ctypes.Structure], leaf_type: type[ctypes.Structure]
) -> tuple[StructCodec, StructCodec]:
    """The key and value codecs of a NAT map (frontend or backend, by name)."""
    frontend = name.startswith("apilane_fe")
    key_fields = _FRONTEND_KEY_FIELDS if frontend else _BACKEND_KEY_FIELDS
    value_fields = _FRONTEND_VALUE_FIELDS if frontend else _BACKEND_VALUE_FIELDS
    key = StructCodec(key_type, key_fields, byte_order=_byte_order(key_fields))
    leaf = StructCodec(leaf_type, value_fields, byte_order=_byte_order(value_fields))
    # The encoders below pass field values positionally, in this order.
    if key.names != tuple(key_fields) or leaf.names != tuple(value_fields):
        raise ApilaneError(f"{name}: fields {key.names}/{leaf.names} are not in nat.h order")
    return key, leaf


class BccNatMaps(KernelNatMaps):
    """`NatMaps` over the pinned kernel maps of a compiled bcc module (see programs.py)."""

    def __init__(self, bpf: Any, *, use_batch: bool | None = None) -> None:
        tables = {name: _bcc_table(bpf, name) for pair in TABLE_NAMES.values() for name in pair}
        super().__init__(
            {family: tables[fe] for family, (fe, _) in TABLE_NAMES.items()},
            {family: tables[be] for family, (_, be) in TABLE_NAMES.items()},
            use_batch=use_batch,
        )


def _bcc_table(bpf: Any, name: str) -> KernelTable:
    table = bpf.get_table(name.encode())
    key, leaf = nat_codecs(name, table.Key, table.Leaf)
    return KernelTable(
        name=name,
        fd=int(table.map_fd),
        max_entries=int(table.max_entries),
        key=key,
        leaf=leaf,
        batch=True,
        ops=_lib(),
        read_items=table.items,
    )


class _BatchRefused(Exception):
    pass


@dataclass(frozen=True, slots=True)
class _Packed:
    """`count` encoded elements of `size` bytes, back to back, in memory the kernel reads."""

    buffer: ctypes.Array[ctypes.c_char]
    count: int
    size: int

    @classmethod
    def of(cls, data: bytes, size: int) -> _Packed:
        return cls(ctypes.create_string_buffer(data, len(data)), len(data) // size, size)

    def at(self, index: int) -> Any:
        """A pointer to element `index`."""
        return ctypes.byref(self.buffer, index * self.size)

    def element(self, index: int) -> bytes:
        return ctypes.string_at(ctypes.addressof(self.buffer) + index * self.size, self.size)


def _frontend_keys(codec: StructCodec, family: Family, keys: Collection[FrontendKey]) -> _Packed:
    address_family, pton = _ADDRESS_FAMILY[family], socket.inet_pton
    try:
        data = b"".join(
            map(
                codec.struct.pack,
                map(pton, repeat(address_family), map(_IP, keys)),
                map(_PORT, keys),
                map(_PROTO, keys),
            )
        )
    except _ENCODE_ERRORS:
        _explain(codec, (_frontend_key_row(family, key) for key in keys), "frontend key")
    return _Packed.of(data, codec.size)


def _frontend_values(codec: StructCodec, values: Collection[FrontendValue]) -> _Packed:
    try:
        data = b"".join(
            map(
                codec.struct.pack,
                map(_SERVICE_ID, values),
                map(_COUNT, values),
                map(_FLAGS, values),
            )
        )
    except _ENCODE_ERRORS:
        _explain(
            codec,
            ((v.service_id, v.count, v.flags) for v in values),
            "frontend value (service id, count, flags)",
        )
    return _Packed.of(data, codec.size)


def _backend_keys(codec: StructCodec, keys: Collection[BackendKey]) -> _Packed:
    try:
        data = b"".join(map(codec.struct.pack, map(_SERVICE_ID, keys), map(_ORDINAL, keys)))
    except _ENCODE_ERRORS:
        _explain(
            codec, ((k.service_id, k.ordinal) for k in keys), "backend key (service id, ordinal)"
        )
    return _Packed.of(data, codec.size)


def _backend_values(
    codec: StructCodec, family: Family, values: Collection[BackendValue]
) -> _Packed:
    address_family, pton = _ADDRESS_FAMILY[family], socket.inet_pton
    try:
        data = b"".join(
            map(
                codec.struct.pack,
                map(pton, repeat(address_family), map(_IP, values)),
                map(_PORT, values),
            )
        )
    except _ENCODE_ERRORS:
        _explain(
            codec,
            ((_ip_bytes(family, v.ip, "backend"), _port(v.port, "backend")) for v in values),
            "backend value",
        )
    return _Packed.of(data, codec.size)


def _explain(codec: StructCodec, rows: Iterable[tuple[Any, ...]], what: str) -> NoReturn:
    """The slow path after a bulk encoder failed: find the first bad element and raise a
    MapWriteError naming it (`rows` raises it itself for a bad address or port)."""
    for row in rows:
        try:
            codec.struct.pack(*row)
        except struct.error as exc:
            raise MapWriteError(f"{what} {row} does not fit the map: {exc}") from exc
    raise MapWriteError(f"a {what} does not fit the map")


def _collection(items: Iterable[Any]) -> Collection[Any]:
    """The encoders go over their input once per field: a one-shot iterator is listed first."""
    return items if isinstance(items, Collection) else list(items)


def _errno_of(result: int) -> int:
    return -result if result < 0 else ctypes.get_errno()


def _lookup_batch(table: KernelTable) -> tuple[bytes, bytes]:
    """BPF_MAP_LOOKUP_BATCH over the whole map, as packed keys and values (libbcc's call;
    bcc's own generator yields element by element, which costs more than the syscall).

    Read through a buffer of at most _BATCH_CHUNK elements rather than one sized for
    max_entries: that one was megabytes, zero-filled on every read-back, and glibc kept it
    in the heap afterwards (resident memory that the loader never needed again)."""
    lib = table.ops
    capacity = table.max_entries
    key_size, value_size = table.key.size, table.leaf.size
    room = min(capacity, _BATCH_CHUNK)
    keys = ctypes.create_string_buffer(key_size * room)
    values = ctypes.create_string_buffer(value_size * room)
    in_token, out_token = ctypes.c_uint32(0), ctypes.c_uint32(0)  # htab: a bucket index
    key_parts: list[bytes] = []
    value_parts: list[bytes] = []
    total = 0
    first = True
    while total < capacity:
        count = ctypes.c_uint32(room)
        result = lib.bpf_lookup_batch(
            table.fd,
            None if first else ctypes.byref(in_token),
            ctypes.byref(out_token),
            keys,
            values,
            ctypes.byref(count),
        )
        code = ctypes.get_errno()
        if count.value:
            total += count.value
            key_parts.append(keys.raw[: key_size * count.value])
            value_parts.append(values.raw[: value_size * count.value])
        if result != 0:
            if code == errno.ENOENT:
                break  # the whole map has been read
            if code == errno.ENOSPC and room < capacity:
                # One hash bucket holds more elements than the buffer: retry it, larger.
                room = min(capacity, room * 2)
                keys = ctypes.create_string_buffer(key_size * room)
                values = ctypes.create_string_buffer(value_size * room)
                continue
            if code in _BATCH_UNSUPPORTED:
                raise _BatchRefused
            raise MapReadError(f"reading {table.name}: {os.strerror(code)}")
        if count.value == 0:
            break
        first = False
        in_token.value = out_token.value
    return b"".join(key_parts), b"".join(value_parts)


def _lib() -> Any:
    from bcc.libbcc import lib

    return lib


class BccConnections:
    """The connections made through a service address (apilane_conn in bpf/nat.h): socket
    cookie → the backend the connect program sent it to."""

    def __init__(self, bpf: Any) -> None:
        self._table = bpf.get_table(CONNECTION_TABLE_NAME.encode())

    def lookup(self, cookies: Iterable[int]) -> dict[int, BackendValue]:
        """The recorded backend of each cookie that has one (point lookups: the loader asks
        only about sockets connected to a removed backend, never dumps the whole map)."""
        found: dict[int, BackendValue] = {}
        for cookie in cookies:
            try:
                leaf = self._table[self._table.Key(cookie)]
            except KeyError:
                continue
            packed = bytes(leaf.addr)
            found[cookie] = BackendValue(
                ip=ip_text(packed[:4] if leaf.family == 4 else packed),
                port=socket.ntohs(leaf.port),
            )
        return found


def _frontend_key_row(family: Family, key: FrontendKey) -> tuple[bytes, int, int]:
    return (_ip_bytes(family, key.ip, "frontend"), _port(key.port, "frontend"), key.proto)


def _ip_bytes(family: Family, ip: str, what: str) -> bytes:
    try:
        return socket.inet_pton(_ADDRESS_FAMILY[family], ip)
    except (OSError, ValueError, TypeError) as exc:
        raise MapWriteError(f"{what} address {ip!r} is not an {family} address") from exc


def _port(port: int, what: str) -> int:
    if not isinstance(port, int) or not 0 <= port <= 0xFFFF:
        raise MapWriteError(f"{what} port {port!r} does not fit in 16 bits")
    return port


def ip_text(packed: bytes) -> str:
    """The canonical text (Python's `ipaddress` compressed form, as the pure core writes)."""
    if len(packed) == 4:
        return socket.inet_ntoa(packed)
    text = socket.inet_ntop(socket.AF_INET6, packed)
    # inet_ntop writes embedded IPv4 (::ffff:1.2.3.4) where `ipaddress` writes hex words.
    return str(ipaddress.IPv6Address(packed)) if "." in text else text
