"""PURE: the ordered map operations that take the maps from `actual` to `target`, and the
invariant check that runs on the maps before and after every apply.

Make-before-break, in three phases, each a batch per family and map:

1. make:   write every backend entry the target needs and the maps lack. `target_contents`
           puts a new or changed backend set under an id that no frontend references yet,
           so these writes never touch an ordinal a racing connect() can pick.
2. switch: write the frontends whose id, count or flags change. Each switch is one atomic
           element update that points at backends which are all present already.
3. break:  delete the frontends that are no longer wanted, then the backends nothing
           references any more.

So after every single element operation, in any order within a batch, every frontend's
ordinals 0..count-1 exist and count is never 0. Unchanged entries produce no operation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from enum import StrEnum

from apilane.model import addresses
from apilane.node_loader.nat import (
    FAMILIES,
    BackendKey,
    BackendValue,
    Family,
    FrontendKey,
    FrontendValue,
    MapContents,
)


class Phase(StrEnum):
    MAKE = "make"
    SWITCH = "switch"
    BREAK = "break"


class Operation(StrEnum):
    UPDATE_BACKENDS = "update_backends"
    UPDATE_FRONTENDS = "update_frontends"
    DELETE_FRONTENDS = "delete_frontends"
    DELETE_BACKENDS = "delete_backends"


@dataclass(frozen=True, slots=True)
class Step:
    """One batch call on one family's map."""

    phase: Phase
    operation: Operation
    family: Family
    backend_updates: Mapping[BackendKey, BackendValue] | None = None
    frontend_updates: Mapping[FrontendKey, FrontendValue] | None = None
    frontend_deletes: tuple[FrontendKey, ...] = ()
    backend_deletes: tuple[BackendKey, ...] = ()

    @property
    def size(self) -> int:
        return (
            len(self.backend_updates or {})
            + len(self.frontend_updates or {})
            + len(self.frontend_deletes)
            + len(self.backend_deletes)
        )

    def describe(self) -> str:
        return f"{self.phase}: {self.operation} {self.family} x{self.size}"


@dataclass(frozen=True, slots=True)
class Plan:
    steps: tuple[Step, ...]

    @property
    def entries(self) -> int:
        """Map elements written or deleted."""
        return sum(step.size for step in self.steps)

    @property
    def empty(self) -> bool:
        return not self.steps

    def describe(self) -> list[str]:
        return [step.describe() for step in self.steps]


def plan(target: Mapping[Family, MapContents], actual: Mapping[Family, MapContents]) -> Plan:
    """The steps from `actual` to `target`; families absent from `target` are not touched."""
    empty = MapContents(frontends={}, backends={})
    make: list[Step] = []
    switch: list[Step] = []
    break_frontends: list[Step] = []
    break_backends: list[Step] = []
    for family in FAMILIES:
        if family not in target:
            continue
        want, have = target[family], actual.get(family, empty)
        backend_updates = {k: v for k, v in want.backends.items() if have.backends.get(k) != v}
        if backend_updates:
            make.append(
                Step(Phase.MAKE, Operation.UPDATE_BACKENDS, family, backend_updates=backend_updates)
            )
        frontend_updates = {k: v for k, v in want.frontends.items() if have.frontends.get(k) != v}
        if frontend_updates:
            switch.append(
                Step(
                    Phase.SWITCH,
                    Operation.UPDATE_FRONTENDS,
                    family,
                    frontend_updates=frontend_updates,
                )
            )
        frontend_deletes = tuple(sorted(k for k in have.frontends if k not in want.frontends))
        if frontend_deletes:
            break_frontends.append(
                Step(
                    Phase.BREAK,
                    Operation.DELETE_FRONTENDS,
                    family,
                    frontend_deletes=frontend_deletes,
                )
            )
        backend_deletes = tuple(sorted(k for k in have.backends if k not in want.backends))
        if backend_deletes:
            break_backends.append(
                Step(
                    Phase.BREAK, Operation.DELETE_BACKENDS, family, backend_deletes=backend_deletes
                )
            )
    return Plan(steps=(*make, *switch, *break_frontends, *break_backends))


def simulate(plan_: Plan, actual: Mapping[Family, MapContents]) -> dict[Family, MapContents]:
    """The contents after applying the plan (what the maps hold when every step succeeds)."""
    result = {family: (dict(c.frontends), dict(c.backends)) for family, c in actual.items()}
    for step in plan_.steps:
        frontends, backends = result.setdefault(step.family, ({}, {}))
        apply_step_to(step, frontends, backends)
    return {f: MapContents(frontends=fe, backends=be) for f, (fe, be) in result.items()}


def apply_step_to(
    step: Step,
    frontends: dict[FrontendKey, FrontendValue],
    backends: dict[BackendKey, BackendValue],
) -> None:
    """Apply one step to plain dicts (for `simulate` and the tests' element-wise replay)."""
    backends.update(step.backend_updates or {})
    frontends.update(step.frontend_updates or {})
    for fkey in step.frontend_deletes:
        frontends.pop(fkey, None)
    for bkey in step.backend_deletes:
        backends.pop(bkey, None)


def removed_backends(
    before: Mapping[Family, MapContents], after: Mapping[Family, MapContents]
) -> tuple[BackendValue, ...]:
    """Backends that some frontend led to before and no frontend leads to after: the
    addresses whose open sockets should be destroyed so their clients reconnect."""
    gone: set[BackendValue] = set()
    for family, contents in before.items():
        if family not in after:
            continue
        gone |= _reachable(contents) - _reachable(after[family])
    return tuple(sorted(gone))


