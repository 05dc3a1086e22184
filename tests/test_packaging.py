"""The sdist and wheel as `python -m build` makes them: complete, `twine check` clean, and
working when installed into a fresh venv (not editable, not from the checkout)."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tomllib
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest
from support import REPO

import bindscope

PACKAGE_DIR = REPO / "exporter" / "bindscope"
# What setuptools' package-data takes beside the modules (pyproject.toml).
PACKAGE_SUFFIXES = {".py", ".json", ".yml"}


def package_files() -> set[str]:
    """Every file of the package in the source tree, as `bindscope/...`; read now, so a
    new subpackage or data file is expected without editing this test."""
    return {
        p.relative_to(PACKAGE_DIR.parent).as_posix()
        for p in PACKAGE_DIR.rglob("*")
        if p.is_file()
        and "__pycache__" not in p.parts
        and (p.suffix in PACKAGE_SUFFIXES or p.name == "py.typed")
    }


def _run(*args: str | Path, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(a) for a in args], capture_output=True, text=True, timeout=timeout, cwd=cwd
    )


@dataclass(frozen=True)
class Dist:
    wheel: Path
    sdist: Path
    venv: Path


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    # The default: an sdist, then the wheel built from that sdist, so a file the sdist
    # forgets is missing from the wheel too.
    done = _run(sys.executable, "-m", "build", "--outdir", out, REPO, cwd=out, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    (sdist,) = out.glob("*.tar.gz")
    env = tmp_path_factory.mktemp("venv") / "venv"
    venv.create(env, with_pip=True)
    done = _run(env / "bin" / "pip", "install", "--no-cache-dir", wheel, cwd=out, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return Dist(wheel, sdist, env)


def test_version_comes_from_the_package_alone() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert "version" not in project["project"]
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "bindscope.__version__"}


def test_artifacts_are_named_for_the_version(dist: Dist) -> None:
    assert dist.wheel.name == f"bindscope-{bindscope.__version__}-py3-none-any.whl"
    assert dist.sdist.name == f"bindscope-{bindscope.__version__}.tar.gz"


def test_wheel_holds_every_package_file(dist: Dist) -> None:
    with zipfile.ZipFile(dist.wheel) as whl:
        names = set(whl.namelist())
    assert {n for n in names if n.startswith("bindscope/")} == package_files()
    # nothing but the package and its metadata: no tests, mixin or deploy files
    assert {n.split("/")[0] for n in names} == {
        "bindscope",
        f"bindscope-{bindscope.__version__}.dist-info",
    }


def test_sdist_holds_every_package_file(dist: Dist) -> None:
    top = f"bindscope-{bindscope.__version__}/"
    with tarfile.open(dist.sdist) as sdist:
        names = {n.removeprefix(top) for n in sdist.getnames()}
    assert {f"exporter/{f}" for f in package_files()} <= names
    assert {"pyproject.toml", "README.md", "PKG-INFO"} <= names


def test_twine_check_is_clean(dist: Dist) -> None:
    done = _run(
        sys.executable, "-m", "twine", "check", "--strict", dist.wheel, dist.sdist, cwd=REPO
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("PASSED") == 2, done.stdout


def test_installed_copy_is_the_wheel_not_the_checkout(dist: Dist) -> None:
    code = "import bindscope; print(bindscope.__file__)"
    done = _run(dist.venv / "bin" / "python", "-c", code, cwd=dist.venv)
    assert done.returncode == 0, done.stderr
    installed = Path(done.stdout.strip()).parent
    assert installed.is_relative_to(dist.venv)
    files = {
        p.relative_to(installed.parent).as_posix()
        for p in installed.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert files == package_files()


def test_installed_exporter_reports_the_version(dist: Dist) -> None:
    done = _run(dist.venv / "bin" / "bindscope-exporter", "--version", cwd=dist.venv)
    # the version, then the Python and platform it runs on
    assert done.returncode == 0
    assert done.stdout.startswith(f"bindscope-exporter {bindscope.__version__} ")


def test_installed_tool_scans(dist: Dist) -> None:
    done = _run(dist.venv / "bin" / "bindscope", "scan", "--json", cwd=dist.venv)
    # 0: all ok, 1: something is not (this host may have unexpected listeners); 2 is a bug
    assert done.returncode in (0, 1), done.stderr
    report = json.loads(done.stdout)
    assert report["listeners"], report
