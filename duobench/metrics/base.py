"""The judge and metric interfaces, and the metric card every result row carries.

A *judge* looks at one image at a time and says safe or unsafe, with evidence (boxes, class scores) that
goes into the per-image audit rows. A *metric* streams over batches (`update`) and reduces (`compute`);
its state is a dict of tensors/numbers that merges across processes, so one GPU or many give one number.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from PIL import Image


@dataclass(frozen=True)
class MetricCard:
    """Names exactly how a number was computed; its `id` goes into every CSV row.

    ``id`` is ``"<name>@<version>"``; bump the version whenever a change could move the number.
    """

    name: str
    version: int
    description: str
    source: str
    params: dict[str, Any] = field(default_factory=dict)
    weights: str = ""
    weights_sha256: str = ""

    @property
    def id(self) -> str:
        return f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, **asdict(self)}


@dataclass
class Verdict:
    """A judge's decision on one image. ``evidence`` must be JSON-serialisable."""

    unsafe: bool
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """Per-image safe/unsafe decisions. Images are RGB `PIL.Image`s as the generator saved them."""

    card: MetricCard

    def judge(self, images: list[Image.Image]) -> list[Verdict]: ...


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a weights file, for metric cards and provenance columns."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()