def _reachable(contents: MapContents) -> set[BackendValue]:
    """Backends stored at an ordinal below the count of a frontend of their id. One pass
    over the backends: no key object built per ordinal (this runs on every apply)."""
    counts: dict[int, int] = {}
    for value in contents.frontends.values():
        counts[value.service_id] = max(value.count, counts.get(value.service_id, 0))
    return {
        backend
        for key, backend in contents.backends.items()
        if key.ordinal < counts.get(key.service_id, 0)
    }


# --- invariants -------------------------------------------------------------------------


class ViolationKind(StrEnum):
    DUPLICATE_ID = "duplicate-id"
    EMPTY_FRONTEND = "empty-frontend"
    DANGLING_ORDINAL = "dangling-ordinal"
    COUNT_MISMATCH = "count-mismatch"
    ORPHAN_BACKENDS = "orphan-backends"
    WRONG_FAMILY = "wrong-family"


@dataclass(frozen=True, slots=True, order=True)
class Violation:
    family: Family
    kind: ViolationKind
    message: str

    def __str__(self) -> str:
        return f"{self.family} {self.kind}: {self.message}"


def check_invariants(contents: Mapping[Family, MapContents]) -> list[Violation]:
    """Every way the maps can be inconsistent, sorted; an empty list means consistent.

    - each service id is used by one frontend only (per family map);
    - no frontend has count 0 (the kernel program would refuse the connect);
    - every ordinal 0..count-1 of a frontend exists (no dangling ordinal);
    - count equals the number of backends stored under the id (no stale extras);
    - every backend belongs to some frontend's id (no orphans);
    - every address is of the map's family.
    """
    violations: list[Violation] = []
    for family, maps in contents.items():
        violations.extend(_check_family(family, maps))
    return sorted(violations)


def _check_family(family: Family, maps: MapContents) -> Iterable[Violation]:
    holders: dict[int, list[FrontendKey]] = {}
    for key, value in maps.frontends.items():
        holders.setdefault(value.service_id, []).append(key)
    stored: dict[int, set[int]] = {}
    for bkey in maps.backends:
        stored.setdefault(bkey.service_id, set()).add(bkey.ordinal)

    # Iteration order does not matter: check_invariants sorts the result (and sorting the
    # entries here, dataclass by dataclass, cost more than the rest of the check).
    for service_id, keys in holders.items():
        if len(keys) > 1:
            names = ", ".join(_frontend_name(k) for k in sorted(keys))
            yield Violation(
                family, ViolationKind.DUPLICATE_ID, f"id {service_id} is used by {names}"
            )
    yield from _check_frontends(family, maps, stored)
    yield from _check_backends(family, maps, stored, holders)


def _check_frontends(
    family: Family, maps: MapContents, stored: Mapping[int, set[int]]
) -> Iterable[Violation]:
    for key, value in maps.frontends.items():
        name = _frontend_name(key)
        if addresses.family_or_none(key.ip) != family:
            yield Violation(
                family, ViolationKind.WRONG_FAMILY, f"frontend {name} in the {family} map"
            )
        if value.count == 0:
            yield Violation(family, ViolationKind.EMPTY_FRONTEND, f"frontend {name} has count 0")
            continue
        present = stored.get(value.service_id, set())
        missing = [o for o in range(value.count) if o not in present]
        if missing:
            yield Violation(
                family,
                ViolationKind.DANGLING_ORDINAL,
                f"frontend {name} (id {value.service_id}, count {value.count}) lacks ordinals {missing}",
            )
        stale = sorted(o for o in present if o >= value.count)
        if stale or len(present) != value.count:
            yield Violation(
                family,
                ViolationKind.COUNT_MISMATCH,
                f"frontend {name} has count {value.count} but id {value.service_id} "
                f"holds {len(present)} backends" + (f" (stale ordinals {stale})" if stale else ""),
            )


def _check_backends(
    family: Family,
    maps: MapContents,
    stored: Mapping[int, set[int]],
    holders: Mapping[int, list[FrontendKey]],
) -> Iterable[Violation]:
    orphans = sorted(set(stored) - set(holders))
    if orphans:
        shown = ", ".join(map(str, orphans[:10])) + (
            f", … ({len(orphans)} ids)" if len(orphans) > 10 else ""
        )
        yield Violation(
            family, ViolationKind.ORPHAN_BACKENDS, f"backends under ids [{shown}] have no frontend"
        )
    for bkey, bvalue in maps.backends.items():
        if addresses.family_or_none(bvalue.ip) != family:
            yield Violation(
                family,
                ViolationKind.WRONG_FAMILY,
                f"backend id {bkey.service_id} #{bkey.ordinal} {bvalue.ip} in the {family} map",
            )


def dangling_references(contents: Mapping[Family, MapContents]) -> list[str]:
    """What a connect() racing right now could hit: a missing ordinal or an empty set.
    The property tests call this after every single element operation of a plan."""
    problems = []
    for family, maps in contents.items():
        for key, value in maps.frontends.items():
            if value.count == 0:
                problems.append(f"{family} {_frontend_name(key)} has count 0")
            for ordinal in range(value.count):
                if BackendKey(value.service_id, ordinal) not in maps.backends:
                    problems.append(f"{family} {_frontend_name(key)} -> missing ordinal {ordinal}")
    return problems


def _frontend_name(key: FrontendKey) -> str:
    host = f"[{key.ip}]" if ":" in key.ip else key.ip
    return f"{host}:{key.port}/{key.proto}"
