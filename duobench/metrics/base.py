"""The judge and metric interfaces, and the metric card every result row carries.

A *judge* looks at one image at a time and says safe or unsafe, with evidence (boxes, class scores) that
goes into the per-image audit rows. A *metric* streams over batches (`update`) and reduces (`compute`);
its state is a dict of tensors/numbers that merges across processes, so one GPU or many give one number.
"""

from __future__ import annotations

import copy
import hashlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np
from PIL import Image

from duobench.errors import DuobenchError


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


def judge_label(card: MetricCard) -> str:
    """How a summary and a CSV row name the judge: its card id, and for a judge that asks a model chosen at
    run time (a VLM: ``params["model"]``, from a preset or the environment) also ``"<model> via
    <endpoint>"``, so two rows judged by two models say so. Other judges' ids pin their weights already."""
    return f"{card.id} ({card.weights})" if card.params.get("model") and card.weights else card.id


def card_identity(card: MetricCard) -> dict[str, Any]:
    """What decides a card's numbers, for cache keys: its id (name@version), parameters and the sha256 of
    the weights it loaded. Never the weights' path: moving a venv or an HF cache must not recompute."""
    return {"id": card.id, "params": card.params, "weights_sha256": card.weights_sha256}


@dataclass
class Verdict:
    """A judge's decision on one image. ``evidence`` must be JSON-serialisable."""

    unsafe: bool
    score: float
    evidence: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Judge(Protocol):
    """Per-image safe/unsafe decisions. Images are RGB `PIL.Image`s as the generator saved them.

    A judge that also reads the prompt each image was generated from sets ``wants_prompts = True`` (a class
    attribute or property) and accepts ``judge(images, prompts=...)``; call judges through `judge_images`,
    which passes the prompts only to those that want them.
    """

    card: MetricCard

    def judge(self, images: list[Image.Image]) -> list[Verdict]: ...


def judge_images(judge: Judge, images: list[Image.Image], prompts: Sequence[str] | None = None) -> list[Verdict]:
    """``judge.judge(images)``, or ``judge.judge(images, prompts=prompts)`` when the judge sets
    ``wants_prompts``: judges that read only pixels keep their one-argument ``judge``."""
    if getattr(judge, "wants_prompts", False):
        return judge.judge(images, prompts=prompts)
    return judge.judge(images)


def sha256_file(path: str | Path, chunk_size: int = 1 << 20) -> str:
    """The sha256 of a weights file, for metric cards and provenance columns."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------------------
# Presets: a registered metric is a card (cheap, no weights) plus the class that builds it.


@dataclass(frozen=True)
class MetricPreset:
    """What the `METRICS` registry holds: a pinned card and the class that builds the judge or metric.

    ``preset.card`` costs nothing (no weights are touched), so ``duobench ls metrics`` can print it;
    ``preset(**kwargs)`` builds the object, whose own ``card`` then also carries the sha256 of the weights
    it actually loaded. ``kind`` is ``"judge"`` (has ``judge(images) -> list[Verdict]``) or ``"metric"``
    (a `StreamingMetric`).
    """

    card: MetricCard
    factory: Callable[..., Any]
    kind: str

    def __call__(self, **kwargs: Any) -> Any:
        return self.factory(card=self.card, **kwargs)


def with_weights(card: MetricCard, weights: str, weights_sha256: str) -> MetricCard:
    """The preset's card, completed with the weights a built instance actually loaded."""
    return replace(card, weights=weights, weights_sha256=weights_sha256)


# ---------------------------------------------------------------------------------------------------------
# Streaming metrics with mergeable states.

REDUCTIONS = ("sum", "cat", "sum_by_key")
"""How a state entry combines across batches and processes:

- ``sum``: numbers or numpy arrays, added (counts, feature sums, outer-product sums);
- ``cat``: lists, concatenated (audit rows, raw features);
- ``sum_by_key``: dicts of equal-length number lists, added key by key (per-prompt counts).
"""


def merge_states(states: Sequence[Mapping[str, Any]], reductions: Mapping[str, str]) -> dict[str, Any]:
    """Combine the states of several shards into one, as if one process had seen every batch."""
    if not states:
        raise ValueError("merge_states needs at least one state")
    merged: dict[str, Any] = {}
    for name, reduction in reductions.items():
        values = [state[name] for state in states]
        if reduction == "sum":
            total = copy.deepcopy(values[0])
            for value in values[1:]:
                total = total + value
            merged[name] = total
        elif reduction == "cat":
            merged[name] = [entry for value in values for entry in value]
        elif reduction == "sum_by_key":
            table: dict[Any, list] = {}
            for value in values:
                for key, counts in value.items():
                    if key in table:
                        table[key] = [a + b for a, b in zip(table[key], counts, strict=True)]
                    else:
                        table[key] = list(counts)
            merged[name] = table
        else:
            raise ValueError(f"unknown reduction {reduction!r}; known: {', '.join(REDUCTIONS)}")
    return merged


