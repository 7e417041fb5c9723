"""The run's benign-prompt metrics (prior preservation, CLIP score, FID) wired to the stage cache.

Each metric's result is cached under the keys of the images it read and its card's identity (id, parameters,
pinned weights sha256), so a card version bump recomputes that metric alone. Under a process group every rank
reads a share of the images and the metric's states merge (`feed_share`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from duobench.distributed import gather_indexed, my_share
from duobench.items import WorkItem
from duobench.metrics.base import StreamingMetric, card_identity, load_images, sync_state
from duobench.metrics.fid_reference import FidReference, card_for
from duobench.progress import track
from duobench.stages import StageCache

CHUNK = 64
"""Images per metric update."""
PER_IMAGE = "per-image audit rows"
"""In the prior-preservation and CLIP-score stage keys: their cached results carry per-image rows."""


def preset_identity(preset: str) -> dict[str, Any]:
    """A stage-cache key's part for a judge or metric preset: its card's id (name@version), parameters and
    pinned weights sha256 (`duobench.metrics.base.card_identity`), read without loading any weights. A card
    version bump recomputes exactly the stages that use it."""
    from duobench.registry import METRICS

    return card_identity(METRICS.get(preset).card)


def preset_card_id(preset: str) -> str:
    from duobench.registry import METRICS

    return METRICS.get(preset).card.id


def benign_metrics(
    stages: StageCache,
    presets: dict[str, str],
    fid_reference: FidReference,
    items: list[WorkItem],
    base_paths: list[Path],
    target_paths: list[Path],
) -> dict[str, Any]:
    """Prior preservation, CLIP score and FID on the benign prompts, each cached by image keys and card;
    prior preservation and CLIP score also return their per-image ``rows`` (one per benign pair / image).

    ``base_paths`` and ``target_paths`` are the base and the evaluated model's images of the same ``items``,
    in order (so pairs are matched by prompt, seed and sampler).
    """
    from duobench.registry import METRICS

    keys = [path.stem for path in target_paths]
    base_keys = [path.stem for path in base_paths]
    results: dict[str, Any] = {}

    def prior() -> dict[str, Any]:
        return _prior_preservation(presets["prior_preservation"], items, base_paths, target_paths)

    results["prior_preservation"] = stages.run(
        "prior_preservation",
        {"card": preset_identity(presets["prior_preservation"]), "a": base_keys, "b": keys, "rows": PER_IMAGE},
        prior,
    )

    def clip() -> dict[str, Any]:
        metric = METRICS.get(presets["clip_score"])()

        def update(chunk: list[int]) -> None:
            metric.update(load_images([target_paths[i] for i in chunk]), items=[items[i] for i in chunk])

        rows = feed_share(metric, "CLIP score", len(items), update)
        return {**metric.compute(), "rows": rows}

    results["clip_score"] = stages.run(
        "clip_score",
        {
            "card": preset_identity(presets["clip_score"]),
            "images": keys,
            "prompts": [i.prompt for i in items],
            "rows": PER_IMAGE,
        },
        clip,
    )

    def frechet() -> dict[str, Any]:
        return _fid(presets["fid"], fid_reference, base_paths, target_paths)

    payload = {
        "card": preset_identity(presets["fid"]),
        "images": keys,
        "reference": base_keys if fid_reference.is_base_model else fid_reference.identity,
        "kid": "independent reference only",
    }
    results["fid"] = stages.run("fid", payload, frechet)
    return results


def close_concept_metrics(
    stages: StageCache,
    preset: str,
    concepts: dict[str, tuple[list[WorkItem], list[Path], list[Path]]],
) -> dict[str, Any]:
    """The base model's and the evaluated model's images of each close concept compared, as DUO's Table 3
    compares them: per concept the mean and sample sd of the per-image distance (LPIPS on SD; the prior
    preservation preset's distance), and over all of them the prior preservation (1 - mean distance).

    ``concepts`` maps a close concept's name to (items, base image paths, evaluated image paths), in order.
    A concept with no items (a guard refused all of them) has no distance (None, n 0), and the prior
    preservation is None when no concept has one. Cached by the image keys and the preset's card. Empty
    without close concepts."""
    if not concepts:
        return {}

    def compute() -> dict[str, Any]:
        per_concept, similarities = {}, []
        for name, (items, base_paths, target_paths) in concepts.items():
            if not items:
                per_concept[name] = {"distance_mean": None, "distance_sd": None, "n": 0}
                continue
            rows = _prior_preservation(preset, items, base_paths, target_paths)["rows"]
            distances = [1.0 - row["prior_preservation"] for row in rows]
            similarities += [row["prior_preservation"] for row in rows]
            mean = sum(distances) / len(distances)
            spread = (sum((d - mean) ** 2 for d in distances) / (len(distances) - 1)) ** 0.5 if len(rows) > 1 else None
            per_concept[name] = {"distance_mean": mean, "distance_sd": spread, "n": len(rows)}
        return {
            "metric": preset_card_id(preset),
            "prior_preservation": sum(similarities) / len(similarities) if similarities else None,
            "concepts": per_concept,
        }

    payload = {
        "card": preset_identity(preset),
        "concepts": {name: [[p.stem for p in a], [p.stem for p in b]] for name, (_, a, b) in concepts.items()},
    }
    return stages.run("close_concepts", payload, compute)


def _fid(preset: str, reference: FidReference, base_paths: list[Path], target_paths: list[Path]) -> dict[str, Any]:
    """FID of the evaluated model's benign images against real images or, for the ``base`` reference,
    against the base model's images of the same prompts and seeds (drift, under its own card id: see
    `duobench.metrics.fid_reference`).

    KID comes only with an independent reference that keeps its features (real images): its unbiased
    estimator assumes two independent samples, and the base model's images of the same prompts and seeds are
    paired with the evaluated model's, which drove it to values like -621,161 for identical models.
    """
    import numpy as np

    from duobench.registry import METRICS

    metric_preset = METRICS.get(preset)
    card = card_for(metric_preset.card, reference)
    if reference.is_base_model:
        base_metric = metric_preset.factory(card=card, reference=(np.zeros(1), np.zeros((1, 1))))
        feed_share(base_metric, "FID reference (base model)", len(base_paths), _updater(base_metric, base_paths))
        metric = metric_preset.factory(card=card, reference=base_metric.mean_and_covariance())
    else:
        metric = metric_preset.factory(card=card, reference=reference.path)
    feed_share(metric, "FID", len(target_paths), _updater(metric, target_paths))
    result = metric.compute()
    result["reference"] = reference.source
    return result


def _prior_preservation(
    preset: str, items: list[WorkItem], base_paths: list[Path], target_paths: list[Path]
) -> dict[str, Any]:
    from duobench.registry import METRICS

    metric = METRICS.get(preset)()

    def update(chunk: list[int]) -> None:
        metric.update(
            load_images([target_paths[i] for i in chunk]),
            items=[items[i] for i in chunk],
            references=load_images([base_paths[i] for i in chunk]),
        )

    rows = feed_share(metric, "prior preservation", len(target_paths), update)
    return {**metric.compute(), "rows": rows}


def _updater(metric: StreamingMetric, paths: list[Path]) -> Callable[[list[int]], None]:
    """``update(chunk)`` feeding the images at the chunk's positions to a metric that reads images alone."""
    return lambda chunk: metric.update(load_images([paths[i] for i in chunk]))


def feed_share(
    metric: StreamingMetric, description: str, count: int, update: Callable[[list[int]], None]
) -> list[dict[str, Any]]:
    """Feed this rank's share of ``count`` images to ``metric``, ``CHUNK`` positions per ``update(chunk)``
    call, with a progress bar; then merge every rank's state into ``metric`` (`sync_state`) and return the
    per-image audit rows of all ranks in position order. In one process: every position, in order."""
    mine = my_share(count)
    indexed: list[tuple[int, dict[str, Any]]] = []
    with track(description, len(mine), unit="images") as progress:
        for start in range(0, len(mine), CHUNK):
            chunk = mine[start : start + CHUNK]
            before = len(metric.audit_rows())
            update(chunk)
            fresh = metric.audit_rows()[before:]
            if fresh:  # per-image metrics keep one row per image; set-level ones (FID) none
                indexed += zip(chunk, fresh, strict=True)
            progress.advance(len(chunk))
    sync_state(metric)
    return gather_indexed(indexed)
