"""The content-addressed image store and the run manifest: what makes every run resumable.

- `ImageStore`: ``<root>/<key[:2]>/<key>.png``. A PNG is written to a temporary name in the same folder and
  renamed into place, so a file under its final name is always complete: its existence is the proof that
  the image is finished. The store is shared across runs, so the base model's images are generated once
  and reused by every method and attack. A sampler that records how it made an image (PNO's budget spent,
  trials, why it stopped) puts that JSON in ``image.info[SAMPLING_INFO]``; it is kept as a PNG text chunk,
  so a cached image brings it back, and DSR's audit rows carry it (``sampling``).
- `RunManifest`: ``manifest.jsonl`` in a run's output folder, one JSON line per finished item, written only
  after the image exists. A ``kill -9`` can leave at most a truncated last line; reading drops it (and any
  row whose image is missing) and the next writer rewrites the file cleanly before appending. Under several
  processes each rank appends to its own shard (``manifest.rank<R>.jsonl``) and rank 0 merges the shards.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from PIL import Image

from duobench.errors import DuobenchError

MANIFEST_NAME = "manifest.jsonl"
SAMPLING_INFO = "duobench.sampling"
"""The PNG text key of a sampler's per-image record (JSON), read back into ``image.info`` when loaded."""
_UMASK = os.umask(0)
os.umask(_UMASK)


def _disk_full_error(path: Path, error: OSError) -> DuobenchError:
    return DuobenchError(
        f"The disk holding {path} is full ({error.strerror}). Every finished image is kept; free some space "
        "(or point --cache-dir/--out elsewhere) and re-run the same command to resume."
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete, never truncated."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; results are meant to be shared
        os.replace(temporary, path)
    except OSError as error:
        Path(temporary).unlink(missing_ok=True)
        if error.errno == errno.ENOSPC:
            raise _disk_full_error(path, error) from error
        raise
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


class ImageStore:
    """Finished images by content key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.png"

    def has(self, key: str) -> bool:
        return self.path(key).exists()

    def put(self, key: str, image: Image.Image) -> Path:
        import io

        from PIL.PngImagePlugin import PngInfo

        buffer = io.BytesIO()
        text = PngInfo()
        if SAMPLING_INFO in image.info:
            text.add_text(SAMPLING_INFO, str(image.info[SAMPLING_INFO]))
        image.save(buffer, format="PNG", pnginfo=text)
        path = self.path(key)
        atomic_write_bytes(path, buffer.getvalue())
        return path

    def get(self, key: str) -> Image.Image:
        with Image.open(self.path(key)) as image:
            return image.convert("RGB")


class RunManifest:
    """Append-only record of a run's finished items, safe against ``kill -9`` and several processes."""

    def __init__(self, folder: Path, rank: int = 0, world_size: int = 1) -> None:
        self.folder = Path(folder)
        self.rank = rank
        self.world_size = world_size
        self.folder.mkdir(parents=True, exist_ok=True)
        self._own = self.folder / (MANIFEST_NAME if world_size == 1 else f"manifest.rank{rank}.jsonl")
        self._repair(self._own)

    def shard_files(self) -> list[Path]:
        return sorted(self.folder.glob("manifest.rank*.jsonl"))

    def rows(self) -> dict[str, dict[str, Any]]:
        """Every trusted row, by key: complete JSON lines whose image exists; first occurrence wins."""
        rows: dict[str, dict[str, Any]] = {}
        for path in [self.folder / MANIFEST_NAME, *self.shard_files()]:
            for row in _read_complete_rows(path):
                if row["key"] not in rows and Path(row.get("path", "")).is_file():
                    rows[row["key"]] = row
        return rows

    def append(self, rows: Iterable[dict[str, Any]]) -> None:
        lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in rows)
        if not lines:
            return
        try:
            with open(self._own, "a", encoding="utf-8") as file:
                file.write(lines)
                file.flush()
                os.fsync(file.fileno())
        except OSError as error:
            if error.errno == errno.ENOSPC:
                raise _disk_full_error(self._own, error) from error
            raise

    def merge_shards(self) -> None:
        """Fold every rank's shard into ``manifest.jsonl`` (rank 0, after a barrier)."""
        merged = self.rows()
        payload = "".join(json.dumps(row, sort_keys=True) + "\n" for row in merged.values())
        atomic_write_bytes(self.folder / MANIFEST_NAME, payload.encode())
        for shard in self.shard_files():
            shard.unlink(missing_ok=True)

    @staticmethod
    def _repair(path: Path) -> None:
        """Cut a truncated last line left by a killed writer, so appends start on a clean line."""
        if not path.exists():
            return
        data = path.read_bytes()
        if data and not data.endswith(b"\n"):
            keep = data[: data.rfind(b"\n") + 1]
            atomic_write_bytes(path, keep)


def _read_complete_rows(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines(keepends=True):
        if not line.endswith("\n"):
            break  # a writer died mid-line: this row was never committed
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and "key" in row:
            rows.append(row)
    return rows
