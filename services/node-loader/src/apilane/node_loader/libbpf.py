"""ctypes bindings to libbpf.so.1 for what bcc does not offer: BPF links, pinned objects,
program queries and object info. Loaded once, on first use; every call returns libbpf's
negative errno convention, turned into a `ProgramError` naming the operation.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from apilane.model.errors import ApilaneError

BPF_PROG_TYPE_CGROUP_SOCK_ADDR = 18
BPF_LINK_TYPE_CGROUP = 3


class ProgramError(ApilaneError):
    """Compiling, loading, attaching or detaching the connect-time programs failed."""


_LIBBPF: Any = None


def lib() -> Any:
    global _LIBBPF  # noqa: PLW0603 - loaded once, on first use
    if _LIBBPF is None:
        try:
            loaded = ctypes.CDLL("libbpf.so.1", use_errno=True)
        except OSError as exc:
            raise ProgramError("libbpf.so.1 not found (Debian package libbpf1)") from exc
        loaded.bpf_link_create.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
        ]
        loaded.bpf_link_update.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_void_p]
        loaded.bpf_link_detach.argtypes = [ctypes.c_int]
        loaded.bpf_obj_pin.argtypes = [ctypes.c_int, ctypes.c_char_p]
        loaded.bpf_obj_get.argtypes = [ctypes.c_char_p]
        loaded.bpf_obj_get_info_by_fd.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_uint32),
        ]
        loaded.bpf_prog_get_fd_by_id.argtypes = [ctypes.c_uint32]
        loaded.bpf_prog_query.argtypes = [
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
            ctypes.POINTER(ctypes.c_uint32),
        ]
        _declare_map_calls(loaded)
        _LIBBPF = loaded
    return _LIBBPF


def _declare_map_calls(loaded: Any) -> None:
    pointer, count = ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint32)
    loaded.bpf_map_update_batch.argtypes = [ctypes.c_int, pointer, pointer, count, pointer]
    loaded.bpf_map_delete_batch.argtypes = [ctypes.c_int, pointer, count, pointer]
    loaded.bpf_map_lookup_batch.argtypes = [
        ctypes.c_int,
        pointer,
        pointer,
        pointer,
        pointer,
        count,
        pointer,
    ]
    loaded.bpf_map_update_elem.argtypes = [ctypes.c_int, pointer, pointer, ctypes.c_uint64]
    loaded.bpf_map_delete_elem.argtypes = [ctypes.c_int, pointer]
    loaded.bpf_map_lookup_elem.argtypes = [ctypes.c_int, pointer, pointer]
    loaded.bpf_map_get_next_key.argtypes = [ctypes.c_int, pointer, pointer]


class MapCalls:
    """libbpf's map calls in the shapes `bpfmaps.MapOps` names (libbcc's), so the adapter
    runs the same code over pinned maps without bcc."""

    def __init__(self) -> None:
        self._lib = lib()

    def bpf_update_batch(self, fd: int, keys: Any, values: Any, count: Any) -> int:
        return int(self._lib.bpf_map_update_batch(fd, keys, values, count, None))

    def bpf_delete_batch(self, fd: int, keys: Any, count: Any) -> int:
        return int(self._lib.bpf_map_delete_batch(fd, keys, count, None))

    def bpf_lookup_batch(  # noqa: PLR0917 - libbcc's call shape
        self, fd: int, in_batch: Any, out_batch: Any, keys: Any, values: Any, count: Any
    ) -> int:
        return int(
            self._lib.bpf_map_lookup_batch(fd, in_batch, out_batch, keys, values, count, None)
        )

    def bpf_update_elem(self, fd: int, key: Any, value: Any, flags: int) -> int:
        return int(self._lib.bpf_map_update_elem(fd, key, value, flags))

    def bpf_delete_elem(self, fd: int, key: Any) -> int:
        return int(self._lib.bpf_map_delete_elem(fd, key))

    def bpf_lookup_elem(self, fd: int, key: Any, value: Any) -> int:
        return int(self._lib.bpf_map_lookup_elem(fd, key, value))

    def bpf_get_next_key(self, fd: int, key: Any, next_key: Any) -> int:
        return int(self._lib.bpf_map_get_next_key(fd, key, next_key))


@dataclass(frozen=True, slots=True)
class MapInfo:
    map_id: int
    key_size: int
    value_size: int
    max_entries: int
    name: str


class _BpfMapInfoHead(ctypes.Structure):
    # The head of struct bpf_map_info (uapi/linux/bpf.h), up to `name`; the tail buffer
    # lets newer kernels write more.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("key_size", ctypes.c_uint32),
        ("value_size", ctypes.c_uint32),
        ("max_entries", ctypes.c_uint32),
        ("map_flags", ctypes.c_uint32),
        ("name", ctypes.c_char * 16),
        ("_tail", ctypes.c_uint8 * 128),
    ]


def map_info(fd: int) -> MapInfo:
    info = _BpfMapInfoHead()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    result = lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size))
    if result < 0:
        raise ProgramError(f"reading map info of fd {fd}: {strerror(result)}")
    return MapInfo(
        map_id=info.id,
        key_size=info.key_size,
        value_size=info.value_size,
        max_entries=info.max_entries,
        name=info.name.decode(errors="replace"),
    )


def strerror(result: int) -> str:
    code = -result if result < 0 else ctypes.get_errno()
    return f"{errno.errorcode.get(code, code)} ({os.strerror(code)})"


def open_pinned(pin: Path) -> int | None:
    if not pin.exists():
        return None
    fd = lib().bpf_obj_get(os.fsencode(pin))
    if fd < 0:
        raise ProgramError(f"opening pinned {pin}: {strerror(fd)}")
    return int(fd)


def query_programs(cgroup_fd: int, attach_type: int, *, capacity: int = 64) -> list[int]:
    """The ids of the programs attached directly to a cgroup at one hook (BPF_PROG_QUERY)."""
    ids = (ctypes.c_uint32 * capacity)()
    count = ctypes.c_uint32(capacity)
    flags = ctypes.c_uint32(0)
    result = lib().bpf_prog_query(
        cgroup_fd, attach_type, 0, ctypes.byref(flags), ids, ctypes.byref(count)
    )
    if result < 0:
        raise ProgramError(strerror(result))
    return list(ids[: count.value])


@dataclass(frozen=True, slots=True)
class LinkInfo:
    link_id: int
    program_id: int
    cgroup_id: int
    attach_type: int


class _BpfLinkInfo(ctypes.Structure):
    # struct bpf_link_info (uapi/linux/bpf.h), cgroup member of the union; the union is
    # 8-byte aligned, hence the pad. The tail buffer lets newer kernels write more.
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("prog_id", ctypes.c_uint32),
        ("_pad", ctypes.c_uint32),
        ("cgroup_id", ctypes.c_uint64),
        ("attach_type", ctypes.c_uint32),
        ("_tail", ctypes.c_uint8 * 100),
    ]


def link_info(link_fd: int) -> LinkInfo | None:
    info = _BpfLinkInfo()
    size = ctypes.c_uint32(ctypes.sizeof(info))
    if lib().bpf_obj_get_info_by_fd(link_fd, ctypes.byref(info), ctypes.byref(size)) < 0:
        return None
    if info.type != BPF_LINK_TYPE_CGROUP:
        return None
    return LinkInfo(
        link_id=info.id,
        program_id=info.prog_id,
        cgroup_id=info.cgroup_id,
        attach_type=info.attach_type,
    )


class _BpfProgInfoHead(ctypes.Structure):
    # The head of struct bpf_prog_info, up to and including `name` (BPF_OBJ_NAME_LEN 16).
    _fields_ = [
        ("type", ctypes.c_uint32),
        ("id", ctypes.c_uint32),
        ("tag", ctypes.c_uint8 * 8),
        ("jited_prog_len", ctypes.c_uint32),
        ("xlated_prog_len", ctypes.c_uint32),
        ("jited_prog_insns", ctypes.c_uint64),
        ("xlated_prog_insns", ctypes.c_uint64),
        ("load_time", ctypes.c_uint64),
        ("created_by_uid", ctypes.c_uint32),
        ("nr_map_ids", ctypes.c_uint32),
        ("map_ids", ctypes.c_uint64),
        ("name", ctypes.c_char * 16),
    ]


def program_name(program_id: int, *, expected: str) -> str:
    """The attached program's name; the kernel keeps 15 characters, so a matching prefix
    reports our full function name."""
    fd = lib().bpf_prog_get_fd_by_id(program_id)
    if fd < 0:
        return f"<program {program_id}>"
    try:
        info = _BpfProgInfoHead()
        size = ctypes.c_uint32(ctypes.sizeof(info))
        if lib().bpf_obj_get_info_by_fd(fd, ctypes.byref(info), ctypes.byref(size)) < 0:
            return f"<program {program_id}>"
        name = info.name.decode(errors="replace")
        return expected if name and expected.startswith(name) else name
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def map_id(fd: int) -> int | None:
    """The kernel id of the map behind `fd` (None when `fd` is no map)."""
    return _fdinfo_id(fd, "map_id")


def program_id(fd: int) -> int | None:
    """The kernel id of the program behind `fd` (None when `fd` is no program)."""
    return _fdinfo_id(fd, "prog_id")


def _fdinfo_id(fd: int, field: str) -> int | None:
    try:
        info = Path(f"/proc/self/fdinfo/{fd}").read_text()
    except OSError:
        return None
    for line in info.splitlines():
        key, _, value = line.partition(":")
        if key == field:
            return int(value)
    return None
