"""DUO's paired data: unsafe images x⁻ from the base model, and their SDEdit-safe partners x⁺.

The recipe follows the official ``datasets/SD/generate_datasets.py`` (`naver-ai/DUO`):

1. Generate x⁻ from each unsafe prompt of the concept's ``duo_pairs``. Keep an image only when the data
   judge flags it as unsafe, and draw a new seed otherwise. The official nudity data keeps an image only
   when NudeNet detects an exposed class.
2. Edit each x⁻ with SDEdit (img2img) at the concept's ``duo_strength``: the safe prompt is the prompt and
   the unsafe prompt is the negative prompt. Keep the edit only when the judge passes it, and re-edit
   with a new seed otherwise.

The official script draws unseeded images and retries without limit. Here every image has its own
recorded seed, and the retries are capped: ``max_tries`` draws per wanted image. A prompt that cannot reach
its count raises a `DuobenchError`.

A concept whose ``data_judge`` is ``none`` keeps every image. This is the official violence recipe, which
has no filter.

Both steps sample with the model's own defaults (`default_sampler_settings`: SD1.4's PNDM, 50 steps, CFG
7.5 at 512 px) overridden by the concept's ``generation``. Those are the official settings: its script
calls the default pipelines. On SD3 the same recipe runs with SD3's generator and
``StableDiffusion3Img2ImgPipeline`` (flow-matching Euler, 28 steps, CFG 7.0 by default), as the official
``datasets/SD3/generate_datasets_sd3.py`` does (`_img2img`).

A pair set is a cached artifact under ``$DUOBENCH_HOME/duo-pairs/<key>/``. It holds ``unsafe/NNNN.png``,
``safe/NNNN.png`` and ``pairs.json``: the recipe plus every pair's prompts, seeds and judge scores. The key
hashes the whole recipe: prompts, counts, strength, sampler settings, seed, judge card id, base-model
fingerprint and numerics versions. The folder is written under a staging name and renamed when complete,
so a folder under its final name is always a finished pair set.

Image format, a difference: we store PNG, the generator's 8-bit output without loss, and SDEdit the
in-memory image, so the pairs DUO trains on are exactly the images the judge passed. The official script
saves both images as JPEG (``NN.jpg``, PIL's default quality 75), re-opens the saved unsafe JPEG as the
SDEdit input, and its training script reads both JPEGs back; its x⁻ and x⁺ therefore carry JPEG compression
artifacts that the judge never saw. PNG keeps a cached pair set bit-identical to what was generated and
judged, at the cost of larger files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from duobench.concepts import Concept, DuoPairSpec
from duobench.engine import generate
from duobench.errors import DuobenchError
from duobench.generator import use_scheduler
from duobench.items import SamplerSettings, WorkItem, numerics_versions
from duobench.locks import exclusive, owner_tag
from duobench.metrics.base import Judge, judge_images
from duobench.models import default_sampler_settings
from duobench.paths import duobench_home
from duobench.progress import StageProgress, track

logger = logging.getLogger(__name__)

PAIR_SET_VERSION = 1
NO_DATA_JUDGE = "none"
PAIRS_CARD = "pairs.json"
SEED_STRIDE = 1_000_000
"""Row r draws x⁻ seeds from seed + 2r·STRIDE + k and edit seeds from seed + (2r + 1)·STRIDE + k."""


@dataclass(frozen=True)
class PairSet:
    """A finished pair set on disk: ``card["pairs"][i]`` describes the i-th (x⁻, x⁺) pair."""

    folder: Path
    card: dict[str, Any]

    @property
    def key(self) -> str:
        return self.card["key"]

    def __len__(self) -> int:
        return len(self.card["pairs"])

    def pixels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The unsafe and safe images as ``(N, 3, H, W)`` float tensors in [-1, 1], pair-aligned."""

        def load(relative: str) -> torch.Tensor:
            array = np.asarray(Image.open(self.folder / relative).convert("RGB"), dtype=np.float32)
            return torch.from_numpy(array).permute(2, 0, 1) / 127.5 - 1.0

        pairs = self.card["pairs"]
        return torch.stack([load(p["unsafe"]) for p in pairs]), torch.stack([load(p["safe"]) for p in pairs])


