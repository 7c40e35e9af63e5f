"""The local images' recipe, checked without a daemon: the inputs digest changes exactly when
an input does, build order puts every image after what it stands on, the service images'
inputs cover everything services/Dockerfile copies, and every service answers `--help` (the
Dockerfile's smoke check of a built image)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from apilane.testing import images

pytestmark = [pytest.mark.unit]

REPO = Path(__file__).resolve().parents[2]


def test_digest_depends_on_names_and_contents_not_order() -> None:
    parts = [("a", b"1"), ("b", b"2")]
    assert images.digest(parts) == images.digest(list(reversed(parts)))
    assert images.digest(parts) != images.digest([("a", b"1"), ("b", b"3")])
    assert images.digest(parts) != images.digest([("a", b"1"), ("c", b"2")])
    # No ambiguity from concatenation: ("ab", "") is not ("a", "b").
    assert images.digest([("ab", b"")]) != images.digest([("a", b"b")])


def test_build_order_puts_parents_first_and_each_image_once() -> None:
    catalogue = images.catalogue()
    order = images.build_order(catalogue, ["node-loader", "discovery", "zipkin"])
    assert order[:3] == ["rootfs", "base", "uv"]
    assert len(order) == len(set(order))
    for name in order:
        parent = catalogue[name].parent
        assert parent is None or order.index(parent) < order.index(name)
    with pytest.raises(KeyError, match="unknown image"):
        images.build_order(catalogue, ["nope"])


def test_every_recipe_names_its_parent_by_the_build_arg_it_is_given() -> None:
    for name, image in images.catalogue().items():
        if image.parent is None or name in images.SERVICES:
            continue
        dockerfile = (images.RECIPES / name / "Dockerfile").read_text()
        arg = "ROOTFS_IMAGE" if image.parent == "rootfs" else "BASE_IMAGE"
        assert f"ARG {arg}\nFROM ${{{arg}}}" in dockerfile, name


def test_service_inputs_cover_what_the_dockerfile_copies() -> None:
    dockerfile = (REPO / "services" / "Dockerfile").read_text()
    sources = {
        match.group(1).split("/")[0]
        for match in re.finditer(r"^COPY (?!--from)(\S+)", dockerfile, re.MULTILINE)
    }
    covered = {entry.split("/")[0] for entry in images.SERVICE_INPUTS} | {"services"}
    assert sources <= covered, sources - covered


def test_a_source_edit_changes_the_service_digest(tmp_path: Path) -> None:
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "a.py").write_text("x = 1\n")
    (tmp_path / "pkg" / "__pycache__").mkdir()
    (tmp_path / "pkg" / "__pycache__" / "a.cpython-311.pyc").write_bytes(b"junk")
    files = images.tree_files(tmp_path, ["pkg"])
    assert [p.name for p in files] == ["a.py"]
    before = images.digest(images.file_parts(tmp_path, files))
    (tmp_path / "pkg" / "a.py").write_text("x = 2\n")
    assert images.digest(images.file_parts(tmp_path, files)) != before


@pytest.mark.parametrize("module", ["apilane.discovery", "apilane.renderer", "apilane.node_loader"])
def test_every_service_answers_help(module: str) -> None:
    result = subprocess.run(
        [sys.executable, "-m", module, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "usage" in result.stdout.lower()


def test_service_digest_follows_dockerignore(tmp_path: Path) -> None:
    (tmp_path / "shared" / "testing" / "src").mkdir(parents=True)
    (tmp_path / "shared" / "testing" / "pyproject.toml").write_text("[project]\n")
    (tmp_path / "shared" / "testing" / "src" / "h.py").write_text("")
    (tmp_path / "shared" / "m.pyc").write_bytes(b"")
    ignore = "# c\n**/*.pyc\n**/.venv\nshared/testing/src\n"
    found = images.tree_files(tmp_path, ["shared"], ignore=ignore)
    assert [p.relative_to(tmp_path).as_posix() for p in found] == ["shared/testing/pyproject.toml"]


def test_the_repository_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    ignore = (REPO / ".dockerignore").read_text()
    kept = {
        p.relative_to(REPO).as_posix()
        for p in images.tree_files(REPO, list(images.SERVICE_INPUTS), ignore=ignore)
    }
    for needed in ("uv.lock", "pyproject.toml", "shared/testing/pyproject.toml", "bpf"):
        assert needed in kept or any(k.startswith(needed + "/") for k in kept), needed
    assert not [k for k in kept if k.startswith("shared/testing/src/")]
