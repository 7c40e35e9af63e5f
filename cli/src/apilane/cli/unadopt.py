"""`apilane render unadopt`: give calico-node's DaemonSet back what apilane took.

    apilane render unadopt [--kubeconfig PATH] [--daemonset NS/NAME] [--keep-values] [--dry-run]

By the ownership record on the DaemonSet (`apilane.dev/managed-env`): each env entry apilane
created is removed, each value it replaced comes back; entries another field manager has
set since are left alone. With --keep-values the entries that read apilane's ConfigMap get
its current values as literal env instead, so calico-node keeps booting with the endpoints
of now. One strategic merge patch (one rollout of calico-node), guarded by the
resourceVersion read; the ConfigMap itself is left in place. Stop the renderer or switch it
to APILANE_RENDER_MODE=literal first: in configmap mode it adopts the DaemonSet again.
Exit codes: 0 done (or nothing to undo), 1 the DaemonSet or the ConfigMap cannot be read
or patched.
"""

from __future__ import annotations

from typing import Any, TextIO

from apilane.cli.errors import CliError
from apilane.cli.target import Flags
from apilane.kube.client import KubeClient, KubeError, NotFound
from apilane.model.objects import as_dict, as_int, as_str
from apilane.renderer import render
from apilane.renderer.render import EnvDiff
from apilane.renderer.settings import FIELD_MANAGER, PRESETS, RendererSettings, choose_preset
from apilane.renderer.settings import load as load_settings

# --------------------------------------------------------------------------- pure


def summary(
    env_diff: EnvDiff,
    *,
    daemonset: str,
    before: int,
    after: int | None,
    configmap: str,
    dry_run: bool,
) -> str:
    """What unadopt did (or would do), for the person who ran it."""
    lines = [env_diff.text(generation=before).rstrip("\n")]
    if env_diff.unchanged:
        lines.append(f"nothing of apilane's to undo in DaemonSet {daemonset}; not patched")
    elif dry_run:
        lines.append(f"dry run: the API server accepted the patch of DaemonSet {daemonset}")
    else:
        lines.append(
            f"patched DaemonSet {daemonset}: generation {before} -> {after} (calico-node rolls"
            " once); " + _what(env_diff)
        )
    lines.append(
        f"ConfigMap {configmap} is left in place; delete it once no renderer runs in configmap mode"
    )
    return "\n".join(lines) + "\n"


def _what(env_diff: EnvDiff) -> str:
    removed = sorted({f"{c.container}.{c.name}" for c in env_diff.removals})
    restored = sorted({f"{c.container}.{c.name}" for c in env_diff.changes if c.new is not None})
    parts = []
    if removed:
        parts.append("removed " + ", ".join(removed))
    if restored:
        parts.append("literal values in " + ", ".join(restored))
    return "; ".join(parts)


def target(flags: Flags, settings: RendererSettings) -> tuple[str, str]:
    namespace, _, name = flags.daemonset.partition("/")
    if name:
        return namespace, name
    return settings.target_namespace, settings.target_daemonset


# --------------------------------------------------------------------------- I/O


async def unadopt(flags: Flags, *, keep_values: bool, dry_run: bool, out: TextIO) -> int:
    settings = load_settings(serving=False)
    kube = await KubeClient.from_config(flags.kubeconfig or None)
    try:
        if settings.detect_target and not flags.daemonset:
            settings = await _detected(kube, settings)
        namespace, name = target(flags, settings)
        path = f"/apis/apps/v1/namespaces/{namespace}/daemonsets/{name}"
        live = await _get(kube, path, f"DaemonSet {namespace}/{name}")
        cm_path = f"/api/v1/namespaces/{namespace}/configmaps/{settings.configmap_name}"
        values = None
        if keep_values:
            configmap = await _get(
                kube, cm_path, f"ConfigMap {namespace}/{settings.configmap_name}"
            )
            values = {k: as_str(v) for k, v in as_dict(configmap.get("data")).items()}
        env_diff = render.release(live, keep_values=values, field_manager=FIELD_MANAGER)
        metadata = as_dict(live.get("metadata"))
        before = as_int(metadata.get("generation"))
        after = None
        body = env_diff.patch()
        if body is not None:
            body["metadata"]["resourceVersion"] = metadata.get("resourceVersion")
            try:
                result = await kube.patch(
                    path, body, patch_type="strategic", field_manager=FIELD_MANAGER, dry_run=dry_run
                )
            except KubeError as exc:
                raise CliError(f"cannot patch DaemonSet {namespace}/{name}: {exc}") from exc
            after = as_int(as_dict(result.get("metadata")).get("generation"))
    finally:
        await kube.close()
    out.write(
        summary(
            env_diff,
            daemonset=f"{namespace}/{name}",
            before=before,
            after=after,
            configmap=f"{namespace}/{settings.configmap_name}",
            dry_run=dry_run,
        )
    )
    return 0


async def _detected(kube: KubeClient, settings: RendererSettings) -> RendererSettings:
    """The renderer's own choice: the layout whose calico-node DaemonSet exists."""
    existing = set()
    for preset in PRESETS.values():
        try:
            await kube.get(
                f"/apis/apps/v1/namespaces/{preset.namespace}/daemonsets/{preset.daemonset}"
            )
        except KubeError:
            continue
        existing.add(f"{preset.namespace}/{preset.daemonset}")
    found = choose_preset(frozenset(existing))
    return settings if found is None else settings.with_preset(found)


async def _get(kube: KubeClient, path: str, what: str) -> dict[str, Any]:
    try:
        return await kube.get(path)
    except NotFound as exc:
        raise CliError(f"{what} does not exist") from exc
    except KubeError as exc:
        raise CliError(f"cannot read {what}: {exc}") from exc
