"""What the compile child needs, read straight from the environment at process start.

`__main__` starts the compile child before importing anything heavy, settings.py included
(msgspec, cryptography, nkeys: ~0.2 s of imports): so this module reads the four variables
itself, with the standard library only. It is deliberately narrow: anything it is not sure
of (another backend, a missing cgroup, a relative pin dir, a value it does not know) gives
None, and the loader compiles at the usual point instead. It decides nothing on its own
either: `PinnedLB` uses the early child only when its command equals the one the full
settings give, and both sides run the cgroup safety check.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

PREFIX = "APILANE_"
DEFAULT_MAP_BACKEND = "bpf"
DEFAULT_PIN_DIR = "/sys/fs/bpf/apilane"
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


@dataclass(frozen=True, slots=True)
class CompileTarget:
    cgroup_path: str
    pin_dir: str
    allow_root_cgroup: bool


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
    allow_root = value("ALLOW_ROOT_CGROUP", "false").lower()
    if not cgroup_path or not pin_dir.startswith("/") or allow_root not in (*_TRUE, *_FALSE):
        return None
    return CompileTarget(
        cgroup_path=cgroup_path, pin_dir=pin_dir, allow_root_cgroup=allow_root in _TRUE
    )
