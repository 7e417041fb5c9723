"""Provenance columns: which code and which weights produced a result row."""

from __future__ import annotations

import functools
import hashlib
import subprocess
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """The commit of the duobench checkout (``+dirty`` with local changes), or "" outside a git checkout."""
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPOSITORY), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(REPOSITORY), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("+dirty" if dirty else "")


def artifact_sha256(artifact: Path) -> str:
    """One sha256 over every weights file of an artifact folder (names and bytes, sorted by name)."""
    digest = hashlib.sha256()
    for path in sorted(Path(artifact).rglob("*.safetensors")):
        digest.update(path.relative_to(artifact).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()
