"""CLIP score (image-prompt agreement) with open_clip; the model and the scale are part of the preset.

Two scales circulate and explain the "0.31 vs 31" confusion between papers (harness-anchors.md section 3):

- ``clip-vit-l14-x100``: torchmetrics' ``CLIPScore`` convention, 100 · max(cos, 0), OpenAI ViT-L/14
  (UnlearnDiffAtk, HELM; DUO's forks quote SD1.4 ≈ 31 on COCO-30k);
- ``clip-vit-b32-cos``: the raw cosine, OpenAI ViT-B/32, as ESD/UCE/AdvUnlearn compute it
  (``logits_per_image / 100``, not clamped).

We run both through open_clip with OpenAI's weights; torchmetrics and those scripts use HF transformers'
port of the same weights, whose image resize differs slightly, so expect agreement to about 0.1 points,
not bit-equality.

Prompts longer than CLIP's 77-token context: torchmetrics mis-scores them (its issues #2000, #2883). We
truncate them explicitly as open_clip's tokenizer does (start token, the first 75 BPE tokens, end token),
flag each such image (``prompt_truncated`` in its row) and count them (``n_truncated`` in the result).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import (
    MetricCard,
    MetricPreset,
    StreamingMetric,
    item_columns,
    item_prompt,
    with_weights,
)
from duobench.metrics.weights import load_open_clip

CONTEXT_LENGTH = 77
SCALES = ("x100-clamped", "cosine")
DEFAULT_BATCH_SIZE = 32


def scale_cosine(cosine: np.ndarray, scale: str) -> np.ndarray:
    """Map raw cosines to the preset's reporting scale."""
    if scale == "x100-clamped":
        return 100.0 * np.maximum(cosine, 0.0)
    if scale == "cosine":
        return cosine
    raise DuobenchError(f"Unknown CLIP-score scale {scale!r}; choose one of {', '.join(SCALES)}.")


def prompt_token_count(tokenizer: Any, prompt: str) -> int:
    """Tokens the prompt needs including start and end tokens (more than 77 means truncation)."""
    return len(tokenizer.encode(prompt)) + 2


