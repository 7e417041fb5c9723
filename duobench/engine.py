"""Batched, deterministic image generation, in memory (`generate`) or through the resumable cache
(`generate_cached`).

Determinism: each item's initial latent is drawn on the CPU from its own ``torch.Generator(seed)``, and the
sampler is deterministic given that latent, so an image does not depend on the batch size, the order of
the items or the number of processes (up to float rounding in batched matmuls, well under 1/255).

Speed: items sharing sampler settings (guidance, steps, size, scheduler) go through one pipeline call; the
prompts of a batch are encoded in one text-encoder pass; ``batch_size="auto"`` starts large and halves on
out-of-memory. The official evaluation scripts call the pipeline once per prompt with batch 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from duobench.cache import ImageStore, RunManifest
from duobench.distributed import ProcessInfo, barrier, owns, process_info
from duobench.errors import DuobenchError
from duobench.items import WorkItem
from duobench.paths import duobench_home

SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
AUTO_BATCH_START = {"cuda": 64, "cpu": 16}

BatchCallback = Callable[[list[WorkItem], list[Image.Image]], None]


def use_scheduler(pipe, name: str) -> None:
    """Swap ``pipe.scheduler`` for the named sampler, keeping the model's noise schedule (its config)."""
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[name])
    if type(pipe.scheduler) is not scheduler_class:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def tokenize(pipe, texts: Sequence[str]) -> torch.Tensor:
    return tokenize_with(pipe.tokenizer, texts)


def tokenize_with(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """SD1 tokenisation: start token, prompt, end token, end-token padding to 77 ids, truncated."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_token_ids(pipe, token_ids: torch.Tensor) -> torch.Tensor:
    """SD1's prompt embedding: the text encoder's last hidden state over all 77 positions (no mask)."""
    device = pipe.text_encoder.device
    return pipe.text_encoder(token_ids.to(device))[0]


def _load_embedding(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "prompt_embeds" not in tensors:
        raise DuobenchError(f"Prompt embedding file {path} has no 'prompt_embeds' tensor.")
    embedding = tensors["prompt_embeds"]
    return embedding[0] if embedding.dim() == 3 else embedding


def encode_items(pipe, items: Sequence[WorkItem]) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt and negative-prompt embeddings for a batch, text and token-id items in one encoder pass."""
    max_length = pipe.tokenizer.model_max_length
    ids: list[torch.Tensor | None] = []
    for item in items:
        if item.token_ids is not None and len(item.token_ids) != max_length:
            raise DuobenchError(
                f"An item's token_ids has {len(item.token_ids)} ids; the text encoder takes exactly {max_length} "
                "(start token, prompt, end token, padding)."
            )
        ids.append(torch.tensor(item.token_ids) if item.token_ids is not None else None)
    text_positions = [i for i, item in enumerate(items) if item.token_ids is None and item.embedding is None]
    if text_positions:
        tokenized = tokenize(pipe, [items[i].prompt for i in text_positions])
        for row, position in enumerate(text_positions):
            ids[position] = tokenized[row]
    needs_encoder = [i for i, item in enumerate(items) if item.embedding is None]
    embeddings: list[torch.Tensor | None] = [None] * len(items)
    if needs_encoder:
        stacked = torch.stack([ids[i] for i in needs_encoder])
        encoded = encode_token_ids(pipe, stacked)
        for row, position in enumerate(needs_encoder):
            embeddings[position] = encoded[row]
    dtype = pipe.text_encoder.dtype
    device = pipe.text_encoder.device
    for i, item in enumerate(items):
        if item.embedding is not None:
            embeddings[i] = _load_embedding(item.embedding).to(device=device, dtype=dtype)
    negatives = encode_token_ids(pipe, tokenize(pipe, [item.negative_prompt for item in items]))
    return torch.stack(embeddings), negatives


def initial_latents(pipe, items: Sequence[WorkItem]) -> torch.Tensor:
    """Each item's starting noise from its own CPU generator: independent of batch, order and device."""
    channels = pipe.unet.config.in_channels
    factor = pipe.vae_scale_factor
    latents = []
    for item in items:
        generator = torch.Generator("cpu").manual_seed(int(item.seed))
        shape = (1, channels, item.height // factor, item.width // factor)
        latents.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.cat(latents)


@torch.no_grad()
def sample_batch(pipe, items: Sequence[WorkItem]) -> list[Image.Image]:
    """One pipeline call for items that share sampler settings."""
    first = items[0]
    if any(item.batch_signature() != first.batch_signature() for item in items):
        raise ValueError("sample_batch needs items with identical sampler settings")
    use_scheduler(pipe, first.scheduler)
    prompt_embeds, negative_embeds = encode_items(pipe, items)
    latents = initial_latents(pipe, items).to(device=pipe.unet.device, dtype=pipe.unet.dtype)
    output = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=negative_embeds,
        latents=latents,
        guidance_scale=float(first.guidance),
        num_inference_steps=first.steps,
        height=first.height,
        width=first.width,
        output_type="pil",
    )
    return [image.convert("RGB") for image in output.images]


def group_by_sampler(items: Sequence[WorkItem]) -> list[list[WorkItem]]:
    """Items grouped by sampler settings, groups in order of first appearance."""
    groups: dict[tuple, list[WorkItem]] = {}
    for item in items:
        groups.setdefault(item.batch_signature(), []).append(item)
    return list(groups.values())


def resolve_batch_size(batch_size: int | str, device: torch.device) -> int:
    if batch_size == "auto":
        return AUTO_BATCH_START["cuda" if device.type == "cuda" else "cpu"]
    try:
        value = int(batch_size)
    except (TypeError, ValueError):
        value = 0
    if value < 1:
        raise DuobenchError(f"--batch-size must be a positive integer or 'auto', got {batch_size!r}.")
    return value


def _is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def generate(
    pipe, items: Sequence[WorkItem], batch_size: int | str = 8
) -> Iterator[tuple[list[WorkItem], list[Image.Image]]]:
    """Yield ``(items, images)`` batch by batch. With ``"auto"``, an out-of-memory batch is halved and retried."""
    size = resolve_batch_size(batch_size, pipe.unet.device)
    adaptive = batch_size == "auto"
    for group in group_by_sampler(items):
        start = 0
        while start < len(group):
            chunk = group[start : start + size]
            try:
                images = sample_batch(pipe, chunk)
            except (RuntimeError, torch.OutOfMemoryError) as error:
                if not (adaptive and _is_out_of_memory(error) and size > 1):
                    raise
                size //= 2
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
    pipe,
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
    with _progress_bar(progress and info.is_main, len(todo)) as advance:
        for batch_items, images in generate(pipe, list(todo.values()), batch_size):
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


class _progress_bar:
    """A rich progress bar with ETA (or nothing), used as ``with _progress_bar(on, total) as advance``."""

    def __init__(self, enabled: bool, total: int) -> None:
        self.enabled = enabled and total > 0
        self.total = total

    def __enter__(self) -> Callable[[int], None]:
        if not self.enabled:
            return lambda n: None
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self._progress = Progress(
            TextColumn("generating"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
        )
        self._progress.start()
        task = self._progress.add_task("generate", total=self.total)
        return lambda n: self._progress.advance(task, n)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._progress.stop()
