"""pytest fixtures for the run-mode tests: a Docker daemon and the images built here; loaded
as a plugin by tests/conftest.py. A daemon that cannot start fails the test, never skips it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from apilane.testing.docker import DockerDaemon, reachable_daemon, start_own_daemon
from apilane.testing.images import BuildReport, ensure_images
from apilane.testing.procs import ComponentMissing

# (what, seconds) for the closing report: daemon start, each image built.
DOCKER_TIMES: list[tuple[str, float]] = []


@pytest.fixture(scope="session")
def docker_daemon() -> Iterator[DockerDaemon]:
    """The reachable Docker daemon, else our own dockerd for the session (ended by pid)."""
    try:
        daemon = reachable_daemon() or start_own_daemon()
    except (ComponentMissing, TimeoutError) as exc:
        pytest.fail(f"no Docker daemon for the run-mode tests: {exc}")
    if daemon.started:
        DOCKER_TIMES.append(("dockerd start", daemon.start_seconds))
    try:
        yield daemon
    finally:
        daemon.stop()


@pytest.fixture(scope="session")
def local_images(docker_daemon: DockerDaemon) -> BuildReport:
    """Every apilane-local/* image, built when missing or stale (cached across sessions)."""
    try:
        report = ensure_images(docker_daemon)
    except ComponentMissing as exc:
        pytest.fail(f"the local images cannot be built: {exc}")
    DOCKER_TIMES.extend((f"image {name} built", s) for name, s in report.built.items())
    return report


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if DOCKER_TIMES:
        terminalreporter.write_sep("-", "docker daemon and image times")
        for what, seconds in DOCKER_TIMES:
            terminalreporter.write_line(f"{what}: {seconds:.1f} s")
