"""A work item: everything that decides one generated image, and the content hash that names it."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

SCHEDULERS = ("pndm", "ddim", "lms", "euler", "dpm++", "flow-euler")
"""The SD1 samplers (`duobench.generator.SCHEDULER_CLASSES`), and ``flow-euler``: SD3's flow-matching Euler,
the one sampler `duobench.sd3.SD3Generator` takes (a name for SD3's items; no SD1 item carries it)."""


@dataclass(frozen=True)
class SamplerSettings:
    """How to sample when a prompt set does not say: a concept's or the CLI's defaults."""

    steps: int = 50
    guidance: float = 7.5
    height: int = 512
    width: int = 512
    scheduler: str = "pndm"
    negative_prompt: str = ""

    def item(
        self,
        prompt: str,
        seed: int,
        guidance: float | None = None,
        height: int | None = None,
        width: int | None = None,
        **fields: Any,
    ) -> WorkItem:
        """A work item sampled with these settings; a prompt row's own guidance and size win over them."""
        return WorkItem(
            prompt=prompt,
            seed=seed,
            negative_prompt=self.negative_prompt,
            guidance=guidance if guidance is not None else self.guidance,
            steps=self.steps,
            height=height or self.height,
            width=width or self.width,
            scheduler=self.scheduler,
            **fields,
        )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> SamplerSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampler settings {unknown}; allowed: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class WorkItem:
    """One image to generate.

    The prompt is given as text, as exact token ids (Ring-A-Bell, UnlearnDiffAtk: the optimised ids are
    evaluated as they are, not decoded and re-tokenised), or as a saved prompt embedding (Concept
    Inversion). Precedence: ``embedding`` > ``token_ids`` > ``prompt``. ``meta`` carries bookkeeping
    (prompt-set row, case number, attack name) and is not part of the image's identity.
    """

    prompt: str
    seed: int
    negative_prompt: str = ""
    guidance: float = 7.5
    steps: int = 50
    height: int = 512
    width: int = 512
    scheduler: str = "pndm"
    token_ids: tuple[int, ...] | None = None
    embedding: str | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {self.scheduler!r}; choose one of {', '.join(SCHEDULERS)}")
        if self.token_ids is not None and not isinstance(self.token_ids, tuple):
            object.__setattr__(self, "token_ids", tuple(int(t) for t in self.token_ids))

    def identity(self) -> dict[str, Any]:
        """The fields that decide the image (everything but ``meta``), JSON-ready."""
        identity = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "meta"}
        identity["guidance"] = float(self.guidance)
        if self.token_ids is not None:
            identity["token_ids"] = list(self.token_ids)
        if self.embedding is not None:
            # The embedding's bytes decide the image, not where the file happens to live.
            identity["embedding"] = hashlib.sha256(Path(self.embedding).read_bytes()).hexdigest()
        return identity

    def key(self, model_fingerprint: str) -> str:
        """Content address of the image: model weights, item fields and the numerics-relevant versions."""
        payload = {"model": model_fingerprint, "item": self.identity(), "versions": numerics_versions()}
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:32]

    def batch_signature(self) -> tuple:
        """Items with equal signatures can share one sampler call."""
        return (float(self.guidance), self.steps, self.height, self.width, self.scheduler)

    def to_row(self) -> dict[str, Any]:
        row = asdict(self)
        row["token_ids"] = list(self.token_ids) if self.token_ids is not None else None
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> WorkItem:
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in row.items() if k in known}
        if values.get("token_ids") is not None:
            values["token_ids"] = tuple(values["token_ids"])
        return cls(**values)


@functools.lru_cache(maxsize=1)
def numerics_versions() -> dict[str, str]:
    """Library versions whose changes can move pixels (major.minor: patch releases keep numerics)."""
    import diffusers
    import torch

    def major_minor(version: str) -> str:
        return ".".join(version.split("+")[0].split(".")[:2])

    return {"torch": major_minor(torch.__version__), "diffusers": major_minor(diffusers.__version__)}
