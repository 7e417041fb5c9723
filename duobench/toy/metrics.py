"""Toy-world stand-ins for the two metrics whose weights cannot be had offline: CLIP score and FID.

- ``toy-alignment`` replaces CLIP score: 100 x P(requested shape) x P(requested colour) under the toy judge,
  with the request read from the prompt through the shapes vocabulary (synonyms included). Like CLIP
  score it asks "does the image show what the prompt says?", on a 0-100 scale; unlike CLIP it is exact in
  this world. Prompts naming no known shape/colour are counted and left out.
- ``fid-toy`` is clean-fid's FID with the toy judge's 128-d penultimate features as a custom feature
  extractor (the path clean-fid documents for custom extractors), in place of Inception.

Both cards say they are toy stand-ins, so no toy number can be mistaken for an SD number.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import MetricCard, MetricPreset, StreamingMetric, item_columns, sha256_file, with_weights
from duobench.metrics.fid import InceptionDistances
from duobench.metrics.prior_preservation import PriorPreservation
from duobench.toy.judge import (
    JUDGE_SHAPE_LABELS,
    WEIGHTS_FILE,
    ToyJudge,
    default_judge_folder,
    toy_judge_card,
    toy_perceptual_distance,
)
from duobench.toy.shapes import COLOUR_NAMES, COLOUR_SYNONYMS, IMAGE_SIZE, SHAPE_SYNONYMS

FEATURE_DIM = 128


def requested_shape_and_colour(prompt: str) -> tuple[str | None, str | None]:
    """The shape and colour a prompt asks for, matching the longest synonym first ("five-pointed star")."""
    text = f" {prompt.lower()} "

    def find(synonyms: dict[str, tuple[str, ...]]) -> str | None:
        pairs = sorted(((word, name) for name, words in synonyms.items() for word in words), key=lambda p: -len(p[0]))
        for word, name in pairs:
            if re.search(rf"(?<![a-z-]){re.escape(word)}(?![a-z-])", text):
                return name
        return None

    return find(SHAPE_SYNONYMS), find(COLOUR_SYNONYMS)


class ToyAlignment(StreamingMetric):
    """Streaming mean of 100 x P(shape) x P(colour) for the prompt's request; mergeable sums."""

    reductions = {"score_sum": "sum", "score_square_sum": "sum", "count": "sum", "unparsed": "sum", "rows": "cat"}

    def __init__(self, card: MetricCard) -> None:
        self.judge = ToyJudge(toy_judge_card("star"))
        self.card = MetricCard(
            **{**card.__dict__, "weights": self.judge.card.weights, "weights_sha256": self.judge.card.weights_sha256}
        )
        super().__init__()

    def empty_state(self) -> dict[str, Any]:
        return {"score_sum": 0.0, "score_square_sum": 0.0, "count": 0, "unparsed": 0, "rows": []}

    def update(
        self, images: Sequence[Image.Image], items: Sequence[Any] | None = None, prompts: Sequence[str] | None = None
    ) -> None:
        if prompts is None:
            if items is None:
                raise DuobenchError("toy-alignment needs the prompts: pass items (with .prompt) or prompts=.")
            prompts = [item.prompt for item in items]
        shape_probs, colour_probs = self.judge.predict(list(images))
        for index, prompt in enumerate(prompts):
            shape, colour = requested_shape_and_colour(prompt)
            if shape is None or colour is None:
                self._state["unparsed"] += 1
                continue
            probability = float(shape_probs[index, JUDGE_SHAPE_LABELS.index(shape)]) * float(
                colour_probs[index, COLOUR_NAMES.index(colour)]
            )
            score = 100.0 * probability
            self._state["score_sum"] += score
            self._state["score_square_sum"] += score**2
            self._state["count"] += 1
            columns = item_columns(items[index]) if items is not None else {"prompt": prompt}
            self._state["rows"].append({"metric": self.card.id, **columns, "clip_score": score})

    def compute(self) -> dict[str, Any]:
        count = self._state["count"]
        if count == 0:
            raise DuobenchError("toy-alignment saw no prompt naming a known shape and colour.")
        mean = self._state["score_sum"] / count
        return {
            "metric": self.card.id,
            "clip_score": mean,
            "clip_score_std": max(self._state["score_square_sum"] / count - mean**2, 0.0) ** 0.5,
            "n_images": count,
            "n_unparsed": self._state["unparsed"],
        }


class ToyJudgeFeatures:
    """clean-fid custom extractor: (B, 3, 299, 299) in [0, 255] → the toy judge's (B, 128) features."""

    def __init__(self) -> None:
        self.judge = ToyJudge(toy_judge_card("star"))

    @torch.no_grad()
    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        small = torch.nn.functional.interpolate(batch.float() / 255.0, size=(IMAGE_SIZE, IMAGE_SIZE), mode="area")
        return self.judge.features(small)


def toy_fid(card: MetricCard, reference: Any, **kwargs: Any) -> InceptionDistances:
    return InceptionDistances(card, reference, feature_extractor=ToyJudgeFeatures(), feature_dim=FEATURE_DIM, **kwargs)


TOY_ALIGNMENT = MetricPreset(
    MetricCard(
        name="toy-alignment",
        version=1,
        description="TOY STAND-IN for CLIP score: 100 x P(requested shape) x P(requested colour) under the toy "
        "judge; prompt parsed with the shapes vocabulary (synonyms included).",
        source="duobench toy world (no CLIP weights offline)",
        params={"judge": "toy judge CNN", "scale": "0-100"},
    ),
    ToyAlignment,
    "metric",
)

FID_TOY = MetricPreset(
    MetricCard(
        name="fid-toy",
        version=2,
        description="TOY STAND-IN for FID: clean-fid FID/KID with the toy judge's 128-d features as the custom "
        "feature extractor instead of Inception.",
        source="clean-fid custom_feat_extractor path; duobench toy judge",
        params={"mode": "clean", "feature_dim": FEATURE_DIM, "keep_features_up_to": 4096, "headline": "fid"},
    ),
    toy_fid,
    "metric",
)


def toy_prior_preservation(card: MetricCard, **kwargs: Any) -> PriorPreservation:
    """`PriorPreservation` with the toy judge's feature distance in place of LPIPS."""
    path = default_judge_folder() / WEIGHTS_FILE
    card = with_weights(card, str(path), sha256_file(path) if path.is_file() else "")
    return PriorPreservation(card, distance=lambda a, b: toy_perceptual_distance(list(a), list(b)), **kwargs)


TOY_JUDGE_FEATURES = MetricPreset(
    MetricCard(
        name="toy-judge-features",
        version=1,
        description="TOY STAND-IN FOR LPIPS (not LPIPS): 1 − distance in the toy judge's normalised conv "
        "features; only meaningful in the offline toy world.",
        source="duobench.toy.judge.toy_perceptual_distance",
        params={"distance": "toy-judge-features", "stand_in_for": "lpips"},
        weights="duobench/toy judge weights",
    ),
    toy_prior_preservation,
    "metric",
)
