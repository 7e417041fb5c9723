"""FID and KID exactly as clean-fid's "clean" mode computes them, but streaming and mergeable.

clean-fid "clean" (Parmar et al., CVPR 2022): each channel is resized to 299x299 as a float image with
PIL's bicubic filter (no uint8 quantisation after resizing), then the StyleGAN2-ADA TorchScript port of
TF-Inception gives 2048-d pool features. We call clean-fid's own resizer, Inception wrapper and
``frechet_distance``; what we add is the streaming state: the feature sum, the sum of outer products and
the count, which add across batches and processes, so the mean and covariance (``np.cov``'s unbiased
estimate) come out the same however the images were split.

FID is biased and its covariance is rank-deficient below 2048 images, so ``fid-clean`` also keeps the raw
features while there are at most 2048 of them and then reports KID (clean-fid's ``kernel_distance``:
100 random subsets of up to 1000, cubic polynomial kernel) beside FID; ``kid-clean`` keeps them always.
clean-fid draws KID's subsets from numpy's global random state; ours come from a seeded generator, with
the same draws as clean-fid after ``np.random.seed(seed)``, over the generated features sorted into a
canonical row order (so KID does not depend on batch order or the number of processes).

The reference is a folder of images (listed and read as clean-fid does; its statistics are cached under
``$DUOBENCH_HOME/fid-stats``), a clean-fid ``.npz`` (``mu``/``sigma`` for FID, ``feats`` for KID), or a
``(mu, sigma)`` pair.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from glob import glob
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import MetricCard, MetricPreset, StreamingMetric, load_images, with_weights
from duobench.metrics.weights import fetch_weights
from duobench.paths import duobench_home

INCEPTION_FILE = "inception-2015-12-05.pt"
INCEPTION_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
INCEPTION_ENV = "DUOBENCH_INCEPTION"
FEATURE_DIM = 2048
DEFAULT_BATCH_SIZE = 32
KID_SUBSETS = 100
KID_MAX_SUBSET_SIZE = 1000

FeatureModel = Callable[[Any], Any]
"""clean-fid's ``custom_feat_extractor`` contract: (B, 3, 299, 299) float tensor in [0, 255] → (B, D)."""


