"""Kubeconfig and in-cluster configuration validation, and the HTTP status → error mapping
(pure: no API server needed)."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
import yaml

from apilane.kube.client import (
    KubeError,
    NotFound,
    Unavailable,
    error_from_status,
    in_cluster_credentials,
    load_kubeconfig,
)
from apilane.model.errors import ConfigError

pytestmark = [pytest.mark.unit]


def write_yaml(path: Path, document: object) -> str:
    path.write_text(yaml.safe_dump(document))
    return str(path)


def minimal_kubeconfig(**overrides: object) -> dict[str, object]:
    document: dict[str, object] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "c", "cluster": {"server": "https://127.0.0.1:6443"}}],
        "users": [{"name": "u", "user": {"token": "secret"}}],
        "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u"}}],
        "current-context": "x",
    }
    document.update(overrides)
    return document


@pytest.mark.parametrize(
    ("document", "complaint"),
    [
        ("just text", "expected a mapping"),
        (minimal_kubeconfig(**{"current-context": ""}), "no current-context"),
        (minimal_kubeconfig(**{"current-context": "nope"}), "context 'nope' is not defined"),
        (
            minimal_kubeconfig(
                contexts=[{"name": "x", "context": {"cluster": "missing", "user": "u"}}]
            ),
            "cluster 'missing'",
        ),
        (minimal_kubeconfig(clusters=[{"name": "c", "cluster": {}}]), "'server' is missing"),
        (
            minimal_kubeconfig(clusters=[{"name": "c", "cluster": {"server": "127.0.0.1:6443"}}]),
            "is not an http(s)://host[:port] URL",
        ),
        (
            minimal_kubeconfig(users=[{"name": "u", "user": {"exec": {"command": "aws"}}}]),
            "'exec' authentication is not supported",
        ),
        (
            minimal_kubeconfig(
                users=[
                    {
                        "name": "u",
                        "user": {"client-certificate-data": base64.b64encode(b"x").decode()},
                    }
                ]
            ),
            "needs both the certificate and its key",
        ),
        (
            minimal_kubeconfig(
                clusters=[
                    {
                        "name": "c",
                        "cluster": {"server": "https://h", "certificate-authority": "nowhere.crt"},
                    }
                ]
            ),
            "nowhere.crt",
        ),
        (minimal_kubeconfig(clusters="not a list"), "'clusters' must be a list"),
    ],
)
def test_an_invalid_kubeconfig_is_rejected_with_a_message_naming_the_problem(
    tmp_path: Path, document: object, complaint: str
) -> None:
    path = write_yaml(tmp_path / "config", document)
    with pytest.raises(ConfigError) as caught:
        load_kubeconfig(path)
    assert complaint in str(caught.value)
    assert path in str(caught.value)


def test_a_missing_or_unparsable_kubeconfig_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_kubeconfig(str(tmp_path / "absent"))
    (tmp_path / "broken").write_text("clusters: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_kubeconfig(str(tmp_path / "broken"))


def test_relative_paths_in_a_kubeconfig_resolve_against_its_directory(tmp_path: Path) -> None:
    (tmp_path / "ca.crt").write_text("not used here")
    document = minimal_kubeconfig(
        clusters=[
            {"name": "c", "cluster": {"server": "https://h:1/", "certificate-authority": "ca.crt"}}
        ]
    )
    creds = load_kubeconfig(write_yaml(tmp_path / "config", document))
    assert creds.ca_file == str(tmp_path / "ca.crt")
    assert creds.server == "https://h:1"
    assert creds.token == "secret"


def test_several_kubeconfig_files_merge_with_the_first_definition_winning(tmp_path: Path) -> None:
    first = write_yaml(
        tmp_path / "a",
        {"current-context": "x", "users": [{"name": "u", "user": {"token": "first"}}]},
    )
    second = write_yaml(tmp_path / "b", minimal_kubeconfig(**{"current-context": "other"}))
    creds = load_kubeconfig([first, second])
    assert creds.token == "first"


def test_in_cluster_config_needs_the_service_host_and_a_mounted_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="KUBERNETES_SERVICE_HOST"):
        in_cluster_credentials({}, base=tmp_path)
    with pytest.raises(ConfigError, match="token mounted"):
        in_cluster_credentials(
            {"KUBERNETES_SERVICE_HOST": "10.96.0.1", "KUBERNETES_SERVICE_PORT": "443"},
            base=tmp_path,
        )
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("c")
    creds = in_cluster_credentials(
        {"KUBERNETES_SERVICE_HOST": "fd00:10:96::1", "KUBERNETES_SERVICE_PORT": "443"},
        base=tmp_path,
    )
    assert creds.server == "https://[fd00:10:96::1]:443"
    assert creds.token_file == str(tmp_path / "token")


def test_http_statuses_map_to_typed_errors_carrying_the_status_message() -> None:
    status = {
        "kind": "Status",
        "reason": "NotFound",
        "message": 'services "x" not found',
        "code": 404,
    }
    error = error_from_status(404, status)
    assert isinstance(error, NotFound)
    assert (error.status, error.reason, error.message) == (
        404,
        "NotFound",
        'services "x" not found',
    )
    assert isinstance(error_from_status(503, None), Unavailable)
    assert isinstance(error_from_status(429, {"details": {"retryAfterSeconds": 2}}), Unavailable)
    assert error_from_status(429, {"details": {"retryAfterSeconds": 2}}).retry_after == 2.0  # type: ignore[attr-defined]
    assert type(error_from_status(400, {"message": "bad selector"})) is KubeError
