"""Settings are validated at start, and every error names the variable."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import msgspec
import pytest

from apilane.model.errors import ConfigError
from apilane.model.signing import SigningKey, TrustedKeys
from apilane.runtime.config import (
    Env,
    describe,
    load_common,
    load_signing_key,
    load_trusted_keys,
    require_trusted_keys,
)

pytestmark = [pytest.mark.unit]


def test_defaults_apply_when_nothing_is_set() -> None:
    settings = load_common({})
    assert settings.cluster == "default"
    assert settings.nats_urls == ("nats://127.0.0.1:4222",)
    assert settings.http_port == 8080


def test_values_are_read_from_apilane_variables_and_kubeconfig() -> None:
    settings = load_common(
        {
            "APILANE_CLUSTER": "prod-eu",
            "APILANE_NATS_URL": "nats://a:4222, nats://b:4222",
            "APILANE_HTTP_PORT": "9000",
            "KUBECONFIG": "/etc/kubeconfig",
        }
    )
    assert settings.cluster == "prod-eu"
    assert settings.nats_urls == ("nats://a:4222", "nats://b:4222")
    assert settings.http_port == 9000
    assert settings.kubeconfig == "/etc/kubeconfig"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APILANE_HTTP_PORT", "http"),
        ("APILANE_HTTP_PORT", "70000"),
        ("APILANE_CLUSTER", "has.dots"),
        ("APILANE_CLUSTER", "spaces are bad"),
        ("APILANE_NATS_URL", "http://x"),
        ("APILANE_NATS_URL", "nats://a:1,,nats://b:2"),
        ("APILANE_LOG_LEVEL", "LOUD"),
    ],
)
def test_a_bad_value_raises_config_error_naming_the_variable(name: str, value: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_common({name: value})


@pytest.mark.parametrize(
    ("text", "seconds"), [("100ms", 0.1), ("2s", 2.0), ("5m", 300.0), ("1h", 3600.0), ("1.5", 1.5)]
)
def test_durations_accept_units(text: str, seconds: float) -> None:
    assert Env({"APILANE_WINDOW": text}).seconds("WINDOW", 0.0) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["-1s", "soon", "1d", "ms"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ConfigError, match="APILANE_WINDOW"):
        Env({"APILANE_WINDOW": text}).seconds("WINDOW", 0.0)


@pytest.mark.parametrize(
    ("text", "value"), [("true", True), ("On", True), ("0", False), ("no", False)]
)
def test_booleans(text: str, value: bool) -> None:
    assert Env({"APILANE_X": text}).bool("X", not value) is value


def test_a_bad_boolean_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="APILANE_X"):
        Env({"APILANE_X": "maybe"}).bool("X", False)


def test_trusted_keys_come_from_the_variable_and_the_file(tmp_path: Path) -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    keys_file = tmp_path / "trusted"
    keys_file.write_text(f"# rotation: the new key\n{second.public_text}\n")
    env = Env(
        {"APILANE_TRUSTED_KEYS": first.public_text, "APILANE_TRUSTED_KEYS_FILE": str(keys_file)}
    )
    assert set(require_trusted_keys(env).ids) == {first.key_id, second.key_id}
    with pytest.raises(ConfigError, match="APILANE_TRUSTED_KEYS"):
        require_trusted_keys(Env({}))
    with pytest.raises(ConfigError, match="APILANE_TRUSTED_KEYS_FILE"):
        load_trusted_keys(Env({"APILANE_TRUSTED_KEYS_FILE": str(tmp_path / "missing")}))


def test_the_signing_key_is_a_pem_file_named_by_a_variable(tmp_path: Path) -> None:
    key = SigningKey.generate()
    (tmp_path / "key.pem").write_bytes(key.to_pem())
    env = Env({"APILANE_SIGNING_KEY_FILE": str(tmp_path / "key.pem")})
    assert load_signing_key(env).key_id == key.key_id
    with pytest.raises(ConfigError, match="APILANE_SIGNING_KEY_FILE"):
        load_signing_key(Env({}))
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(ConfigError, match="APILANE_SIGNING_KEY_FILE"):
        load_signing_key(Env({"APILANE_SIGNING_KEY_FILE": str(tmp_path / "bad.pem")}))


def test_describe_shows_key_objects_by_type_and_id_never_their_bytes() -> None:
    @dataclass(frozen=True)
    class WithKeys:
        signing_key: SigningKey
        trusted: TrustedKeys

    key = SigningKey.generate()
    described = describe(WithKeys(key, TrustedKeys.of(key)))
    assert described == {
        "signing_key": {"private": "<Ed25519PrivateKey>"},
        "trusted": {"keys": {key.key_id: "<Ed25519PublicKey>"}},
    }
    assert key.public_text not in repr(described)


def test_nats_credentials_and_tls_files_are_read_and_must_exist(tmp_path) -> None:
    from apilane.runtime import natsauth
    from apilane.runtime.config import NatsAuth

    files = {}
    for name in ("seed.nk", "ca.crt", "client.crt", "client.key"):
        (tmp_path / name).write_text("x")
        files[name] = str(tmp_path / name)
    natsauth.write_seed(tmp_path / "seed.nk", natsauth.new_user_seed())
    settings = load_common(
        {
            "APILANE_NATS_NKEY_SEED_FILE": files["seed.nk"],
            "APILANE_NATS_TLS_CA_FILE": files["ca.crt"],
            "APILANE_NATS_TLS_CERT_FILE": files["client.crt"],
            "APILANE_NATS_TLS_KEY_FILE": files["client.key"],
            "APILANE_NATS_INBOX_PREFIX": "_INBOX_me",
        }
    )
    assert settings.nats_auth == NatsAuth(
        nkey_seed_file=files["seed.nk"],
        tls_ca_file=files["ca.crt"],
        tls_cert_file=files["client.crt"],
        tls_key_file=files["client.key"],
        inbox_prefix="_INBOX_me",
    )
    assert settings.nats_auth.wants_tls
    assert load_common({}).nats_auth == NatsAuth() and not NatsAuth().wants_tls


@pytest.mark.parametrize(
    ("environ", "named"),
    [
        ({"APILANE_NATS_NKEY_SEED_FILE": "/nonexistent/seed.nk"}, "APILANE_NATS_NKEY_SEED_FILE"),
        ({"APILANE_NATS_TLS_CA_FILE": "/nonexistent/ca.crt"}, "APILANE_NATS_TLS_CA_FILE"),
        ({"APILANE_NATS_INBOX_PREFIX": "_INBOX.*"}, "APILANE_NATS_INBOX_PREFIX"),
        ({"APILANE_NATS_INBOX_PREFIX": "_INBOX.apilane.>"}, "APILANE_NATS_INBOX_PREFIX"),
        ({"APILANE_NATS_INBOX_PREFIX": "_INBOX..x"}, "APILANE_NATS_INBOX_PREFIX"),
        ({"APILANE_NATS_INBOX_PREFIX": "_INBOX.a b"}, "APILANE_NATS_INBOX_PREFIX"),
        # Readable, but not a user nkey seed (a file of the wrong kind mounted there).
        ({"APILANE_NATS_NKEY_SEED_FILE": __file__}, "APILANE_NATS_NKEY_SEED_FILE"),
    ],
)
def test_bad_nats_credentials_settings_name_the_variable(
    environ: dict[str, str], named: str
) -> None:
    with pytest.raises(ConfigError, match=named):
        load_common(environ)


def test_a_client_certificate_needs_its_key(tmp_path) -> None:
    (tmp_path / "client.crt").write_text("x")
    with pytest.raises(ConfigError, match="APILANE_NATS_TLS_KEY_FILE"):
        load_common({"APILANE_NATS_TLS_CERT_FILE": str(tmp_path / "client.crt")})


def test_the_bus_connects_with_the_seed_its_own_inbox_and_tls_first(tmp_path) -> None:
    from apilane.runtime import natsauth
    from apilane.runtime.bus import connect_options
    from apilane.runtime.config import NatsAuth
    from apilane.testing.pki import Pki

    seed = natsauth.new_user_seed()
    natsauth.write_seed(tmp_path / "seed.nk", seed)
    pki = Pki(tmp_path / "tls")
    auth = NatsAuth(nkey_seed_file=str(tmp_path / "seed.nk"), tls_ca_file=str(pki.ca_path))
    options = connect_options(["nats://127.0.0.1:4222"], auth.as_identity("node-loader", "c1"))
    assert options["nkeys_seed"] == str(tmp_path / "seed.nk")
    key = natsauth.public_key(seed)
    assert options["inbox_prefix"] == f"_INBOX.apilane.c1.node-loader.{key}"
    assert options["tls_handshake_first"] is True and options["tls"] is not None
    everywhere = connect_options([], auth.as_identity("operator", "*"))
    assert everywhere["inbox_prefix"] == f"_INBOX.apilane.~all.operator.{key}"
    # Given, the prefix is used as it is (a server configured by hand).
    given = msgspec.structs.replace(auth, inbox_prefix="_INBOX.mine")
    assert connect_options([], given.as_identity("renderer", "c1"))["inbox_prefix"] == "_INBOX.mine"
    # A seed whose role nobody said has no inbox it may use: refused before connecting.
    with pytest.raises(ConfigError, match="no role"):
        connect_options([], auth)
    assert connect_options(["nats://127.0.0.1:4222"], NatsAuth()) == {}
    assert "tls" in connect_options(["tls://nats:4222"], NatsAuth())
