"""Provenance columns: which code, which weights and which environment produced a result row."""

from __future__ import annotations

import functools
import hashlib
import json
import platform
import re
import subprocess
from pathlib import Path
from typing import Any

PACKAGE_DIR = Path(__file__).resolve().parent

ENVIRONMENT_LIBRARIES = {
    "torch": ("torch",),
    "diffusers": ("diffusers",),
    "transformers": ("transformers",),
    "open_clip_torch": ("open_clip_torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "nudenet": ("nudenet",),
    "lpips": ("lpips",),
    "clean-fid": ("clean-fid",),
    "numpy": ("numpy",),
}
"""Libraries whose version can move a number: ``{column: distribution names, first installed wins}``."""


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the duobench checkout this code runs from (``+dirty`` with local changes), or "".

    "" unless the package is a duobench source checkout's own ``duobench/`` folder (an editable install or a
    run from the clone): a regular install lives in site-packages, and a git repository around that (a venv
    inside the user's own project) is not the code that ran.
    """
    return checkout_commit(PACKAGE_DIR)


def checkout_commit(package_dir: Path) -> str:
    """The commit of the git work tree whose ``duobench/`` folder is ``package_dir`` and whose root holds
    duobench's pyproject.toml, ``+dirty`` with changes to tracked files; "" for any other location."""
    root = _git(package_dir, "rev-parse", "--show-toplevel")
    if not root or Path(root).resolve() / "duobench" != Path(package_dir).resolve():
        return ""
    if project_name(Path(root) / "pyproject.toml") != "duobench":
        return ""
    commit = _git(package_dir, "rev-parse", "HEAD")
    dirty = _git(package_dir, "status", "--porcelain", "--untracked-files=no")
    if not commit or dirty is None:
        return ""
    return commit + ("+dirty" if dirty else "")


def _git(directory: Path, *args: str) -> str | None:
    """git's stripped output, or None when git is missing or fails (not a work tree, no commit yet)."""
    try:
        result = subprocess.run(["git", "-C", str(directory), *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return result.stdout.strip()


def project_name(pyproject: Path) -> str:
    """``[project] name`` of a pyproject.toml, or "" when there is none."""
    try:
        text = pyproject.read_text()
    except OSError:
        return ""
    try:
        import tomllib
    except ImportError:  # Python 3.10: the one line we need
        section = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S)
        name = re.search(r"^name\s*=\s*[\"']([^\"']+)[\"']", section.group(1), re.M) if section else None
        return name.group(1) if name else ""
    try:
        return str(tomllib.loads(text).get("project", {}).get("name", ""))
    except tomllib.TOMLDecodeError:
        return ""


def library_version(*distributions: str) -> str:
    """The installed version of the first of ``distributions`` that is installed, or "" for none."""
    from importlib.metadata import PackageNotFoundError, version

    for distribution in distributions:
        try:
            return version(distribution)
        except PackageNotFoundError:
            continue
    return ""


def environment(device: Any = None) -> dict[str, str]:
    """The environment a result was computed in: the versions of the libraries that can move a number ("" when
    not installed), the Python version, and the device with its name (the GPU's name on CUDA, the processor's
    otherwise). ``device`` is the torch device (or its name) the result was computed on; None means CPU."""
    import torch

    device = torch.device(device if device is not None else "cpu")
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = cpu_name() if device.type == "cpu" else device.type
    versions = {column: library_version(*names) for column, names in ENVIRONMENT_LIBRARIES.items()}
    return {
        "python": platform.python_version(),
        **versions,
        "cuda": (torch.version.cuda or "") if device.type == "cuda" else "",
        "tf32": str(torch.backends.cuda.matmul.allow_tf32) if device.type == "cuda" else "",
        "device": str(device),
        "device_name": device_name,
    }


def cpu_name() -> str:
    """The processor's model name (``/proc/cpuinfo`` on Linux, where ``platform.processor()`` is terse)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.partition(":")[2].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def artifact_sha256(artifact: Path) -> str:
    """One sha256 over the content of every weights file of an artifact folder, sorted by name.

    A file's content is its safetensors header read as JSON and written with sorted keys, then its tensor
    bytes: safetensors writes the header's metadata in a random order, so two bit-identical trainings
    (DUO's LoRA, with two metadata entries) gave different file bytes half of the time.
    """
    digest = hashlib.sha256()
    for path in sorted(Path(artifact).rglob("*.safetensors")):
        digest.update(path.relative_to(artifact).as_posix().encode())
        digest.update(canonical_safetensors(path.read_bytes()))
    return digest.hexdigest()


def canonical_safetensors(data: bytes) -> bytes:
    """The header (sorted keys) followed by the tensor bytes: equal for equal tensors and metadata."""
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    return json.dumps(header, sort_keys=True).encode() + data[8 + length :]
