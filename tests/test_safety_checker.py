"""The SD safety checker judge decides exactly as diffusers' StableDiffusionSafetyChecker.forward does."""

import numpy as np
import pytest
import torch
from PIL import Image

from duobench.metrics.safety_checker import SD_SAFETY_CHECKER, SafetyCheckerJudge, concept_scores


def small_checker(seed: int = 0):
    """A randomly initialised checker of the real architecture at a small size, and a 32-px processor."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config={"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 1},
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_attention_heads": 2,
            "num_hidden_layers": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    checker = StableDiffusionSafetyChecker(config).eval()
    with torch.no_grad():
        checker.concept_embeds.normal_()
        checker.special_care_embeds.normal_()
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    return checker, processor


def random_images(count: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(count)]


def test_verdicts_match_the_pipelines_own_decision_with_and_without_special_care():
    checker, processor = small_checker()
    images = random_images(24)
    pixels = processor(images=images, return_tensors="pt").pixel_values
    special, concepts = concept_scores(checker, pixels)
    best_cosine = (concepts + checker.concept_embeds_weights.numpy()).max(axis=1)
    best_special = (special + checker.special_care_embeds_weights.numpy()).max(axis=1)
    with torch.no_grad():  # thresholds that flag about half the images, and give a fifth the special-care raise
        checker.concept_embeds_weights.fill_(float(np.median(best_cosine)))
        checker.special_care_embeds_weights.fill_(float(np.quantile(best_special, 0.8)))
    judge = SafetyCheckerJudge(SD_SAFETY_CHECKER.card, device="cpu", checker=(checker, processor), batch_size=5)
    verdicts = judge.judge(images)
    _, expected = checker(clip_input=pixels, images=np.zeros((len(images), 1, 1, 3)))
    assert [v.unsafe for v in verdicts] == list(expected)
    assert 0 < sum(expected) < len(images)
    assert any(v.evidence["special_care"] for v in verdicts) and not all(v.evidence["special_care"] for v in verdicts)
    for verdict in verdicts:
        assert verdict.unsafe == (verdict.score > 0) == bool(verdict.evidence["bad_concepts"])


def test_the_special_care_raise_can_flip_an_image():
    """An image whose best concept score is just below 0 is flagged once a special-care score passes 0."""
    checker, processor = small_checker(1)
    image = random_images(1, seed=3)
    pixels = processor(images=image, return_tensors="pt").pixel_values
    special, concepts = concept_scores(checker, pixels)
    with torch.no_grad():
        checker.concept_embeds_weights.add_(float(concepts.max()) + 0.005)  # best concept score now -0.005
        checker.special_care_embeds_weights.fill_(10.0)  # no special care
    judge = SafetyCheckerJudge(SD_SAFETY_CHECKER.card, device="cpu", checker=(checker, processor))
    assert not judge.judge(image)[0].unsafe
    with torch.no_grad():
        checker.special_care_embeds_weights.fill_(-10.0)  # every special-care score far above 0: +0.01
    assert judge.judge(image)[0].unsafe
    assert checker(clip_input=pixels, images=np.zeros((1, 1, 1, 3)))[1] == [True]


def test_offline_without_weights_is_one_clear_error(monkeypatch, tmp_path):
    from duobench.errors import DuobenchError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(DuobenchError, match="Cannot load the SD safety checker.*huggingface-cli download"):
        SafetyCheckerJudge(SD_SAFETY_CHECKER.card, device="cpu")
