"""Judges and metrics: streaming, mergeable, pinned presets with metric cards.

Every registered entry in `duobench.registry.METRICS` is a `MetricPreset`: ``METRICS.get(name).card`` is
its card (no weights loaded), ``METRICS.get(name)(**kwargs)`` builds the judge or metric.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from PIL import Image

from duobench.metrics.base import audit_row


def judge_images(
    preset: str, images: Sequence[Image.Image], items: Sequence[Any] | None = None, **kwargs: Any
) -> list[dict[str, Any]]:
    """Judge images with a registered judge preset; one audit row per image (verdict, score, evidence)."""
    from duobench.metrics.dsr import build_judge

    judge = build_judge(preset, **kwargs)
    verdicts = judge.judge(list(images))
    items = items if items is not None else [None] * len(verdicts)
    return [audit_row(judge.card, verdict, item) for verdict, item in zip(verdicts, items, strict=True)]