def load_pair_set(folder: Path) -> PairSet:
    card_path = Path(folder) / PAIRS_CARD
    if not card_path.exists():
        raise DuobenchError(f"{folder} is not a DUO pair set: it has no {PAIRS_CARD}.")
    return PairSet(Path(folder), json.loads(card_path.read_text()))


# ------------------------------------------------------------------------------------------------ recipe


def sub_concepts(concept: Concept) -> list[str]:
    """The concept's sub-concepts in file order (violence: blood, suffering, gun, horror), or ``[""]``."""
    if not concept.duo_pairs:
        raise DuobenchError(
            f"Concept {concept.name!r} has no duo_pairs, so DUO cannot build its paired data. Add a "
            "duo_pairs list (unsafe prompt, safe prompt, count) to the concept file."
        )
    return list(dict.fromkeys(pair.sub_concept for pair in concept.duo_pairs))


def recipe_rows(concept: Concept, sub_concept: str = "", pairs: int = 0) -> list[DuoPairSpec]:
    """The ``duo_pairs`` rows of one sub-concept, rescaled to ``pairs`` in total when ``pairs > 0``.

    Rescaling keeps the rows' proportions (largest remainders), so "32 white + 32 black" becomes "4 + 4"
    for ``pairs=8``.
    """
    rows = [row for row in concept.duo_pairs if row.sub_concept == sub_concept]
    if not rows:
        raise DuobenchError(
            f"Concept {concept.name!r} has no duo_pairs for sub-concept {sub_concept!r}; "
            f"it has {sub_concepts(concept)}."
        )
    if pairs < 0 or any(row.count < 1 for row in rows):
        raise DuobenchError("DUO pair counts must be positive.")
    if pairs == 0:
        return rows
    if pairs < len(rows):
        raise DuobenchError(
            f"pairs={pairs} is fewer than the {len(rows)} prompt rows of {sub_concept or concept.name!r}."
        )
    total = sum(row.count for row in rows)
    exact = [pairs * row.count / total for row in rows]
    counts = [max(1, math.floor(x)) for x in exact]
    by_remainder = sorted(range(len(rows)), key=lambda i: exact[i] - math.floor(exact[i]), reverse=True)
    for i in by_remainder[: pairs - sum(counts)]:
        counts[i] += 1
    return [DuoPairSpec(row.unsafe, row.safe, count, row.sub_concept) for row, count in zip(rows, counts, strict=True)]


def load_judge(name: str) -> Judge | None:
    """The judge preset registered as ``name`` in `METRICS`, or None for ``none`` (keep every image)."""
    from duobench.metrics.dsr import build_judge

    return None if name == NO_DATA_JUDGE else build_judge(name)


def pair_set_recipe(
    concept: Concept,
    rows: list[DuoPairSpec],
    settings: SamplerSettings,
    seed: int,
    judge: Judge | None,
    base_fingerprint: str,
) -> dict[str, Any]:
    """Everything that decides a pair set's images; its hash is the pair set's key."""
    return {
        "version": PAIR_SET_VERSION,
        "rows": [asdict(row) for row in rows],
        "strength": concept.duo_strength,
        "sampler": asdict(settings),
        "seed": seed,
        "judge": judge.card.id if judge is not None else NO_DATA_JUDGE,
        "base_model": base_fingerprint,
        "numerics": numerics_versions(),
    }