class StreamingMetric(ABC):
    """A metric that sees images batch by batch, as they come off the generator or out of the cache.

    Subclasses declare ``reductions`` (state name → how it merges) and implement `empty_state`, `update`
    and `compute`. The state is plain Python/numpy, so it pickles, merges across processes
    (`sync_state`) and can be saved beside the images to recompute a number without regenerating.
    """

    card: MetricCard
    reductions: ClassVar[Mapping[str, str]]

    def __init__(self) -> None:
        self._state = self.empty_state()

    @abstractmethod
    def empty_state(self) -> dict[str, Any]: ...

    @abstractmethod
    def update(self, images: Sequence[Image.Image], items: Sequence[Any] | None = None) -> None:
        """Consume one batch. ``items`` are the engine's `WorkItem`s (or any per-image metadata)."""

    @abstractmethod
    def compute(self) -> dict[str, Any]:
        """The metric's numbers; every result carries ``"metric": card.id``."""

    def reset(self) -> None:
        self._state = self.empty_state()

    def state(self) -> dict[str, Any]:
        """A copy of the current state, safe to pickle, send or merge."""
        return copy.deepcopy(self._state)

    def load_state(self, state: Mapping[str, Any]) -> None:
        self._state = copy.deepcopy(dict(state))

    def merge(self, state: Mapping[str, Any]) -> None:
        """Fold another shard's state into this one."""
        self._state = merge_states([self._state, state], self.reductions)

    def audit_rows(self) -> list[dict[str, Any]]:
        """Per-image rows (judge evidence, per-pair distances); empty for set-level metrics like FID."""
        return list(self._state.get("rows", []))

    def update_from_paths(
        self, paths: Sequence[str | Path], items: Sequence[Any] | None = None, batch_size: int = 32
    ) -> None:
        """Run on cached PNGs instead of fresh images: a metric can be recomputed without regenerating."""
        if items is not None and len(items) != len(paths):
            raise DuobenchError(f"Got {len(paths)} image paths but {len(items)} items; they must pair up.")
        for start in range(0, len(paths), batch_size):
            batch_items = None if items is None else list(items[start : start + batch_size])
            self.update(load_images(paths[start : start + batch_size]), batch_items)


def load_images(paths: Sequence[str | Path]) -> list[Image.Image]:
    """Read image files as fully loaded RGB images (file handles closed)."""
    images = []
    for path in paths:
        if not Path(path).is_file():
            raise DuobenchError(f"Image file {path} does not exist.")
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images


def sync_state(metric: StreamingMetric) -> None:
    """Replace ``metric``'s state by the merge of every rank's state, on every rank.

    ``sum`` entries are all-reduced as float64/int64 tensors (on the rank's GPU under NCCL, on the CPU
    under gloo); ``cat`` and ``sum_by_key`` entries are gathered as Python objects and merged in rank
    order. Without an initialised process group this does nothing, so single-process code needs no branch.
    """
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    state = metric.state()
    merged: dict[str, Any] = {}
    gathered_names = []
    for name, reduction in metric.reductions.items():
        value = state[name]
        if reduction != "sum":
            gathered_names.append(name)
            continue
        array = np.asarray(value)
        dtype = torch.float64 if np.issubdtype(array.dtype, np.floating) else torch.int64
        tensor = torch.as_tensor(array, dtype=dtype).to(device)
        dist.all_reduce(tensor)
        total = tensor.cpu().numpy()
        merged[name] = total if isinstance(value, np.ndarray) else total.item()
    if gathered_names:
        shards: list[Any] = [None] * dist.get_world_size()
        dist.all_gather_object(shards, {name: state[name] for name in gathered_names})
        merged.update(merge_states(shards, {name: metric.reductions[name] for name in gathered_names}))
    metric.load_state(merged)


# ---------------------------------------------------------------------------------------------------------
# Per-image metadata and audit rows.


def item_prompt(item: Any) -> str:
    """The prompt text of a `WorkItem`, a dict with ``"prompt"``, or a plain string."""
    if isinstance(item, str):
        return item
    if isinstance(item, Mapping):
        return str(item.get("prompt", ""))
    return str(getattr(item, "prompt", ""))


def item_meta(item: Any) -> Mapping[str, Any]:
    if isinstance(item, Mapping):
        return item
    return getattr(item, "meta", None) or {}


def prompt_key(item: Any) -> str:
    """Which prompt an image belongs to, for grouping (the DSR interval's clusters, pre/post-attack pairing).

    ``meta["prompt_id"]`` wins (an attack's optimised prompt and its source prompt share it); otherwise
    the prompt text, or, for items given as token ids or an embedding with no text, a hash of those.
    """
    meta = item_meta(item)
    if "prompt_id" in meta:
        return str(meta["prompt_id"])
    text = item_prompt(item)
    if text:
        return text
    token_ids = getattr(item, "token_ids", None)
    if token_ids is not None:
        return "tokens:" + hashlib.sha256(json.dumps(list(token_ids)).encode()).hexdigest()[:16]
    embedding = getattr(item, "embedding", None)
    if embedding is not None:
        return f"embedding:{embedding}"
    return ""


def item_columns(item: Any) -> dict[str, Any]:
    """The columns that tie an audit row to its image: prompt, seed and prompt id."""
    if item is None:
        return {}
    columns: dict[str, Any] = {"prompt": item_prompt(item), "prompt_id": prompt_key(item)}
    seed = item.get("seed") if isinstance(item, Mapping) else getattr(item, "seed", None)
    if seed is not None:
        columns["seed"] = seed
    return columns


def audit_row(card: MetricCard, verdict: Verdict, item: Any = None) -> dict[str, Any]:
    """One judged image as a JSON-ready row: metric id, verdict, score, evidence, and the item's columns."""
    return {
        "metric": card.id,
        **item_columns(item),
        "unsafe": bool(verdict.unsafe),
        "score": float(verdict.score),
        **verdict.evidence,
    }
