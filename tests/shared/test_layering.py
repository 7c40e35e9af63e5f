"""The layering contract: services import apilane.shared, never each other; shared imports no
service. Checked on the source (every import statement), so a lazy import counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = [pytest.mark.unit]

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = {
    "apilane.shared": ROOT / "shared/src/apilane/shared",
    "apilane.discovery": ROOT / "services/discovery/src/apilane/discovery",
    "apilane.renderer": ROOT / "services/renderer/src/apilane/renderer",
    "apilane.node_loader": ROOT / "services/node-loader/src/apilane/node_loader",
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


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_only_itself_and_shared(package: str) -> None:
    imports = imported_apilane_packages(PACKAGES[package])
    allowed = {package} if package == "apilane.shared" else {package, "apilane.shared"}
    forbidden = {name: files for name, files in imports.items() if name not in allowed}
    assert not forbidden, f"{package} imports {forbidden}"


def test_the_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    (tmp_path / "bad.py").write_text("def f():\n    from apilane.renderer import render\n")
    assert "apilane.renderer" in imported_apilane_packages(tmp_path)


def test_no_namespace_level_init_file_shadows_the_namespace() -> None:
    for folder in PACKAGES.values():
        assert not (folder.parent / "__init__.py").exists(), folder.parent