class ClipScore(StreamingMetric):
    """Streaming CLIP score. ``update(images, items, prompts=None)``: prompts default to the items' text.

    ``clip=(model, preprocess, tokenizer)`` replaces the downloaded weights (tests, or a CLIP in memory).
    """

    reductions = {
        "score_sum": "sum",
        "score_square_sum": "sum",
        "count": "sum",
        "truncated": "sum",
        "rows": "cat",
    }

    def __init__(
        self,
        card: MetricCard,
        device: str | None = None,
        weights: str | Path | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        clip: tuple[Any, Callable[[Image.Image], Any], Any] | None = None,
    ) -> None:
        import torch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.scale = card.params["scale"]
        if self.scale not in SCALES:
            raise DuobenchError(f"Unknown CLIP-score scale {self.scale!r}; choose one of {', '.join(SCALES)}.")
        self.batch_size = batch_size
        if clip is None:
            model, preprocess, tokenizer, path, digest = load_open_clip(
                card.params["clip_model"],
                card.params["clip_pretrained"],
                card.params["weights_env"],
                weights,
                self.device,
            )
            card = with_weights(card, path, digest)
            if self.device.type == "cuda":
                model = model.half()
        else:
            model, preprocess, tokenizer = clip
        self.model, self.preprocess, self.tokenizer = model.eval(), preprocess, tokenizer
        self.card = card
        super().__init__()

    def empty_state(self) -> dict[str, Any]:
        return {"score_sum": 0.0, "score_square_sum": 0.0, "count": 0, "truncated": 0, "rows": []}

    def scores(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Per-pair scores on the preset's scale, and which prompts had to be truncated."""
        import torch

        if len(images) != len(prompts):
            raise DuobenchError(f"CLIP score pairs images with prompts; got {len(images)} and {len(prompts)}.")
        truncated = np.array([prompt_token_count(self.tokenizer, p) > CONTEXT_LENGTH for p in prompts], dtype=bool)
        dtype = next(self.model.parameters()).dtype
        cosines = []
        with torch.no_grad():
            for start in range(0, len(images), self.batch_size):
                stop = start + self.batch_size
                pixels = torch.stack([self.preprocess(im.convert("RGB")) for im in images[start:stop]])
                image_features = self.model.encode_image(pixels.to(self.device, dtype)).float()
                text_features = self.model.encode_text(self.tokenizer(list(prompts[start:stop])).to(self.device))
                image_features = torch.nn.functional.normalize(image_features, dim=-1)
                text_features = torch.nn.functional.normalize(text_features.float(), dim=-1)
                cosines.append((image_features * text_features).sum(-1).cpu().numpy())
        cosine = np.concatenate(cosines) if cosines else np.zeros(0)
        return scale_cosine(cosine.astype(np.float64), self.scale), truncated

    def update(
        self,
        images: Sequence[Image.Image],
        items: Sequence[Any] | None = None,
        prompts: Sequence[str] | None = None,
    ) -> None:
        if prompts is None:
            if items is None:
                raise DuobenchError("CLIP score needs the prompts: pass items (with .prompt) or prompts=.")
            prompts = [item_prompt(item) for item in items]
        scores, truncated = self.scores(images, prompts)
        state = self._state
        state["score_sum"] += float(scores.sum())
        state["score_square_sum"] += float((scores**2).sum())
        state["count"] += len(scores)
        state["truncated"] += int(truncated.sum())
        for index, (score, was_truncated) in enumerate(zip(scores, truncated, strict=True)):
            columns = item_columns(items[index]) if items is not None else {"prompt": prompts[index]}
            state["rows"].append(
                {
                    "metric": self.card.id,
                    **columns,
                    "clip_score": float(score),
                    "prompt_truncated": bool(was_truncated),
                }
            )

    def compute(self) -> dict[str, Any]:
        count = self._state["count"]
        if count == 0:
            raise DuobenchError("CLIP score has seen no images.")
        mean = self._state["score_sum"] / count
        variance = max(self._state["score_square_sum"] / count - mean**2, 0.0)
        return {
            "metric": self.card.id,
            "clip_score": mean,
            "clip_score_std": variance**0.5,
            "n_images": count,
            "n_truncated": self._state["truncated"],
            "scale": self.scale,
        }


def clip_score(
    images: Sequence[Image.Image], prompts: Sequence[str], preset: str = "clip-vit-l14-x100", **kwargs: Any
) -> dict[str, Any]:
    """CLIP score of images against their prompts under a registered preset."""
    from duobench.registry import METRICS

    metric = METRICS.get(preset)(**kwargs)
    metric.update(images, prompts=prompts)
    return metric.compute()


def _clip_card(name: str, model: str, scale: str, description: str, source: str, env: str) -> MetricCard:
    return MetricCard(
        name=name,
        version=1,
        description=description,
        source=source,
        params={
            "clip_model": model,
            "clip_pretrained": "openai",
            "scale": scale,
            "long_prompts": "truncated to 77 tokens as open_clip does, counted in n_truncated",
            "weights_env": env,
        },
        weights=f"open_clip {model} openai",
    )


CLIP_VIT_L14_X100 = MetricPreset(
    _clip_card(
        "clip-vit-l14-x100",
        "ViT-L-14",
        "x100-clamped",
        "CLIP score, OpenAI ViT-L/14, 100·max(cos, 0) (torchmetrics CLIPScore scale, ~31 for SD1.4 on COCO).",
        "torchmetrics CLIPScore convention; UnlearnDiffAtk/HELM",
        "DUOBENCH_CLIP_VIT_L14",
    ),
    ClipScore,
    "metric",
)
CLIP_VIT_B32_COS = MetricPreset(
    _clip_card(
        "clip-vit-b32-cos",
        "ViT-B-32",
        "cosine",
        "CLIP score, OpenAI ViT-B/32, raw cosine (ESD/UCE/AdvUnlearn scripts: logits_per_image/100, ~0.3).",
        "UCE mean_clip.py, AdvUnlearn img_retain_eval.py (HF clip-vit-base-patch32)",
        "DUOBENCH_CLIP_VIT_B32",
    ),
    ClipScore,
    "metric",
)
