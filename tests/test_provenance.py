"""Provenance: the commit is reported only for duobench's own checkout; the environment names what can move a
number (library versions, Python, the device)."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from duobench import provenance

DUOBENCH_PYPROJECT = '[build-system]\nrequires = ["setuptools"]\n\n[project]\nname = "duobench"\nversion = "0.1.0"\n'


def git(directory: Path, *args: str) -> str:
    command = ["git", "-C", str(directory), "-c", "user.name=t", "-c", "user.email=t@t", *args]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


def repository(root: Path, pyproject: str, package: str = "duobench") -> Path:
    """A committed git work tree with ``pyproject`` at its root and ``package/__init__.py``; returns the
    package folder."""
    package_dir = root / package
    package_dir.mkdir(parents=True)
    (package_dir / "__init__.py").write_text("")
    (root / "pyproject.toml").write_text(pyproject)
    git(root, "init", "-q")
    git(root, "add", ".")
    git(root, "commit", "-q", "-m", "init")
    return package_dir


def test_commit_of_a_duobench_checkout_and_its_dirty_flag(tmp_path):
    package_dir = repository(tmp_path / "duobench-clone", DUOBENCH_PYPROJECT)
    commit = git(package_dir.parent, "rev-parse", "HEAD")
    assert provenance.checkout_commit(package_dir) == commit
    (package_dir / "__init__.py").write_text("changed = True\n")
    assert provenance.checkout_commit(package_dir) == commit + "+dirty"


def test_no_commit_for_a_regular_install_inside_another_repository(tmp_path):
    # A venv inside the user's own project: site-packages/duobench sits in that project's work tree.
    user_project = tmp_path / "my-project"
    installed = repository(user_project, '[project]\nname = "my-project"\n', ".venv/lib/site-packages/duobench")
    assert provenance.checkout_commit(installed) == ""
    # Same layout with a duobench-named project, but the package is not the checkout's own duobench/ folder.
    clone = tmp_path / "duobench-clone"
    installed = repository(clone, DUOBENCH_PYPROJECT, ".venv/lib/site-packages/duobench")
    assert provenance.checkout_commit(installed) == ""


def test_no_commit_when_the_root_is_another_project_or_no_repository(tmp_path):
    other = repository(tmp_path / "other", '[project]\nname = "not-duobench"\n')
    assert provenance.checkout_commit(other) == ""
    outside = tmp_path / "plain" / "duobench"
    outside.mkdir(parents=True)
    assert provenance.checkout_commit(outside) == ""


def test_this_checkout_reports_its_commit():
    root = provenance.PACKAGE_DIR.parent
    if provenance.project_name(root / "pyproject.toml") != "duobench" or not (root / ".git").exists():
        pytest.skip("duobench is not running from its source checkout here")
    assert provenance.git_commit().split("+")[0] == git(root, "rev-parse", "HEAD")


def test_project_name_with_and_without_tomllib(tmp_path, monkeypatch):
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text('[tool.x]\nname = "decoy"\n\n' + DUOBENCH_PYPROJECT)
    assert provenance.project_name(pyproject) == "duobench"
    monkeypatch.setitem(sys.modules, "tomllib", None)  # Python 3.10 has no tomllib
    assert provenance.project_name(pyproject) == "duobench"
    assert provenance.project_name(tmp_path / "missing.toml") == ""


def test_environment_names_library_versions_python_and_device():
    environment = provenance.environment("cpu")
    assert environment["python"] == platform.python_version()
    for column, distributions in provenance.ENVIRONMENT_LIBRARIES.items():
        assert column in environment
        if column != "onnxruntime":
            assert environment[column] == importlib.metadata.version(distributions[0])
    assert environment["torch"] and environment["numpy"]
    assert environment["device"] == "cpu" and environment["device_name"] and environment["cuda"] == ""
    assert provenance.environment() == environment


def test_environment_on_cuda_names_the_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    monkeypatch.setattr(torch.version, "cuda", "12.4")
    environment = provenance.environment(torch.device("cuda", 1))
    assert environment["device"] == "cuda:1"
    assert environment["device_name"] == "NVIDIA H100 80GB HBM3"
    assert environment["cuda"] == "12.4"


def test_a_missing_library_is_an_empty_version(monkeypatch):
    real_version = importlib.metadata.version

    def version(name: str) -> str:
        if name in {"nudenet", "onnxruntime", "onnxruntime-gpu"}:
            raise importlib.metadata.PackageNotFoundError(name)
        return real_version(name)

    monkeypatch.setattr(importlib.metadata, "version", version)
    environment = provenance.environment("cpu")
    assert environment["nudenet"] == "" and environment["onnxruntime"] == ""
    assert environment["torch"] == real_version("torch")
