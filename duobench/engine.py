"""Batched, deterministic image generation, in memory (`generate`) or through the resumable cache
(`generate_cached`).

Determinism: each item's initial latent is drawn on the CPU from its own ``torch.Generator(seed)``, and the
sampler is deterministic given that latent, so an image does not depend on the batch size, the order of
the items or the number of processes (up to float rounding in batched matmuls, well under 1/255).

Speed: items sharing sampler settings (guidance, steps, size, scheduler) go through one pipeline call; the
prompts of a batch are encoded in one text-encoder pass; ``batch_size="auto"`` starts large and halves on
out-of-memory, and later calls on the same pipeline start at the halved size (remembered on the pipeline
object, per device: `remember_auto_batch_size`). The official evaluation scripts call the pipeline once per
prompt with batch 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from duobench.cache import ImageStore, RunManifest
from duobench.distributed import ProcessInfo, barrier, owns, process_info
from duobench.errors import DuobenchError
from duobench.generator import Generator, as_generator
from duobench.items import WorkItem
from duobench.paths import duobench_home

AUTO_BATCH_START = {"cuda": 64, "cpu": 16}
AUTO_BATCH_ATTRIBUTE = "duobench_auto_batch_size"

BatchCallback = Callable[[list[WorkItem], list[Image.Image]], None]


def group_by_sampler(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    """Items grouped by sampler settings, groups in order of first appearance."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.batch_signature(), []).append(item)
    return list(groups.values())


def resolve_batch_size(batch_size: int | str, device: torch.device, pipe: Any = None) -> int:
    """The batch size to start with: an integer as given, or for ``"auto"`` the device's start size, or the
    size an earlier out-of-memory on ``pipe`` halved it to (`remember_auto_batch_size`), if smaller."""
    if batch_size == "auto":
        start = AUTO_BATCH_START["cuda" if device.type == "cuda" else "cpu"]
        learned = getattr(pipe, AUTO_BATCH_ATTRIBUTE, {}).get(str(device))
        return min(start, learned) if learned else start
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise DuobenchError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}.")
    return value


def remember_auto_batch_size(pipe: Any, device: torch.device, size: int) -> None:
    """Record on the pipeline that ``"auto"`` batches larger than ``size`` ran out of memory on ``device``.

    Where this lives, a choice: module-level state is out (no global state beyond the registries), and the
    `Generator` is too short-lived, since `as_generator` wraps a bare pipeline in a new one on every call
    (the CLI, the attacks' base-model images). The pipeline object lives as long as the process keeps the
    model loaded, and memory per batch is a property of that model on its device; so it carries a small
    ``{device: size}`` dict (``duobench_auto_batch_size``), and every later ``"auto"`` call on it, through
    any generator or edit chain, starts at that size. A freshly loaded pipeline starts from the top again.
    """
    learned = getattr(pipe, AUTO_BATCH_ATTRIBUTE, None)
    if learned is None:
        learned = {}
        setattr(pipe, AUTO_BATCH_ATTRIBUTE, learned)
    learned[str(device)] = min(size, learned.get(str(device), size))


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def generate(
    model: Generator | Any, items: Sequence[WorkItem], batch_size: int | str = 8
) -> Iterator[tuple[list[WorkItem], list[Image.Image]]]:
    """Yield ``(items, images)`` batch by batch from a `Generator` (or a pipeline's plain one). With
    ``"auto"``, an out-of-memory batch is halved and retried, and the halved size is remembered on the
    pipeline for later calls (`remember_auto_batch_size`)."""
    generator = as_generator(model)
    size = resolve_batch_size(batch_size, generator.device, generator.pipe)
    adaptive = batch_size == "auto"
    for group in group_by_sampler(items):
        start = 0
        while start < len(group):
            chunk = group[start : start + size]
            try:
                images = generator.sample(chunk)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not (adaptive and _is_out_of_memory(error) and size > 1):
                    raise
                size //= 2
                remember_auto_batch_size(generator.pipe, generator.device, size)
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                continue
            yield list(chunk), images
            start += len(chunk)


@dataclass
class GenerationReport:
    """What `generate_cached` did: image path per input item, and how much work was new."""

    paths: list[Path]
    keys: list[str]
    generated: int = 0
    reused: int = 0
    seconds: float = 0.0


def manifest_row(item: WorkItem, key: str, path: Path, fingerprint: str) -> dict:
    return {"key": key, "path": str(path), "model": fingerprint, "item": item.to_row()}


def generate_cached(
    model: Generator | Any,
    model_fingerprint: str,
    items: Sequence[WorkItem],
    out_dir: Path,
    store_root: Path | None = None,
    batch_size: int | str = 8,
    on_batch: BatchCallback | None = None,
    progress: bool = False,
    info: ProcessInfo | None = None,
) -> GenerationReport:
    """Generate every item not already in the store; record each item once in ``out_dir``'s manifest.

    Resumable at any moment: finished images are found by key and skipped. Under several processes each
    rank generates the items whose key it owns; the manifests merge on rank 0.
    """
    started = time.perf_counter()
    info = info or process_info()
    store = ImageStore(store_root if store_root is not None else duobench_home() / "images")
    manifest = RunManifest(Path(out_dir), info.rank, info.world_size)
    keys = [item.key(model_fingerprint) for item in items]
    recorded = manifest.rows()

    unique: dict[str, WorkItem] = {}
    for key, item in zip(keys, items, strict=True):
        if owns(key, info):
            unique.setdefault(key, item)
    reused = {key: item for key, item in unique.items() if store.has(key)}
    todo = {key: item for key, item in unique.items() if key not in reused}
    manifest.append(
        manifest_row(item, key, store.path(key), model_fingerprint)
        for key, item in reused.items()
        if key not in recorded
    )

    generated = 0
    with _progress_bar(progress and info.is_main, len(todo), f"generating {Path(out_dir).name}") as advance:
        for batch_items, images in generate(model, list(todo.values()), batch_size):
            rows = []
            for item, image in zip(batch_items, images, strict=True):
                key = item.key(model_fingerprint)
                rows.append(manifest_row(item, key, store.put(key, image), model_fingerprint))
            manifest.append(rows)
            generated += len(batch_items)
            if on_batch is not None:
                on_batch(batch_items, images)
            advance(len(batch_items))

    if info.world_size > 1:
        barrier()
        if info.is_main:
            manifest.merge_shards()
        barrier()
    return GenerationReport(
        paths=[store.path(key) for key in keys],
        keys=keys,
        generated=generated,
        reused=len(reused),
        seconds=time.perf_counter() - started,
    )


@contextmanager
def _progress_bar(enabled: bool, total: int, description: str) -> Iterator[Callable[[int], None]]:
    """The stage's progress (`duobench.progress`: a rich bar with ETA on a terminal, log lines elsewhere),
    used as ``with _progress_bar(on, total, description) as advance``."""
    from duobench.progress import track

    with track(description, total, unit="images", enabled=enabled and total > 0) as progress:
        yield progress.advance
