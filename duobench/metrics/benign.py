"""The run's benign-prompt metrics (prior preservation, CLIP score, FID) wired to the stage cache.

Each metric's result is cached under the keys of the images it read and its card's identity (id, parameters,
pinned weights sha256), so a card version bump recomputes that metric alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from duobench.items import WorkItem
from duobench.metrics.base import card_identity, load_images
from duobench.metrics.fid_reference import FidReference, card_for
from duobench.progress import track
from duobench.stages import StageCache

PER_IMAGE = "per-image audit rows"
"""In the prior-preservation and CLIP-score stage keys: their cached results carry per-image rows."""


def preset_identity(preset: str) -> dict[str, Any]:
    """A stage-cache key's part for a judge or metric preset: its card's id (name@version), parameters and
    pinned weights sha256 (`duobench.metrics.base.card_identity`), read without loading any weights. A card
    version bump recomputes exactly the stages that use it."""
    from duobench.registry import METRICS

    return card_identity(METRICS.get(preset).card)


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
        with track("CLIP score", len(items), unit="images") as progress:
            for start in range(0, len(items), 64):
                metric.update(load_images(target_paths[start : start + 64]), items=items[start : start + 64])
                progress.advance(len(items[start : start + 64]))
        return {**metric.compute(), "rows": metric.audit_rows()}

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
        with track("FID reference (base model)", len(base_paths), unit="images") as progress:
            for start in range(0, len(base_paths), 64):
                base_metric.update(load_images(base_paths[start : start + 64]))
                progress.advance(len(base_paths[start : start + 64]))
        metric = metric_preset.factory(card=card, reference=base_metric.mean_and_covariance())
    else:
        metric = metric_preset.factory(card=card, reference=reference.path)
    with track("FID", len(target_paths), unit="images") as progress:
        for start in range(0, len(target_paths), 64):
            metric.update(load_images(target_paths[start : start + 64]))
            progress.advance(len(target_paths[start : start + 64]))
    result = metric.compute()
    result["reference"] = reference.source
    return result


def _prior_preservation(
    preset: str, items: list[WorkItem], base_paths: list[Path], target_paths: list[Path]
) -> dict[str, Any]:
    from duobench.registry import METRICS

    metric = METRICS.get(preset)()
    with track("prior preservation", len(target_paths), unit="images") as progress:
        for start in range(0, len(target_paths), 64):
            metric.update(
                load_images(target_paths[start : start + 64]),
                items=items[start : start + 64],
                references=load_images(base_paths[start : start + 64]),
            )
            progress.advance(len(target_paths[start : start + 64]))
    return {**metric.compute(), "rows": metric.audit_rows()}