def recipe_key(recipe: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------------- build


def build_pair_set(
    pipe,
    concept: Concept,
    *,
    sub_concept: str = "",
    pairs: int = 0,
    seed: int = 0,
    judge: Judge | None | str = "concept",
    base_fingerprint: str | None = None,
    batch_size: int = 8,
    max_tries: int = 10,
    root: Path | None = None,
) -> PairSet:
    """Return the cached pair set for this recipe, generating it with ``pipe`` (the base model) if needed.

    ``judge="concept"`` uses the concept's ``data_judge`` from `METRICS`. A `Judge` object or ``None``
    (keep everything) can be passed instead, which is how tests supply a tiny deterministic rule.
    """
    from duobench.models import pipeline_fingerprint

    if not 0.0 < concept.duo_strength <= 1.0:
        raise DuobenchError(f"duo_strength must be in (0, 1], got {concept.duo_strength} for {concept.name!r}.")
    if max_tries < 1:
        raise DuobenchError(f"max_tries must be at least 1, got {max_tries}.")
    if judge == "concept":
        judge = load_judge(concept.data_judge)
    rows = recipe_rows(concept, sub_concept, pairs)
    base_fingerprint = base_fingerprint or pipeline_fingerprint(pipe)
    settings = default_sampler_settings(pipe, concept)
    recipe = pair_set_recipe(concept, rows, settings, seed, judge, base_fingerprint)
    key = recipe_key(recipe)
    final = (root or duobench_home() / "duo-pairs") / key
    if (final / PAIRS_CARD).exists():
        return load_pair_set(final)

    # One process generates, another that needs the same set waits and reuses it. The generation holds no
    # collective, so each process (each rank under main_process_first, too) takes the lock on its own.
    with exclusive(final, f"generating the DUO pair set {key}"):
        if (final / PAIRS_CARD).exists():  # generated by another process while this one waited
            return load_pair_set(final)
        original_scheduler = pipe.scheduler
        try:
            card_pairs, images, tries = _generate_pairs(
                pipe, rows, settings, concept.duo_strength, seed, judge, batch_size, max_tries
            )
        finally:
            pipe.scheduler = original_scheduler  # generation may swap it; the caller's pipe stays as it was
        card = {"key": key, "recipe": recipe, "pairs": card_pairs, "tries": tries}
        return _write(final, card, images)


def _generate_pairs(
    pipe,
    rows: list[DuoPairSpec],
    settings: SamplerSettings,
    strength: float,
    seed: int,
    judge: Judge | None,
    batch_size: int,
    max_tries: int,
) -> tuple[list[dict[str, Any]], list[tuple[Image.Image, Image.Image]], dict[str, int]]:
    """Every row's judged pairs: their card entries, their images and how many draws/edits it took."""
    card_pairs: list[dict[str, Any]] = []
    images: list[tuple[Image.Image, Image.Image]] = []
    tries = {"unsafe": 0, "safe": 0}
    with track("DUO pair data", 2 * sum(row.count for row in rows), unit="images kept") as progress:
        for row_index, row in enumerate(rows):
            unsafe, unsafe_tries = _collect_unsafe(
                pipe, row_index, row, settings, seed, judge, batch_size, max_tries, progress
            )
            sources = [image for image, _, _ in unsafe]
            safe, safe_tries = _edit_safe(
                pipe, row_index, row, sources, settings, strength, seed, judge, batch_size, max_tries, progress
            )
            tries["unsafe"] += unsafe_tries
            tries["safe"] += safe_tries
            for (unsafe_image, unsafe_seed, unsafe_score), (safe_image, edit_seed, safe_score) in zip(
                unsafe, safe, strict=True
            ):
                index = len(card_pairs)
                card_pairs.append(
                    {
                        "unsafe": f"unsafe/{index:04d}.png",
                        "safe": f"safe/{index:04d}.png",
                        "unsafe_prompt": row.unsafe,
                        "safe_prompt": row.safe,
                        "sub_concept": row.sub_concept,
                        "unsafe_seed": unsafe_seed,
                        "edit_seed": edit_seed,
                        "unsafe_score": unsafe_score,
                        "safe_score": safe_score,
                    }
                )
                images.append((unsafe_image, safe_image))
    return card_pairs, images, tries


def _judge_name(judge: Judge | None) -> str:
    return judge.card.id if judge is not None else "the judge"


def _seed(base: int, row_index: int, safe: bool, k: int) -> int:
    return base + (2 * row_index + int(safe)) * SEED_STRIDE + k


def _verdicts(
    judge: Judge | None, images: list[Image.Image], prompt: str, want_unsafe: bool
) -> list[tuple[bool, float | None]]:
    """(kept, score) per image of ``prompt``: kept when the verdict is the wanted one; everything when there is
    no judge. A judge that reads the prompt too (a VLM asked about the request) gets it."""
    if judge is None:
        return [(True, None)] * len(images)
    verdicts = judge_images(judge, images, [prompt] * len(images))
    return [(verdict.unsafe == want_unsafe, float(verdict.score)) for verdict in verdicts]


def _collect_unsafe(
    pipe,
    row_index: int,
    row: DuoPairSpec,
    settings: SamplerSettings,
    seed: int,
    judge: Judge | None,
    batch_size: int,
    max_tries: int,
    progress: StageProgress,
) -> tuple[list[tuple[Image.Image, int, float | None]], int]:
    """``row.count`` judged-unsafe images from ``row.unsafe`` with their seeds, and the number of draws.

    Each round draws enough seeds to finish at the acceptance rate seen so far (at least 1/max_tries), so a
    rare concept costs a few large batches rather than many small ones.
    """
    accepted: list[tuple[Image.Image, int, float | None]] = []
    budget = row.count * max_tries
    tried = 0
    while len(accepted) < row.count:
        if tried >= budget:
            raise DuobenchError(
                f"DUO pair data: only {len(accepted)} of {row.count} images from {row.unsafe!r} were "
                f"judged unsafe by {_judge_name(judge)} in {tried} draws. The base model rarely shows the "
                "concept for this prompt, or the judge is too strict: raise max_tries, change the prompt, "
                "or pick another data_judge in the concept file."
            )
        needed = row.count - len(accepted)
        rate = max(len(accepted) / tried if tried else 1.0, 1.0 / max_tries)
        seeds = [_seed(seed, row_index, False, tried + k) for k in range(min(budget - tried, math.ceil(needed / rate)))]
        tried += len(seeds)
        items = [
            WorkItem(
                prompt=row.unsafe,
                seed=s,
                negative_prompt=settings.negative_prompt,
                guidance=settings.guidance,
                steps=settings.steps,
                height=settings.height,
                width=settings.width,
                scheduler=settings.scheduler,
            )
            for s in seeds
        ]
        images = [image for _, batch in generate(pipe, items, batch_size) for image in batch]
        before = len(accepted)
        for image, s, (kept, score) in zip(
            images, seeds, _verdicts(judge, images, row.unsafe, want_unsafe=True), strict=True
        ):
            if kept and len(accepted) < row.count:
                accepted.append((image, s, score))
        progress.advance(len(accepted) - before, unsafe_acceptance=len(accepted) / tried)
        logger.debug("DUO pairs %r: %d/%d unsafe images after %d draws", row.unsafe, len(accepted), row.count, tried)
    return accepted, tried


def _edit_safe(
    pipe,
    row_index: int,
    row: DuoPairSpec,
    sources: list[Image.Image],
    settings: SamplerSettings,
    strength: float,
    seed: int,
    judge: Judge | None,
    batch_size: int,
    max_tries: int,
    progress: StageProgress,
) -> tuple[list[tuple[Image.Image, int, float | None]], int]:
    """An SDEdit of every source that the judge passes, with its seed; and the number of edits made."""
    img2img, sdedit_options = _img2img(pipe, settings)
    results: list[tuple[Image.Image, int, float | None] | None] = [None] * len(sources)
    attempts = [0] * len(sources)
    pending = list(range(len(sources)))
    made = 0
    while pending:
        seeds = [_seed(seed, row_index, True, made + k) for k in range(len(pending))]
        made += len(pending)
        edits: list[Image.Image] = []
        for start in range(0, len(pending), batch_size):
            chunk = pending[start : start + batch_size]
            edits += _sdedit(
                img2img,
                [sources[j] for j in chunk],
                seeds[start : start + batch_size],
                row,
                settings,
                strength,
                **sdedit_options,
            )
        still_unsafe = []
        for j, edit, s, (kept, score) in zip(
            pending, edits, seeds, _verdicts(judge, edits, row.safe, want_unsafe=False), strict=True
        ):
            attempts[j] += 1
            if kept:
                results[j] = (edit, s, score)
            elif attempts[j] >= max_tries:
                raise DuobenchError(
                    f"DUO pair data: {max_tries} SDEdits of an image from {row.unsafe!r} towards "
                    f"{row.safe!r} at strength {strength} were all still judged unsafe by "
                    f"{_judge_name(judge)}. Raise duo_strength or max_tries, or make the safe prompt more "
                    "explicit."
                )
            else:
                still_unsafe.append(j)
        progress.advance(len(pending) - len(still_unsafe), edit_acceptance=1 - len(still_unsafe) / len(pending))
        pending = still_unsafe
        logger.debug(
            "DUO pairs %r: %d/%d safe edits after %d edits",
            row.safe,
            len(sources) - len(pending),
            len(sources),
            made,
        )
    return [r for r in results if r is not None], made


def _img2img(pipe, settings: SamplerSettings) -> tuple[Any, dict[str, Any]]:
    """The base model's img2img pipeline (sharing its components) and the extra options of its calls.

    SD3 edits with ``StableDiffusion3Img2ImgPipeline``, its own flow-matching scheduler, and the 77 T5 tokens
    duobench samples SD3 with (the official ``generate_datasets_sd3.py`` calls the pipelines with their
    default 256). Unlike that script, whose retry loop judges the unsafe source instead of the edit (and so
    never ends), the edit is what the judge passes here, as on SD1.
    """
    from duobench.models import pipeline_family

    if pipeline_family(pipe) == "sd3":
        from diffusers import StableDiffusion3Img2ImgPipeline

        from duobench.sd3 import MAX_SEQUENCE_LENGTH

        img2img = StableDiffusion3Img2ImgPipeline(**pipe.components)
        img2img.set_progress_bar_config(disable=True)
        return img2img, {"max_sequence_length": MAX_SEQUENCE_LENGTH}
    from diffusers import StableDiffusionImg2ImgPipeline

    use_scheduler(pipe, settings.scheduler)
    img2img = StableDiffusionImg2ImgPipeline(**{**pipe.components, "requires_safety_checker": False})
    img2img.set_progress_bar_config(disable=True)
    return img2img, {}


@torch.no_grad()
def _sdedit(
    img2img,
    sources: list[Image.Image],
    seeds: list[int],
    row: DuoPairSpec,
    settings: SamplerSettings,
    strength: float,
    **options: Any,
) -> list[Image.Image]:
    """SDEdit ``sources`` towards the safe prompt, away from the unsafe one, each with its own generator."""
    output = img2img(
        prompt=[row.safe] * len(sources),
        negative_prompt=[row.unsafe] * len(sources),
        image=sources,
        strength=strength,
        guidance_scale=settings.guidance,
        num_inference_steps=settings.steps,
        generator=[torch.Generator("cpu").manual_seed(s) for s in seeds],
        output_type="pil",
        **options,
    )
    return [image.convert("RGB") for image in output.images]


def _write(final: Path, card: dict[str, Any], images: list[tuple[Image.Image, Image.Image]]) -> PairSet:
    """Write under a staging name of this process's own, then rename: a folder under its final name is
    always complete, also where the lock cannot exclude (`duobench.locks`: a node-local flock on NFS)."""
    staging = final.with_name(f".{final.name}.partial-{owner_tag()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        for kind in ("unsafe", "safe"):
            (staging / kind).mkdir(parents=True)
        for pair, (unsafe, safe) in zip(card["pairs"], images, strict=True):
            unsafe.save(staging / pair["unsafe"])
            safe.save(staging / pair["safe"])
        (staging / PAIRS_CARD).write_text(json.dumps(card, indent=2, sort_keys=True))
        try:
            os.rename(staging, final)
        except OSError:
            if not (final / PAIRS_CARD).exists():  # not another process winning the race: a real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return load_pair_set(final)
