"""`apilane`: the operator command line.

    apilane status [--json]          the snapshot, calico-node's env, each node's generation
    apilane history [--output json]  the kept snapshot generations: diffs, signatures, traces
    apilane doctor [--output json]   the eBPF bootstrap's preconditions, cluster and node;
                                     exit 0 all ok, 1 a warning, 2 a failure
    apilane simulate failover        kill one API server (--replace: start a new one), follow it
    apilane demo                     call the API server through the VIP every 100 ms
    apilane node lb on|off NODE      switch a node's connect-time LB (a signed request)
    apilane render manifest          the env and a DaemonSet snippet for manifest installs
    apilane render unadopt           give calico-node's DaemonSet back the env apilane took
    apilane up [--memory]            the local stack, until Ctrl-C (`make up`)
    apilane keys generate DIR        an Ed25519 key pair (snapshot signing, operator control)

`status`, `simulate failover` and `node lb` talk to the local stack `apilane up` runs, or
to the stack --nats-url (APILANE_NATS_URL) names, as the operator's NATS identity
(APILANE_NATS_*); --nats-url, --cluster, --kubeconfig and --daemonset go before or after
the command. `doctor` reads only the API server (--kubeconfig, --context; KUBECONFIG, the
pod's service account or ~/.kube/config) and the machine it runs on.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from apilane.cli.demo import add_request_options
from apilane.cli.errors import CliError, UsageError
from apilane.cli.target import (
    CALICO_NODE,
    Flags,
    StackInfo,
    find_checkout,
    read_stack_file,
    stack_file,
)
from apilane.model.errors import ApilaneError

Command = Callable[[argparse.Namespace], int]
# The options that say which stack to talk to; `up` starts its own.
TARGET_OPTIONS = ("nats_url", "cluster", "kubeconfig", "daemonset")


def add_target_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """On the top parser and again on each command, so they may go before or after it (a
    command's copy leaves the value alone unless given there)."""
    default = None if top else argparse.SUPPRESS
    group = parser.add_argument_group("which stack")
    group.add_argument(
        "--nats-url",
        action="append",
        default=default,
        metavar="URL",
        help="NATS of the stack (repeatable; default APILANE_NATS_URL, else the local stack)",
    )
    group.add_argument(
        "--cluster", default=default, help="cluster name (default APILANE_CLUSTER or the stack's)"
    )
    group.add_argument(
        "--kubeconfig", default=default, help="the API server's kubeconfig (default KUBECONFIG)"
    )
    group.add_argument(
        "--daemonset",
        default=default,
        metavar="NAMESPACE/NAME",
        help=f"calico-node's DaemonSet (default {CALICO_NODE})",
    )


def command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    run: Command,
    help_text: str,
    *,
    targeted: bool = True,
    description: str = "",
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=description or help_text)
    if targeted:
        add_target_options(parser, top=False)
    parser.set_defaults(run=run)
    return parser


Subcommands = Any  # argparse's _SubParsersAction, private by name


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="apilane",
        description="apilane's operator command line.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(__doc__ or "").split("\n\n")[1],
    )
    add_target_options(parser, top=True)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_reading_commands(commands)
    _add_simulating_commands(commands)
    _add_acting_commands(commands)
    _add_local_commands(commands)
    return parser


def _add_reading_commands(commands: Subcommands) -> None:
    """The read-only views: status, history, doctor."""
    status = command(
        commands, "status", run_status, "the snapshot, the calico-node env and each node's state"
    )
    status.add_argument("--json", action="store_true", help="print JSON for scripts")
    history = command(
        commands,
        "history",
        run_history,
        "the kept generations of the snapshot: when, what changed, signature, trace",
    )
    history.add_argument("--output", choices=("text", "json"), default="text")
    doctor = command(
        commands,
        "doctor",
        run_doctor,
        "check the eBPF bootstrap's preconditions (exit 0 ok, 1 warn, 2 fail)",
        description=(
            "Check what an eBPF kube-proxy replacement needs, read-only: the kubernetes "
            "Service and its EndpointSlices, kube-proxy and who manages it, a managed or "
            "external API server, calico-node's install, and on this machine bpffs, cgroup "
            "v2, the kernel and its headers. One line per check; the exit code is the worst "
            "result: 0 all ok, 1 a warning, 2 a failure."
        ),
    )
    doctor.add_argument("--context", default="", help="the kubeconfig context (default: current)")
    doctor.add_argument("--output", choices=("text", "json"), default="text")
    doctor.add_argument(
        "--no-node", action="store_true", help="skip the checks of the machine it runs on"
    )


