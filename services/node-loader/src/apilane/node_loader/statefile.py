"""The applied-state file: what the node's maps hold, readable without NATS.

One small JSON file, replaced atomically (write, fsync, rename, fsync the directory) after
every apply, so a crash leaves the old or the new version and never half of one. It holds
the last snapshot applied completely (enough to rebuild the desired maps at start) with the
signature it was accepted with (the highest generation accepted: what rollbacks are judged
against, also after a restart), the operator's live connect-time LB switch (precedence in
settings.py) and the issue time of the last control request accepted. Fields added later
have defaults: a file written by an older loader reads as before.
"""

from __future__ import annotations

import contextlib
import glob
import os
from datetime import datetime
from pathlib import Path
from typing import Final

import msgspec

from apilane.model.errors import ApilaneError
from apilane.model.events import EndpointSnapshot
from apilane.node_loader.settings import LiveLbSwitch

STATE_FILE_VERSION: Final = 1


class StateFileError(ApilaneError):
    """The applied-state file exists but cannot be read or written."""


class Seal(msgspec.Struct, frozen=True, kw_only=True):
    """The signature a snapshot was accepted with (apilane.model.signing): which content,
    valid until when, signed by which key."""

    content_digest: str  # of the signed payload bytes: the same for a re-signed refresh
    expires_at: datetime
    key_id: str


class AppliedState(msgspec.Struct, frozen=True, kw_only=True):
    """The last snapshot applied completely: enough to rebuild the desired maps without NATS.
    Its generation and seal are the highest accepted: an older replay is a rollback."""

    generation: int
    digest: str
    applied_at: datetime
    snapshot: EndpointSnapshot
    seal: Seal | None = None  # None: applied by a loader from before snapshots were signed


class PersistedState(msgspec.Struct, frozen=True, kw_only=True):
    """What the state file holds: the applied state (absent while no snapshot was applied),
    the live connect-time LB switch (absent unless an operator switched it) and when the
    last control request accepted was issued (so a replay is refused after a restart too).
    The optional fields were added compatibly: a file without them reads as before."""

    version: int = STATE_FILE_VERSION
    generation: int = 0
    digest: str = ""
    applied_at: datetime | None = None
    snapshot: EndpointSnapshot | None = None
    lb_switch: LiveLbSwitch | None = None
    seal: Seal | None = None
    control_issued_at: datetime | None = None

    @classmethod
    def of(
        cls,
        applied: AppliedState | None,
        lb_switch: LiveLbSwitch | None,
        control_issued_at: datetime | None = None,
    ) -> PersistedState:
        if applied is None:
            return cls(lb_switch=lb_switch, control_issued_at=control_issued_at)
        return cls(
            generation=applied.generation,
            digest=applied.digest,
            applied_at=applied.applied_at,
            snapshot=applied.snapshot,
            lb_switch=lb_switch,
            seal=applied.seal,
            control_issued_at=control_issued_at,
        )

    @property
    def applied(self) -> AppliedState | None:
        if self.snapshot is None or self.applied_at is None:
            return None
        return AppliedState(
            generation=self.generation,
            digest=self.digest,
            applied_at=self.applied_at,
            snapshot=self.snapshot,
            seal=self.seal,
        )


class StateFile:
    """The applied-state file, replaced atomically so a crash leaves the old or the new one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._target = os.fspath(path)
        self._directory = os.fspath(path.parent)
        self._decoder = msgspec.json.Decoder(PersistedState)

    def load(self) -> PersistedState | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StateFileError(f"cannot read {self.path}: {exc}") from exc
        try:
            state = self._decoder.decode(data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise StateFileError(f"{self.path} is not a node-loader state file: {exc}") from exc
        if state.version > STATE_FILE_VERSION:
            raise StateFileError(f"{self.path} has version {state.version}, newer than this loader")
        return state

    def save(self, state: PersistedState) -> None:
        # On every apply: plain os calls on prepared strings (no pathlib, no mkdir unless the
        # directory is missing), as the write is a good part of the apply latency.
        data = msgspec.json.encode(state)
        tmp = f"{self._directory}/.{self.path.name}.{os.getpid()}.tmp"
        try:
            try:
                self._write(tmp, data)
            except FileNotFoundError:  # the first save, or the directory was removed
                os.makedirs(self._directory, exist_ok=True)
                self._write(tmp, data)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise StateFileError(f"cannot write {self.path}: {exc}") from exc

    def remove(self) -> None:
        """Delete the file (and a temporary file a crash left behind). FileNotFoundError
        when there was no state file."""
        for leftover in self.path.parent.glob(f".{glob.escape(self.path.name)}.*.tmp"):
            with contextlib.suppress(FileNotFoundError):
                leftover.unlink()
        try:
            self.path.unlink()
        except FileNotFoundError:
            raise
        except OSError as exc:
            raise StateFileError(f"cannot remove {self.path}: {exc}") from exc

    def _write(self, tmp: str, data: bytes) -> None:
        """Write, fsync, rename over the state file, fsync the directory."""
        handle = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(handle, view) :]
            os.fsync(handle)
        finally:
            os.close(handle)
        os.replace(tmp, self._target)
        directory = os.open(self._directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)
