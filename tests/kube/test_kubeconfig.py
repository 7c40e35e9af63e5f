"""Kubeconfig and in-cluster configuration as loaded through kubernetes-asyncio: validation
with messages naming the file and the problem, merging, token files re-read as they rotate,
and the HTTP status → error mapping (no API server needed)."""

from __future__ import annotations

import base64
import datetime
import logging
from pathlib import Path

import pytest
import yaml
from kubernetes_asyncio.client import Configuration
from kubernetes_asyncio.config import incluster_config

from apilane.kube import credentials
from apilane.kube.client import KubeClient, KubeError, NotFound, Unavailable, error_from_status
from apilane.kube.credentials import load_in_cluster, load_kubeconfig
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
            minimal_kubeconfig(
                contexts=[{"name": "x", "context": {"cluster": "c", "user": "missing"}}]
            ),
            "user 'missing' (context 'x') is not defined",
        ),
        (
            minimal_kubeconfig(users=[{"name": "u", "user": {"exec": {"command": "aws"}}}]),
            "exec: malformed request. missing key 'apiVersion'",
        ),
        (
            minimal_kubeconfig(users=[{"name": "u", "user": {"auth-provider": {"name": "azure"}}}]),
            "auth-provider 'azure' is not supported",
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
async def test_an_invalid_kubeconfig_is_rejected_with_a_message_naming_the_problem(
    tmp_path: Path, document: object, complaint: str
) -> None:
    path = write_yaml(tmp_path / "config", document)
    with pytest.raises(ConfigError) as caught:
        await load_kubeconfig(path)
    assert complaint in str(caught.value)
    assert path in str(caught.value)


async def test_a_missing_or_unparsable_kubeconfig_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        await load_kubeconfig(str(tmp_path / "absent"))
    (tmp_path / "broken").write_text("clusters: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        await load_kubeconfig(str(tmp_path / "broken"))


async def test_relative_paths_in_a_kubeconfig_resolve_against_its_directory(
    tmp_path: Path,
) -> None:
    (tmp_path / "ca.crt").write_text("not used here")
    document = minimal_kubeconfig(
        clusters=[
            {"name": "c", "cluster": {"server": "https://h:1/", "certificate-authority": "ca.crt"}}
        ]
    )
    configuration = await load_kubeconfig(write_yaml(tmp_path / "config", document))
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert configuration.host == "https://h:1"
    assert configuration.api_key["BearerToken"] == "Bearer secret"


async def test_several_kubeconfig_files_merge_with_the_first_definition_winning(
    tmp_path: Path,
) -> None:
    first = write_yaml(
        tmp_path / "a",
        {"current-context": "x", "users": [{"name": "u", "user": {"token": "first"}}]},
    )
    second = write_yaml(tmp_path / "b", minimal_kubeconfig(**{"current-context": "other"}))
    configuration = await load_kubeconfig([first, second])
    assert configuration.api_key["BearerToken"] == "Bearer first"


async def test_tls_server_name_is_carried_into_the_configuration(tmp_path: Path) -> None:
    document = minimal_kubeconfig(
        clusters=[
            {
                "name": "c",
                "cluster": {"server": "https://10.0.0.1:6443", "tls-server-name": "api.example"},
            }
        ]
    )
    configuration = await load_kubeconfig(write_yaml(tmp_path / "config", document))
    assert configuration.tls_server_name == "api.example"


async def bearer(configuration: Configuration) -> str:
    """The Authorization header the next request sends (the refresh hook runs first)."""
    return str(await configuration.get_api_key_with_prefix("BearerToken"))


async def test_a_token_file_is_read_again_at_the_refresh_interval_and_trimmed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    token = tmp_path / "token"
    token.write_text("one\n")
    document = minimal_kubeconfig(users=[{"name": "u", "user": {"tokenFile": str(token)}}])
    path = write_yaml(tmp_path / "config", document)
    steady = await load_kubeconfig(path)
    monkeypatch.setattr(credentials, "REFRESH_SECONDS", 0.0)
    eager = await load_kubeconfig(path)
    assert await bearer(eager) == "Bearer one"
    token.write_text("two")
    assert await bearer(eager) == "Bearer two"
    assert await bearer(steady) == "Bearer one"  # not before REFRESH_SECONDS (60 s)

    token.unlink()
    with caplog.at_level(logging.WARNING, logger="apilane.kube.credentials"):
        assert await bearer(eager) == "Bearer two"
    assert "could not renew the credentials, keeping the previous ones" in caplog.text


def in_cluster_environ(host: str) -> dict[str, str]:
    return {"KUBERNETES_SERVICE_HOST": host, "KUBERNETES_SERVICE_PORT": "443"}


def test_in_cluster_config_needs_the_service_host_and_a_mounted_token(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="Service host/port is not set") as no_host:
        load_in_cluster({}, base=tmp_path)
    assert "KUBERNETES_SERVICE_HOST" in str(no_host.value)
    with pytest.raises(ConfigError, match="Service token file does not exist") as no_token:
        load_in_cluster(in_cluster_environ("10.96.0.1"), base=tmp_path)
    assert f"token mounted at {tmp_path}" in str(no_token.value)
    (tmp_path / "token").write_text("t")
    (tmp_path / "ca.crt").write_text("c")
    configuration = load_in_cluster(in_cluster_environ("fd00:10:96::1"), base=tmp_path)
    assert configuration.host == "https://[fd00:10:96::1]:443"
    assert configuration.ssl_ca_cert == str(tmp_path / "ca.crt")
    assert configuration.api_key["BearerToken"] == "Bearer t"


async def test_the_in_cluster_token_is_read_again_after_kubernetes_asyncios_period(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "token").write_text("t1")
    (tmp_path / "ca.crt").write_text("c")
    steady = load_in_cluster(in_cluster_environ("10.96.0.1"), base=tmp_path)
    monkeypatch.setattr(incluster_config, "TOKEN_REFRESH_PERIOD", datetime.timedelta(0))
    eager = load_in_cluster(in_cluster_environ("10.96.0.1"), base=tmp_path)
    (tmp_path / "token").write_text("t2")
    assert await bearer(eager) == "Bearer t2"
    assert await bearer(steady) == "Bearer t1"  # not before a minute has passed


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


async def test_a_certificate_authority_that_is_not_pem_is_a_config_error(tmp_path: Path) -> None:
    not_pem = base64.b64encode(b"not a certificate").decode()
    document = minimal_kubeconfig(
        clusters=[
            {
                "name": "c",
                "cluster": {"server": "https://h:1", "certificate-authority-data": not_pem},
            }
        ]
    )
    path = write_yaml(tmp_path / "config", document)
    with pytest.raises(ConfigError, match="not valid PEM") as caught:
        await KubeClient.from_config(path)
    assert path in str(caught.value)