def _add_simulating_commands(commands: Subcommands) -> None:
    """Changes made on purpose to watch apilane follow them: failover, demo."""
    simulate = commands.add_parser("simulate", help="simulate a change in the cluster")
    what = simulate.add_subparsers(dest="what", required=True, metavar="WHAT")
    failover = command(
        what,
        "failover",
        run_failover,
        "kill one real API server (or replace a demo endpoint), follow the change",
        description=(
            "Against the local stack's real API servers (`apilane up` as root): SIGKILL one by "
            "the pid the stack recorded and follow it out of every node; --replace then has the "
            "stack start a new one at a new address and follows it in. Against other stacks: "
            "replace one endpoint of the demo EndpointSlice default/kubernetes-ha."
        ),
    )
    failover.add_argument(
        "--replace", action="store_true", help="bring a new API server up at a new address"
    )
    demo = command(
        commands,
        "demo",
        run_demo,
        "call the API server through the service VIP every 100 ms; print who answered",
        targeted=False,
        description=(
            "A client in the local stack's client network namespace (no default route) and the "
            "node-loader's cgroup calls https://10.96.0.1:443 through the connect-time load "
            "balancer and prints each answer: which API server (its certificate's CN), the "
            "status, the latency. Needs `apilane up` as root with real eBPF."
        ),
    )
    add_request_options(demo)


def _add_acting_commands(commands: Subcommands) -> None:
    """Commands that change something: node lb, render, keys."""
    node = commands.add_parser("node", help="act on one node-loader")
    node_commands = node.add_subparsers(dest="node_command", required=True, metavar="ACTION")
    lb = command(
        node_commands,
        "lb",
        run_node_lb,
        "switch the node's connect-time load balancer on or off (its maps stay)",
    )
    lb.add_argument("state", choices=("on", "off"), help="the switch")
    lb.add_argument("node", metavar="NODE", help="the node's name (APILANE_NODE_NAME)")
    render = commands.add_parser("render", help="render apilane's output for other installs")
    output = render.add_subparsers(dest="output", required=True, metavar="OUTPUT")
    manifest = command(
        output, "manifest", run_manifest, "print the env lines and a calico-node DaemonSet snippet"
    )
    manifest.add_argument("--format", choices=("all", "env", "yaml"), default="all")
    unadopt = command(
        output,
        "unadopt",
        run_unadopt,
        "give calico-node's DaemonSet back the env apilane took (by its ownership record)",
    )
    unadopt.add_argument(
        "--keep-values",
        action="store_true",
        help="write the ConfigMap's current values as literal env instead of the originals",
    )
    unadopt.add_argument(
        "--dry-run", action="store_true", help="server-side dry run: change nothing"
    )
    keys = commands.add_parser("keys", help="signing keys")
    key_commands = keys.add_subparsers(dest="key_command", required=True, metavar="ACTION")
    generate = command(
        key_commands,
        "generate",
        run_keys_generate,
        "write an Ed25519 key pair: NAME.pem (private, 0600) and NAME.pub",
        targeted=False,
    )
    generate.add_argument("directory", type=Path, help="where to write the pair")
    generate.add_argument("--name", default="signing", help="file name stem (default: signing)")
    generate.add_argument("--force", action="store_true", help="replace an existing pair")


def _add_local_commands(commands: Subcommands) -> None:
    """The local stack."""
    up = command(
        commands,
        "up",
        run_up,
        "the local stack (NATS, etcd + kube-apiserver, the services, Zipkin) until Ctrl-C",
        targeted=False,
        description=(
            "Start nats-server, etcd + kube-apiserver seeded with a demo cluster, discovery, "
            "renderer, one node-loader and the Zipkin tracing UI on loopback, and run them "
            "until Ctrl-C. Run it in the apilane checkout: its state lives under .apilane/. "
            "Needs the apilane-cli[local] extra (`make setup` installs it)."
        ),
    )
    up.add_argument(
        "--memory",
        action="store_true",
        help="run the node-loader on in-memory maps even where real eBPF is possible",
    )


def flags(args: argparse.Namespace) -> Flags:
    return Flags(
        nats_urls=tuple(args.nats_url or ()),
        cluster=args.cluster or "",
        kubeconfig=args.kubeconfig or "",
        daemonset=args.daemonset or "",
    )


def run_status(args: argparse.Namespace) -> int:
    from apilane.cli.status import status

    return asyncio.run(status(StackInfo.load(flags(args)), as_json=args.json, out=sys.stdout))


