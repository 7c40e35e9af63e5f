"""The layering contract, checked on the source (every import statement, so a lazy import
counts too): model <- runtime <- kube <- services <- cli; services never import each other;
the node-loader never imports the Kubernetes adapter; nothing in production imports the
harness, except the CLI's `up` module (the local stack, behind the `apilane-cli[local]` extra).
`make lint` checks the same with import-linter; `test_import_linter_contracts_hold` runs it."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "apilane.model": ROOT / "shared/model/src/apilane/model",
    "apilane.runtime": ROOT / "shared/runtime/src/apilane/runtime",
    "apilane.kube": ROOT / "shared/kube/src/apilane/kube",
    "apilane.testing": ROOT / "shared/testing/src/apilane/testing",
    "apilane.discovery": ROOT / "services/discovery/src/apilane/discovery",
    "apilane.renderer": ROOT / "services/renderer/src/apilane/renderer",
    "apilane.node_loader": ROOT / "services/node-loader/src/apilane/node_loader",
    "apilane.cli": ROOT / "cli/src/apilane/cli",
}


def imported_apilane_packages(source_dir: Path) -> dict[str, set[str]]:
    """apilane sub-package → the files under source_dir that import it."""
    found: dict[str, set[str]] = {}
    for path in source_dir.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                parts = name.split(".")
                if parts[0] == "apilane" and len(parts) > 1:
                    found.setdefault(f"apilane.{parts[1]}", set()).add(path.name)
    return found


def test_every_package_folder_exists() -> None:
    for package, folder in PACKAGES.items():
        assert folder.is_dir(), package


LIBRARIES = {"apilane.model", "apilane.runtime", "apilane.kube"}
SERVICES = {"apilane.discovery", "apilane.renderer", "apilane.node_loader"}
ALLOWED = {
    "apilane.model": set(),
    "apilane.runtime": {"apilane.model"},
    "apilane.kube": {"apilane.model", "apilane.runtime"},
    "apilane.testing": LIBRARIES,
    "apilane.discovery": LIBRARIES,
    "apilane.renderer": LIBRARIES,
    "apilane.node_loader": {"apilane.model", "apilane.runtime"},
    "apilane.cli": LIBRARIES | SERVICES,
}
# (package, imported package) -> the only files of the package allowed that import.
FILE_EXCEPTIONS = {("apilane.cli", "apilane.testing"): {"up.py"}}


def forbidden_imports(package: str, imports: dict[str, set[str]]) -> dict[str, set[str]]:
    """The imports of `package` that its layer does not allow, by the files that make them."""
    allowed = {package} | ALLOWED[package]
    forbidden = {}
    for name, files in imports.items():
        outside = files - FILE_EXCEPTIONS.get((package, name), set())
        if name not in allowed and outside:
            forbidden[name] = outside
    return forbidden


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_only_itself_and_the_layers_below(package: str) -> None:
    forbidden = forbidden_imports(package, imported_apilane_packages(PACKAGES[package]))
    assert not forbidden, f"{package} imports {forbidden}"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def f():\n    from apilane.renderer import render\n")
    assert "apilane.renderer" in imported_apilane_packages(tmp_path)


def test_only_the_up_module_of_the_cli_may_import_the_harness(tmp_path: Path) -> None:
    (tmp_path / "up.py").write_text("from apilane.testing.nats import NatsServer\n")
    assert forbidden_imports("apilane.cli", imported_apilane_packages(tmp_path)) == {}
    (tmp_path / "status.py").write_text("def f():\n    import apilane.testing.procs\n")
    assert forbidden_imports("apilane.cli", imported_apilane_packages(tmp_path)) == {
        "apilane.testing": {"status.py"}
    }
    assert "apilane.testing" in forbidden_imports(
        "apilane.renderer", {"apilane.testing": {"up.py"}}
    )


def test_no_namespace_level_init_file_shadows_the_namespace() -> None:
    for folder in PACKAGES.values():
        assert not (folder.parent / "__init__.py").exists(), folder.parent


def test_import_linter_contracts_hold() -> None:
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout
