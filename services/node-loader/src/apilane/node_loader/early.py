"""What the compile child needs, read straight from the environment at process start.

`__main__` starts the compile child (or sees it can reuse what is pinned, reuse.py) before
importing anything heavy, settings.py included (msgspec, cryptography, nkeys: ~0.2 s of
imports): so this module reads the few variables needed itself, with the standard library
only, and owns the state file's name (settings.py uses it too). It is deliberately narrow: anything it is not sure
of (another backend, a missing cgroup, a relative pin dir, a value it does not know) gives
None, and the loader compiles at the usual point instead. It decides nothing on its own
either: `PinnedLB` uses the early child only when its command equals the one the full
settings give, and both sides run the cgroup safety check.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PREFIX = "APILANE_"
DEFAULT_MAP_BACKEND = "bpf"
DEFAULT_PIN_DIR = "/sys/fs/bpf/apilane"
DEFAULT_STATE_DIR = "/run/apilane/node-loader"
# The state file's name without ".state.json" (and the temporary file's prefix and suffix)
# must fit a 255-byte file name.
_MAX_SLUG = 200
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class CompileTarget:
    cgroup_path: str
    pin_dir: str
    allow_root_cgroup: bool
    state_dir: str

    @property
    def build_stamp(self) -> Path:
        return build_stamp(state_file(self.state_dir, self.pin_dir))


def state_file(state_dir: str, pin_dir: str) -> Path:
    """The applied-state file of the loader using `pin_dir` (settings.state_file)."""
    slug = pin_dir.strip("/").replace("/", "_") or "root"
    if len(slug) > _MAX_SLUG:
        # A file name holds 255 bytes: a long pin dir keeps its tail, made unique by a hash.
        digest = hashlib.sha256(slug.encode()).hexdigest()[:16]
        slug = f"{digest}_{slug[-(_MAX_SLUG - 17) :]}"
    return Path(state_dir) / f"{slug}.state.json"


def build_stamp(state_file: Path) -> Path:
    """The build stamp (reuse.py) next to a state file: `<slug>.build.json`."""
    return state_file.with_name(state_file.name.removesuffix(".state.json") + ".build.json")


def compile_target(environ: Mapping[str, str] | None = None) -> CompileTarget | None:
    """The compile child's settings as settings.load would read them; None when the bpf
    backend is not asked for or a value is anything but plainly valid."""
    env = os.environ if environ is None else environ

    def value(name: str, default: str) -> str:
        raw = env.get(PREFIX + name, "").strip()
        return raw or default

    if value("MAP_BACKEND", DEFAULT_MAP_BACKEND) != "bpf":
        return None
    cgroup_path = value("CGROUP_PATH", "")
    pin_dir = value("BPF_PIN_DIR", DEFAULT_PIN_DIR)
    state_dir = value("STATE_DIR", DEFAULT_STATE_DIR)
    allow_root = value("ALLOW_ROOT_CGROUP", "false").lower()
    if not cgroup_path or allow_root not in (*_TRUE, *_FALSE):
        return None
    if not pin_dir.startswith("/") or not state_dir.startswith("/"):
        return None
    return CompileTarget(
        cgroup_path=cgroup_path,
        pin_dir=pin_dir,
        allow_root_cgroup=allow_root in _TRUE,
        state_dir=state_dir,
    )