def run_history(args: argparse.Namespace) -> int:
    from apilane.cli.history import history

    info = StackInfo.load(flags(args))
    return asyncio.run(history(info, as_json=args.output == "json", out=sys.stdout))


def run_doctor(args: argparse.Namespace) -> int:
    from apilane.cli import doctor_collect

    if args.nats_url or args.cluster:
        raise UsageError("doctor reads the API server only: --nats-url and --cluster do not apply")
    options = doctor_collect.DoctorOptions(
        kubeconfig=args.kubeconfig or "",
        context=args.context,
        renderer_target=args.daemonset or CALICO_NODE,
        node=not args.no_node,
        as_json=args.output == "json",
    )
    return asyncio.run(doctor_collect.run(options, out=sys.stdout))


def run_failover(args: argparse.Namespace) -> int:
    from apilane.cli.failover import simulate_failover, simulate_real_failover

    info = StackInfo.load(flags(args))
    local = local_stack_data(info)
    if local is not None and local.get("ha"):
        checkout = find_checkout()
        assert checkout is not None  # local_stack_data found its stack file
        return asyncio.run(
            simulate_real_failover(
                info, local, stack_file=stack_file(checkout), replace=args.replace, out=sys.stdout
            )
        )
    return asyncio.run(simulate_failover(info, out=sys.stdout))


def local_stack_data(info: StackInfo) -> dict[str, Any] | None:
    """The stack file of the local stack, when `info` is that stack."""
    try:
        data = read_stack_file(find_checkout())
    except CliError:
        return None
    return data if data.get("nats_url") in info.nats_urls else None


def run_demo(args: argparse.Namespace) -> int:
    from apilane.cli.demo import VERIFY_NAME, Target, join, run

    data = read_stack_file(find_checkout())
    ha, cgroup = data.get("ha") or {}, data.get("cgroup") or ""
    clients = ha.get("clients") or []
    if not clients or not cgroup:
        raise CliError(
            "the demo needs the local stack's real API servers and eBPF data plane: run "
            "`apilane up` (`make up`) as root on a machine with bcc"
        )
    join(Path(clients[0]["path"]), Path(cgroup))
    target = Target(args.vip, args.port, args.path, ha["ca"], ha.get("verify_name") or VERIFY_NAME)
    return run(
        target,
        interval=args.interval,
        duration=args.duration,
        count=args.count,
        as_json=args.json,
        out=sys.stdout,
    )


def run_node_lb(args: argparse.Namespace) -> int:
    from apilane.cli.node import switch_lb

    info = StackInfo.load(flags(args))
    return asyncio.run(switch_lb(info, args.node, enabled=args.state == "on", out=sys.stdout))


def run_manifest(args: argparse.Namespace) -> int:
    from apilane.cli.manifest import manifest

    return asyncio.run(manifest(flags(args), fmt=args.format, out=sys.stdout))


def run_unadopt(args: argparse.Namespace) -> int:
    from apilane.cli.unadopt import unadopt

    return asyncio.run(
        unadopt(flags(args), keep_values=args.keep_values, dry_run=args.dry_run, out=sys.stdout)
    )


def run_keys_generate(args: argparse.Namespace) -> int:
    from apilane.cli.keys import generate

    return generate(args.directory, args.name, force=args.force, out=sys.stdout)


def run_up(args: argparse.Namespace) -> int:
    named = [f"--{name.replace('_', '-')}" for name in TARGET_OPTIONS if getattr(args, name)]
    if named:
        raise UsageError(f"up starts its own stack: {', '.join(named)} do not apply")
    up: Callable[..., int] = load_up().run
    return up(memory=args.memory)


def load_up() -> ModuleType:
    """apilane.cli.up, which runs on the dev-only harness: imported only when `up` runs, so
    every other command works without it, and a clear error when it is missing."""
    try:
        return importlib.import_module("apilane.cli.up")
    except ModuleNotFoundError as exc:
        raise CliError(
            f"`apilane up` needs the local-stack extra ({exc.name} is not installed): run "
            "`make setup` in the apilane checkout, or install `apilane-cli[local]`"
        ) from exc


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse has printed the help or the usage error
        return exc.code if isinstance(exc.code, int) else 2
    # The bus logs reconnects and disconnects for services; a CLI's own messages say enough.
    logging.basicConfig(level=logging.ERROR)
    run: Command = args.run
    try:
        return run(args)
    except UsageError as exc:
        parser.print_usage(sys.stderr)
        print(f"apilane: error: {exc}", file=sys.stderr)
        return 2
    except ApilaneError as exc:
        print(f"apilane: {exc}", file=sys.stderr)
        return 1
