"""The bounded waits the tests share."""

from __future__ import annotations

import time

import pytest

from apilane.testing.loaders import loader_env
from apilane.testing.waiting import until, until_found

pytestmark = pytest.mark.unit


async def test_until_returns_how_long_the_condition_took() -> None:
    ready_at = time.monotonic() + 0.05
    took = await until(lambda: time.monotonic() >= ready_at, what="the moment", every=0.005)
    assert 0.04 <= took < 1.0


async def test_until_names_what_it_waited_for_when_time_runs_out() -> None:
    with pytest.raises(AssertionError, match=r"timed out after 0\.05s waiting for the never"):
        await until(lambda: False, what="the never", timeout=0.05)


async def test_until_found_gives_the_first_true_value_and_the_last_one_on_failure() -> None:
    values = iter([None, 0, "found"])

    async def next_value() -> str | int | None:
        return next(values)

    assert await until_found(next_value, what="a value", every=0.001) == "found"

    async def empty() -> list[int]:
        return []

    with pytest.raises(AssertionError, match=r"waiting for a list \(last: \[\]\)"):
        await until_found(empty, what="a list", timeout=0.02, every=0.005)


def test_loader_env_keeps_probes_off_and_lets_overrides_win(tmp_path) -> None:
    env = loader_env(
        {"APILANE_NATS_URL": "nats://127.0.0.1:4222"},
        cluster="c1",
        node="n1",
        workdir=tmp_path,
        APILANE_MAP_BACKEND="bpf",
    )
    assert env["APILANE_NATS_URL"] == "nats://127.0.0.1:4222"
    assert (env["APILANE_CLUSTER"], env["APILANE_NODE_NAME"]) == ("c1", "n1")
    assert env["APILANE_BACKEND_PROBE"] == "off"
    assert env["APILANE_MAP_BACKEND"] == "bpf"
    assert env["APILANE_STATE_DIR"] == str(tmp_path / "state")
    assert env["APILANE_TRUSTED_KEYS"]