class CleanFeatureExtractor:
    """Images → clean-fid "clean" features. ``model`` replaces the Inception network (tests, CLIP-FID)."""

    def __init__(
        self,
        device: str | None = None,
        weights: str | Path | None = None,
        model: FeatureModel | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
    ) -> None:
        import torch
        from cleanfid.resize import build_resizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.batch_size = batch_size
        self.resize = build_resizer("clean")
        self.weights, self.weights_sha256 = "", ""
        if model is None:
            from cleanfid.inception_torchscript import InceptionV3W

            from duobench.metrics.base import sha256_file

            path = fetch_weights(INCEPTION_FILE, INCEPTION_URL, "clean-fid Inception weights", INCEPTION_ENV, weights)
            if path.name != INCEPTION_FILE:
                raise DuobenchError(
                    f"clean-fid loads its Inception weights by name: rename {path} to {INCEPTION_FILE}."
                )
            model = InceptionV3W(str(path.parent), download=False, resize_inside=False).to(self.device).eval()
            self.weights, self.weights_sha256 = str(path), sha256_file(path)
        self.model = model

    def __call__(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(N, D) float32 features, as clean-fid's ``get_batch_features`` returns them."""
        import torch

        batches = []
        for start in range(0, len(images), self.batch_size):
            resized = [self.resize(np.array(image.convert("RGB"))) for image in images[start : start + self.batch_size]]
            pixels = torch.stack([torch.from_numpy(r.transpose(2, 0, 1).copy()) for r in resized])
            with torch.no_grad():
                batches.append(self.model(pixels.to(self.device)).detach().cpu().numpy())
        return np.concatenate(batches) if batches else np.zeros((0, 0), np.float32)


def clean_fid_files(folder: str | Path) -> list[str]:
    """The image files clean-fid's ``get_folder_features`` would read, in its order."""
    from cleanfid.utils import EXTENSIONS

    return sorted(file for ext in EXTENSIONS for file in glob(os.path.join(folder, f"**/*.{ext}"), recursive=True))


def folder_features(folder: str | Path, extractor: CleanFeatureExtractor) -> np.ndarray:
    files = clean_fid_files(folder)
    if len(files) < 2:
        raise DuobenchError(f"The FID reference folder {folder} has {len(files)} images; it needs at least 2.")
    return np.concatenate([extractor(load_images(files[start : start + 256])) for start in range(0, len(files), 256)])


def kernel_distance(
    features_a: np.ndarray,
    features_b: np.ndarray,
    num_subsets: int = KID_SUBSETS,
    max_subset_size: int = KID_MAX_SUBSET_SIZE,
    seed: int = 0,
) -> float:
    """clean-fid's ``kernel_distance(features_a, features_b)`` with its subsets drawn from ``seed``."""
    rng = np.random.RandomState(seed)
    dim = features_a.shape[1]
    size = min(len(features_a), len(features_b), max_subset_size)
    total = 0.0
    for _ in range(num_subsets):
        x = features_b[rng.choice(len(features_b), size, replace=False)]
        y = features_a[rng.choice(len(features_a), size, replace=False)]
        within = (x @ x.T / dim + 1) ** 3 + (y @ y.T / dim + 1) ** 3
        between = (x @ y.T / dim + 1) ** 3
        total += (within.sum() - np.diag(within).sum()) / (size - 1) - between.sum() * 2 / size
    return float(total / num_subsets / size)


def canonical_order(features: np.ndarray) -> np.ndarray:
    """Rows sorted lexicographically: KID's random subsets are drawn by row index, so without a fixed
    order KID would depend on which process judged which image and in what order batches arrived."""
    return features[np.lexsort(features.T[::-1])]


class InceptionDistances(StreamingMetric):
    """Streaming clean-fid FID (and KID while raw features are kept) of images against a reference."""

    reductions = {"count": "sum", "feature_sum": "sum", "outer_sum": "sum", "features": "cat"}

    def __init__(
        self,
        card: MetricCard,
        reference: str | Path | tuple[np.ndarray, np.ndarray],
        device: str | None = None,
        weights: str | Path | None = None,
        feature_extractor: FeatureModel | None = None,
        feature_dim: int = FEATURE_DIM,
        batch_size: int = DEFAULT_BATCH_SIZE,
        seed: int = 0,
    ) -> None:
        self.extractor = CleanFeatureExtractor(device, weights, feature_extractor, batch_size)
        self.feature_dim = feature_dim
        self.keep_features_up_to = card.params["keep_features_up_to"]
        self.seed = seed
        self.reference = reference
        self._reference_stats: dict[str, Any] | None = None
        if self.extractor.weights:
            card = with_weights(card, self.extractor.weights, self.extractor.weights_sha256)
        self.card = card
        super().__init__()

    def empty_state(self) -> dict[str, Any]:
        return {
            "count": 0,
            "feature_sum": np.zeros(self.feature_dim),
            "outer_sum": np.zeros((self.feature_dim, self.feature_dim)),
            "features": [],
        }

    def update(self, images: Sequence[Image.Image], items: Sequence[Any] | None = None) -> None:
        features = self.extractor(images)
        if len(features) == 0:
            return
        if features.shape[1] != self.feature_dim:
            raise DuobenchError(f"Feature extractor gave {features.shape[1]}-d features; expected {self.feature_dim}.")
        wide = features.astype(np.float64)
        self._state["count"] += len(wide)
        self._state["feature_sum"] += wide.sum(axis=0)
        self._state["outer_sum"] += wide.T @ wide
        self._state["features"].append(features)
        self._drop_features_past_limit()

    def merge(self, state: dict[str, Any]) -> None:
        super().merge(state)
        self._drop_features_past_limit()

    def _drop_features_past_limit(self) -> None:
        if self.keep_features_up_to is not None and self._state["count"] > self.keep_features_up_to:
            self._state["features"] = []

    def mean_and_covariance(self) -> tuple[np.ndarray, np.ndarray]:
        """The generated images' mean and unbiased covariance (``np.cov``'s) from the streamed sums."""
        count = self._state["count"]
        if count < 2:
            raise DuobenchError(f"FID needs at least 2 generated images; got {count}.")
        mean = self._state["feature_sum"] / count
        covariance = (self._state["outer_sum"] - count * np.outer(mean, mean)) / (count - 1)
        return mean, covariance

    def reference_stats(self) -> dict[str, Any]:
        """``mu``, ``sigma`` and (when known) ``feats`` of the reference, computed once."""
        if self._reference_stats is None:
            self._reference_stats = load_reference(self.reference, self.extractor, self.card)
        return self._reference_stats

    def compute(self) -> dict[str, Any]:
        from cleanfid.fid import frechet_distance

        mean, covariance = self.mean_and_covariance()
        reference = self.reference_stats()
        count = self._state["count"]
        result: dict[str, Any] = {
            "metric": self.card.id,
            "fid": float(frechet_distance(mean, covariance, reference["mu"], reference["sigma"])),
            "kid": None,
            "n_images": count,
            "n_reference": reference.get("count"),
            "fid_full_rank": count > self.feature_dim,
        }
        features = self._state["features"]
        if features and sum(len(f) for f in features) == count and reference.get("feats") is not None:
            generated = canonical_order(np.concatenate(features))
            result["kid"] = kernel_distance(reference["feats"], generated, seed=self.seed)
        return result


def load_reference(reference: Any, extractor: CleanFeatureExtractor, card: MetricCard) -> dict[str, Any]:
    """Reference statistics from a folder (cached), a clean-fid ``.npz``, or a ``(mu, sigma)`` pair."""
    if isinstance(reference, tuple) and len(reference) == 2:
        return {
            "mu": np.asarray(reference[0]),
            "sigma": np.asarray(reference[1]),
            "feats": None,
            "count": None,
        }
    path = Path(reference)
    if path.suffix == ".npz" and path.is_file():
        with np.load(path) as stats:
            feats = stats["feats"] if "feats" in stats else None
            if "mu" in stats:
                return {"mu": stats["mu"], "sigma": stats["sigma"], "feats": feats, "count": None}
            if feats is not None:
                return {"mu": np.mean(feats, axis=0), "sigma": np.cov(feats, rowvar=False), "feats": feats}
        raise DuobenchError(f"{path} has neither mu/sigma nor feats arrays (clean-fid statistics format).")
    if not path.is_dir():
        raise DuobenchError(f"FID reference {reference!r} is neither an image folder, a .npz, nor (mu, sigma).")
    cache = _reference_cache_path(path, extractor, card)
    if cache is not None and cache.is_file():
        with np.load(cache) as stats:
            return {key: stats[key] for key in ("mu", "sigma", "feats")} | {"count": len(stats["feats"])}
    feats = folder_features(path, extractor)
    # Exactly clean-fid's statistics: float32 features, np.mean and np.cov.
    stats = {"mu": np.mean(feats, axis=0), "sigma": np.cov(feats, rowvar=False), "feats": feats}
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(".partial.npz")
        np.savez(partial, **stats)
        partial.rename(cache)
    return stats | {"count": len(feats)}


def _reference_cache_path(folder: Path, extractor: CleanFeatureExtractor, card: MetricCard) -> Path | None:
    """Key: the folder's files (names, sizes, mtimes) and the Inception weights; none for custom models."""
    if not extractor.weights_sha256:
        return None
    listing = [(os.path.relpath(f, folder), os.path.getsize(f), os.path.getmtime(f)) for f in clean_fid_files(folder)]
    payload = json.dumps({"files": listing, "weights": extractor.weights_sha256, "mode": card.params["mode"]})
    return duobench_home() / "fid-stats" / f"{hashlib.sha256(payload.encode()).hexdigest()[:24]}.npz"


def fid(
    images: Sequence[Image.Image], reference: str | Path | tuple, preset: str = "fid-clean", **kwargs: Any
) -> dict[str, Any]:
    """FID (and KID for small sets) of ``images`` against a reference folder / ``.npz`` / ``(mu, sigma)``."""
    from duobench.registry import METRICS

    metric = METRICS.get(preset)(reference=reference, **kwargs)
    metric.update(list(images))
    return metric.compute()


def _inception_card(name: str, description: str, keep_features_up_to: int | None, headline: str) -> MetricCard:
    # Version 2: the card means FID against real images; against the base model it is `<name>-vs-base`
    # (`duobench.metrics.fid_reference`), where version 1 had one id for both.
    return MetricCard(
        name=name,
        version=2,
        description=description,
        source="clean-fid 0.1.35 mode='clean' (GaParmar/clean-fid): PIL bicubic float resize, TF-Inception",
        params={
            "mode": "clean",
            "feature_dim": FEATURE_DIM,
            "keep_features_up_to": keep_features_up_to,
            "kid_subsets": KID_SUBSETS,
            "kid_max_subset_size": KID_MAX_SUBSET_SIZE,
            "headline": headline,
        },
        weights=INCEPTION_FILE,
    )


FID_CLEAN = MetricPreset(
    _inception_card(
        "fid-clean",
        "clean-fid FID ('clean' mode) vs a reference folder/stats; adds KID when <= 2048 images.",
        FEATURE_DIM,
        "fid",
    ),
    InceptionDistances,
    "metric",
)
KID_CLEAN = MetricPreset(
    _inception_card(
        "kid-clean",
        "clean-fid KID ('clean' mode, 100 seeded subsets of <= 1000) vs a reference folder/feats, FID too.",
        None,
        "kid",
    ),
    InceptionDistances,
    "metric",
)
