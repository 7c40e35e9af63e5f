"""Which env variables of the DaemonSet are apilane's: the ownership record. Pure, no I/O.

The renderer removes a variable only when it put it there. That fact is recorded in an
annotation on the DaemonSet, written by the same patch that changes the env:

  apilane.dev/managed-env: {"calico-node":{"FELIX_BPFKUBEPROXYHEALTHZPORT":"10256",
                                           "FELIX_BPFKUBEPROXYIPTABLESCLEANUPENABLED":null}}

per container, each variable apilane set, with the literal value it replaced: null when
apilane created the variable (released by deleting it), a string when apilane overwrote a
value someone else had set (released by putting that value back). A variable that already
held the wanted value is not recorded: apilane never wrote it, so it never takes it away.

The record is checked against managedFields before a variable is released: when another
field manager has set its value since apilane did, the variable is theirs now and stays.
A DaemonSet without the annotation (patched by a renderer from before the record existed)
gets its record from managedFields: the env entries our field manager created are ours.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal

from apilane.model.errors import ApilaneError
from apilane.model.objects import as_dict, as_list, as_str

MANAGED_ENV_ANNOTATION: Final = "apilane.dev/managed-env"
FIELD_MANAGER: Final = "apilane-renderer"

ContainerKind = Literal["initContainers", "containers"]
CONTAINER_KINDS: Final[tuple[ContainerKind, ...]] = ("initContainers", "containers")

# container name -> variable -> the literal value it had before apilane set it (None: none).
ManagedEnv = Mapping[str, Mapping[str, str | None]]
Record = dict[str, dict[str, str | None]]


class ManagedEnvError(ApilaneError):
    """The managed-env annotation is not what this renderer writes."""


def parse_managed_env(raw: str) -> Record:
    """The record in a managed-env annotation; raises ManagedEnvError."""
    try:
        decoded = json.loads(raw)
    except ValueError as exc:
        raise ManagedEnvError(f"not JSON: {exc}") from exc
    if not isinstance(decoded, dict):
        raise ManagedEnvError("expected an object of containers")
    record: Record = {}
    for container, variables in decoded.items():
        if not isinstance(variables, dict) or not all(
            isinstance(previous, str | None) for previous in variables.values()
        ):
            raise ManagedEnvError(
                f"container {container!r}: expected an object of variable -> string or null"
            )
        record[container] = dict(variables)
    return record


def format_managed_env(record: ManagedEnv) -> str | None:
    """The annotation value for a record (canonical), or None when apilane owns nothing."""
    kept = {container: dict(env) for container, env in record.items() if env}
    if not kept:
        return None
    return json.dumps(kept, sort_keys=True, separators=(",", ":"))


def recorded_ownership(metadata: Mapping[str, Any]) -> tuple[Record | None, tuple[str, ...]]:
    """The record from the annotation, and what is wrong with it; None when there is none to
    trust (then ownership comes from managedFields, see `EnvOwners.created_by`)."""
    raw = as_dict(metadata.get("annotations")).get(MANAGED_ENV_ANNOTATION)
    if raw is None:
        return None, ()
    if not isinstance(raw, str):
        return None, (f"annotation {MANAGED_ENV_ANNOTATION} is not a string; ignored",)
    try:
        return parse_managed_env(raw), ()
    except ManagedEnvError as exc:
        return None, (
            f"annotation {MANAGED_ENV_ANNOTATION} is malformed ({exc}); ownership taken from"
            " managedFields until the next patch rewrites it",
        )


class EnvOwners:
    """Who owns which env entry, from managedFields (fieldsV1).

    An Update that adds a list entry gives its manager the entry itself (".") and its
    fields; an Update that changes a value gives its manager that value only.
    """

    def __init__(self, metadata: Mapping[str, Any]) -> None:
        self._entries = [
            (as_str(entry.get("manager")), as_dict(entry.get("fieldsV1")))
            for entry in as_list(metadata.get("managedFields"))
            if isinstance(entry, Mapping)
        ]

    def created_by(self, kind: ContainerKind, container: str, name: str) -> frozenset[str]:
        return frozenset(
            manager
            for manager, fields in self._entries
            if "." in _env_entry_fields(fields, kind, container, name)
        )

    def value_set_by(self, kind: ContainerKind, container: str, name: str) -> frozenset[str] | None:
        """Managers owning the entry's value; None when the object carries no managedFields
        (then there is no evidence against the record, and it is trusted)."""
        if not self._entries:
            return None
        return frozenset(
            manager
            for manager, fields in self._entries
            if {"f:value", "f:valueFrom"} & set(_env_entry_fields(fields, kind, container, name))
        )


def _env_entry_fields(
    fields: Mapping[str, Any], kind: ContainerKind, container: str, name: str
) -> Mapping[str, Any]:
    path = ("f:spec", "f:template", "f:spec", f"f:{kind}", _list_key(container), "f:env")
    node = fields
    for step in (*path, _list_key(name)):
        node = as_dict(node.get(step))
    return node


def _list_key(name: str) -> str:
    """How fieldsV1 names the entry of a list merged by `name`."""
    return "k:" + json.dumps({"name": name}, separators=(",", ":"))
