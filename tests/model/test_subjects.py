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


LONGEST_NODE = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])  # 253 characters


def test_node_names_up_to_253_characters_are_valid_subjects_and_keys() -> None:
    assert len(LONGEST_NODE) == 253
    token = subjects.node_token(LONGEST_NODE)
    assert len(token) == 253 and "." not in token
    assert subjects.node_state_key("prod", LONGEST_NODE) == f"prod.{token}"
    assert subjects.node_control_subject("prod", LONGEST_NODE) == (
        f"apilane.v1.prod.nodes.{token}.control"
    )
    # A single label longer than 63 is still a valid DNS subdomain for Kubernetes.
    assert subjects.node_token("n" * 200) == "n" * 200


@pytest.mark.parametrize(
    "bad",
    ["", "a_b", "-node", "node-", "a..b", ".a", "a.", "a b", "a*", "a>", "x" * 254],
)
def test_names_that_are_no_dns_subdomain_are_refused_as_node_names(bad: str) -> None:
    with pytest.raises(ConfigError, match="DNS subdomain"):
        subjects.node_token(bad)
