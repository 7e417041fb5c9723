"""Provenance columns: which code and which weights produced a result row."""

from __future__ import annotations

import functools
import hashlib
import json
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
