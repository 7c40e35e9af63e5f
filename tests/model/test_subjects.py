"""Subject and key names are versioned and refuse tokens that would split a subject."""

from __future__ import annotations

import pytest

from apilane.model import subjects
from apilane.model.errors import ConfigError

pytestmark = [pytest.mark.unit]


def test_subjects_are_versioned_per_cluster() -> None:
    assert subjects.warnings_subject("prod") == "apilane.v1.prod.warnings"
    assert subjects.renders_subject("prod") == "apilane.v1.prod.renders"
    assert subjects.kv_subject(subjects.SNAPSHOT_BUCKET, "prod") == "$KV.apilane_v1_snapshots.prod"


def test_every_events_subject_is_captured_by_the_events_stream() -> None:
    for subject in (subjects.warnings_subject("x"), subjects.renders_subject("x")):
        assert any(
            pattern.replace("*", "x") == subject for pattern in subjects.EVENTS_STREAM_SUBJECTS
        )


def test_node_names_with_dots_become_one_token() -> None:
    assert (
        subjects.node_state_key("prod", "ip-10-0-0-1.ec2.internal")
        == "prod.ip-10-0-0-1_ec2_internal"
    )


@pytest.mark.parametrize("bad", ["", "a.b", "a b", "a*", "a>", "x" * 64, "-leading"])
def test_bad_cluster_names_are_refused(bad: str) -> None:
    with pytest.raises(ConfigError):
        subjects.snapshot_key(bad)
