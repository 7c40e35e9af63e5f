"""The `apilane` command tree: help, argument errors and where a command finds its stack
(flags, their environment variables, or the local stack's .apilane/stack.json). Nothing here
starts a component: the commands that need one fail before they reach it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from apilane.cli.errors import CliError
from apilane.cli.main import load_up, main
from apilane.cli.target import CALICO_NODE, Flags, StackInfo, find_checkout, stack_file
from apilane.model.errors import ConfigError

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]


def test_the_console_script_is_installed_and_lists_every_command() -> None:
    script = Path(sys.executable).parent / "apilane"
    result = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for command in ("status", "history", "doctor", "simulate", "render", "up"):
        assert command in result.stdout
    assert "apilane simulate failover" in result.stdout
    assert "apilane render manifest" in result.stdout


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["status", "--help"], "--json"),
        (["simulate", "failover", "--help"], "--nats-url"),
        (["render", "manifest", "--help"], "--format {all,env,yaml}"),
        (["up", "--help"], "--memory"),
        (["history", "--help"], "--output {text,json}"),
        (["doctor", "--help"], "--context CONTEXT"),
    ],
)
def test_each_command_has_help(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 0
    assert expected in capsys.readouterr().out


def test_up_help_says_what_it_starts_and_takes_no_stack_options(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["up", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # as wrapped for any terminal width
    assert "usage: apilane up [-h] [--memory]" in out
    assert "the Zipkin tracing UI on loopback, and run them until Ctrl-C" in out
    assert "apilane-cli[local]" in out
    assert "--nats-url" not in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["up", "--bogus"], "unrecognized arguments: --bogus"),
        (["up", "extra"], "unrecognized arguments: extra"),
        (["--nats-url", "nats://127.0.0.1:4222", "up"], "up starts its own stack: --nats-url"),
        (["--cluster", "x", "--daemonset", "a/b", "up"], "--cluster, --daemonset do not apply"),
        ([], "the following arguments are required: COMMAND"),
        (["simulate"], "the following arguments are required: WHAT"),
        (["simulate", "outage"], "invalid choice: 'outage'"),
        (["render", "manifest", "--format", "json"], "invalid choice: 'json'"),
        (["doctor", "--output", "yaml"], "invalid choice: 'yaml'"),
        (["--cluster", "x", "doctor"], "doctor reads the API server only"),
        (
            ["render", "manifest", "--nats-url", "nats://127.0.0.1:1", "--kubeconfig", "/x"],
            "--nats-url and --kubeconfig name two sources: give one",
        ),
    ],
)
def test_argument_errors_exit_2_with_the_reason(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err
    assert "usage: apilane" in err


def test_up_without_the_local_extra_says_how_to_get_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # As if apilane-testing were not installed: importing it fails, as it would then. (Only
    # the import is tried here: `main(["up"])` would start the whole stack if it succeeded.)
    monkeypatch.setitem(sys.modules, "apilane.testing", None)
    monkeypatch.delitem(sys.modules, "apilane.cli.up", raising=False)
    with pytest.raises(CliError) as raised:
        load_up()
    message = str(raised.value)
    assert "`apilane up` needs the local-stack extra (apilane.testing is not installed)" in message
    assert "apilane-cli[local]" in message


def test_other_commands_do_not_import_the_harness() -> None:
    script = (
        "import sys; import apilane.cli.main, apilane.cli.status, apilane.cli.failover, "
        "apilane.cli.manifest, apilane.cli.target, apilane.cli.history, apilane.cli.doctor, "
        "apilane.cli.doctor_collect; "
        "assert not any(m.startswith('apilane.testing') for m in sys.modules), 'harness imported'"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=False, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_doctor_help_documents_the_exit_codes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "the exit code is the worst result: 0 all ok, 1 a warning, 2 a failure" in out
    assert main(["--help"]) == 0
    assert "exit 0 all ok, 1 a warning, 2 a failure" in capsys.readouterr().out


def test_status_without_a_running_stack_says_how_to_start_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    checkout = fake_checkout(tmp_path)
    monkeypatch.chdir(checkout)
    monkeypatch.delenv("APILANE_NATS_URL", raising=False)
    assert main(["status"]) == 1
    assert "the local stack is not running: start it with `apilane up`" in capsys.readouterr().err


def fake_checkout(tmp_path: Path) -> Path:
    (tmp_path / "cli").mkdir(parents=True)
    (tmp_path / "cli" / "pyproject.toml").write_text("")
    (tmp_path / "deploy" / "demo").mkdir(parents=True)
    return tmp_path


def test_the_checkout_is_found_from_a_directory_inside_it(tmp_path: Path) -> None:
    checkout = fake_checkout(tmp_path / "repo")
    (checkout / "docs" / "deep").mkdir(parents=True)
    assert find_checkout(checkout / "docs" / "deep") == checkout
    # Elsewhere: the checkout this package is installed from (editable, by `make setup`).
    assert find_checkout(tmp_path) == REPO


def test_the_local_stack_is_read_from_its_stack_file_and_flags_override_it(
    tmp_path: Path,
) -> None:
    checkout = fake_checkout(tmp_path)
    stack_file(checkout).parent.mkdir()
    stack_file(checkout).write_text(
        json.dumps(
            {
                "cluster": "local",
                "nats_url": "nats://127.0.0.1:4222",
                "kubeconfig": "/repo/.apilane/kubeconfig",
                "zipkin_url": "http://127.0.0.1:9411",
            }
        )
    )
    # A shell's KUBECONFIG and APILANE_CLUSTER are not the local stack's.
    shell = {"KUBECONFIG": "/home/me/.kube/config", "APILANE_CLUSTER": "prod"}
    info = StackInfo.load(Flags(), environ=shell, checkout=checkout)
    assert info == StackInfo(
        cluster="local",
        nats_urls=("nats://127.0.0.1:4222",),
        kubeconfig="/repo/.apilane/kubeconfig",
        zipkin_url="http://127.0.0.1:9411",
        daemonset=CALICO_NODE,
    )
    assert info.daemonset_path == "/apis/apps/v1/namespaces/calico-system/daemonsets/calico-node"
    flags = Flags(cluster="other", kubeconfig="/k", daemonset="ns/ds")
    overridden = StackInfo.load(flags, environ=shell, checkout=checkout)
    assert (overridden.cluster, overridden.kubeconfig) == ("other", "/k")
    assert overridden.daemonset_path == "/apis/apps/v1/namespaces/ns/daemonsets/ds"


def test_a_named_stack_takes_the_rest_from_flags_or_the_environment(tmp_path: Path) -> None:
    environ = {
        "APILANE_NATS_URL": "nats://a:4222,nats://b:4222",
        "APILANE_CLUSTER": "east",
        "KUBECONFIG": "/etc/kube",
    }
    from_env = StackInfo.load(Flags(), environ=environ, checkout=tmp_path)
    assert from_env.nats_urls == ("nats://a:4222", "nats://b:4222")
    assert (from_env.cluster, from_env.kubeconfig, from_env.zipkin_url) == ("east", "/etc/kube", "")
    flags = Flags(nats_urls=("nats://c:4222",), cluster="west")
    from_flags = StackInfo.load(flags, environ={}, checkout=tmp_path)
    assert from_flags.nats_urls == ("nats://c:4222",)
    assert from_flags.cluster == "west"
    with pytest.raises(ConfigError, match="APILANE_NATS_URL"):
        StackInfo.load(Flags(), environ={"APILANE_NATS_URL": "http://x"}, checkout=tmp_path)


def test_python_dash_m_runs_the_same_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "apilane.cli", "up", "--help"],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
        env={**os.environ},
    )
    assert result.returncode == 0, result.stderr
    assert "--memory" in result.stdout
