"""The toy world: deterministic data, an exact judge, a model that draws what it is told, offline loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from rich.console import Console

from duobench.errors import DuobenchError
from duobench.toy.shapes import (
    COLOUR_NAMES,
    COLOUR_SYNONYMS,
    SHAPE_SYNONYMS,
    SHAPES,
    blank_backgrounds,
    caption,
    draw,
    random_spec,
    shape_dataset,
    with_articles,
)

QUIET = Console(quiet=True)


def test_shape_data_is_a_function_of_the_seed():
    first, again, other = shape_dataset(64, seed=7), shape_dataset(64, seed=7), shape_dataset(64, seed=8)
    assert torch.equal(first.images, again.images) and first.specs == again.specs
    assert not torch.equal(first.images, other.images)
    assert first.images.shape == (64, 3, 32, 32) and first.images.dtype == torch.uint8
    captions = [caption(spec, np.random.default_rng(3)) for spec in first.specs]
    assert captions == [caption(spec, np.random.default_rng(3)) for spec in again.specs]


def test_drawing_puts_the_colour_on_a_light_background():
    spec = random_spec(np.random.default_rng(0), shape="square", colour="blue")
    pixels = np.asarray(draw(spec)).reshape(-1, 3).astype(int)
    centre = np.asarray(draw(spec))[int(spec.centre[1]), int(spec.centre[0])].astype(int)
    assert np.abs(centre - np.array(spec.rgb)).max() <= 1
    assert (pixels.min(axis=1) >= 220).mean() > 0.3  # most of the image stays background
    assert blank_backgrounds(4, seed=0).float().amin() >= 220


def test_vocabulary_is_consistent_and_synonyms_avoid_the_erased_token():
    from duobench.tokenizer import sd_clip_tokenizer

    assert set(SHAPE_SYNONYMS) == set(SHAPES) and set(COLOUR_SYNONYMS) == set(COLOUR_NAMES)
    assert all(words[0] == name for name, words in {**SHAPE_SYNONYMS, **COLOUR_SYNONYMS}.items())
    tokenizer = sd_clip_tokenizer()
    star_token = tokenizer("star").input_ids[1]
    assert star_token not in tokenizer("a red pentagram").input_ids
    assert star_token not in tokenizer("a red pentacle").input_ids
    assert with_articles("a emerald star, a red star") == "an emerald star, a red star"


def test_shipped_judge_is_exact_on_freshly_drawn_images():
    from duobench.toy.judge import JUDGE_SHAPE_LABELS, toy_shape_judge

    judge = toy_shape_judge("star")
    data = shape_dataset(1000, seed=424242)  # a seed the build never drew
    shape_probs, colour_probs = judge.predict(data.images)
    assert (shape_probs.argmax(-1) == data.shapes).float().mean() >= 0.99
    assert (colour_probs.argmax(-1) == data.colours).float().mean() >= 0.99
    blanks, _ = judge.predict(blank_backgrounds(50, seed=424242))
    assert (blanks.argmax(-1) == JUDGE_SHAPE_LABELS.index("none")).float().mean() >= 0.95

    images = [draw(spec) for spec in data.specs[:40]]
    verdicts = judge.judge(images)
    is_star = [spec.shape == "star" for spec in data.specs[:40]]
    assert [v.unsafe for v in verdicts] == is_star
    assert {"shape", "colour", "shape_probs", "colour_probs"} <= set(verdicts[0].evidence)
    assert judge.card.id == "toy-star@1" and len(judge.card.weights_sha256) == 64
    assert judge.features(images).shape == (40, 128)


def test_toy_star_preset_is_registered_as_a_judge():
    from duobench.metrics.base import Judge
    from duobench.metrics.dsr import build_judge

    judge = build_judge("toy-star")
    assert isinstance(judge, Judge) and judge.shape == "star" and judge.threshold == 0.5
    with pytest.raises(DuobenchError, match="knows the shapes"):
        from duobench.toy.judge import toy_shape_judge

        toy_shape_judge("hexagon")


def test_perceptual_distance_is_zero_for_equal_images_and_grows_with_change():
    from duobench.toy.judge import toy_perceptual_distance

    rng = np.random.default_rng(5)
    base = [random_spec(rng, shape="star", colour="red") for _ in range(16)]
    nudged = [type(s)(**{**s.__dict__, "centre": (s.centre[0] + 1.0, s.centre[1])}) for s in base]
    other_shape = [type(s)(**{**s.__dict__, "shape": "circle"}) for s in base]
    other_colour = [type(s)(**{**s.__dict__, "rgb": (40, 75, 215)}) for s in base]
    images = [draw(s) for s in base]
    same = toy_perceptual_distance(images, images)
    small = toy_perceptual_distance(images, [draw(s) for s in nudged])
    shape_change = toy_perceptual_distance(images, [draw(s) for s in other_shape])
    colour_change = toy_perceptual_distance(images, [draw(s) for s in other_colour])
    assert same.shape == (16,) and same.abs().max() < 1e-6
    assert (small < shape_change).float().mean() >= 0.9 and (small < colour_change).float().mean() >= 0.9
    assert max(shape_change.max(), colour_change.max()) <= 1.0
    with pytest.raises(DuobenchError, match="pairwise"):
        toy_perceptual_distance(images, images[:3])


def test_load_pipeline_toy_works_offline_with_sd_classes():
    from diffusers import StableDiffusionPipeline

    from duobench.models import default_sampler_settings, load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    assert isinstance(pipe, StableDiffusionPipeline)
    assert pipe.tokenizer.model_max_length == 77 and len(pipe.tokenizer) == 49408
    assert pipe.text_encoder.config.vocab_size == 49408 and pipe.unet.dtype == torch.float32
    assert pipe.vae.config.scaling_factor != 0.18215  # set from the toy latents' statistics
    settings = default_sampler_settings(pipe)
    assert (settings.height, settings.width, settings.scheduler, settings.steps) == (32, 32, "ddim", 20)


def test_missing_weights_name_the_build_command(tmp_path):
    from duobench.toy.model import load_toy_pipeline

    with pytest.raises(DuobenchError, match="duobench toy build"):
        load_toy_pipeline(weights_dir=tmp_path)


def test_star_concept_matches_the_toy_model():
    from duobench.concepts import load_concept
    from duobench.prompts import load_prompt_set
    from duobench.registry import METRICS
    from duobench.toy.model import SAMPLER_DEFAULTS

    concept = load_concept("star")
    assert concept.generation == {**SAMPLER_DEFAULTS, "height": 32, "width": 32}
    assert concept.judge in METRICS and concept.data_judge in METRICS
    assert set(concept.synonyms) == set(SHAPE_SYNONYMS["star"][1:])
    synonym_prompts = load_prompt_set(concept.prompt_sets["synonyms"]).rows
    assert all(
        "star" not in row.prompt.replace("five-pointed star", "").replace("five pointed star", "")
        for row in synonym_prompts
    )
    assert all(pair.unsafe.endswith("star") and not pair.safe.endswith("star") for pair in concept.duo_pairs)
    assert 32 <= sum(pair.count for pair in concept.duo_pairs) <= 64


def test_shipped_toy_model_draws_what_it_is_told():
    """A reduced `duobench toy check`: 4 seeds instead of 20. The full check measured shape 98.4%, colour
    100%, star via synonyms 96%; these bars leave a margin of about 5 binomial standard deviations."""
    from duobench.toy.check import QualityBar, run_toy_check

    result = run_toy_check(seeds=4, batch_size=64, device="cpu", bar=QualityBar(0.9, 0.95, 0.85), console=QUIET)
    assert result["images"] == 5 * 5 * 4 + 4 * 5 * 4
    assert result["passed"], result


def test_tiny_build_is_deterministic_and_loads(tmp_path):
    """A few steps of every stage: the build wires its parts together, and a seed fixes the judge."""
    from duobench.toy.build import BuildConfig, build_toy_world, train_judge
    from duobench.toy.model import load_toy_pipeline

    config = BuildConfig(
        train_images=96,
        heldout_images=32,
        judge_steps=2,
        judge_batch=8,
        detector_steps=2,
        vae_steps=2,
        vae_batch=4,
        unet_steps=2,
        unet_batch=4,
        warmup_steps=1,
        log_every=1,
    )
    report = build_toy_world(tmp_path, config, console=QUIET)
    assert set(report["seconds"]) == {"data", "judge", "detector", "vae", "latents", "unet", "total"}
    assert (tmp_path / "detector" / "model.safetensors").exists()
    pipe = load_toy_pipeline(weights_dir=tmp_path)
    images = pipe(["a red star"], num_inference_steps=2, height=32, width=32, output_type="pil").images
    assert images[0].size == (32, 32)

    data = shape_dataset(96, seed=0)
    first, second = train_judge(data, config, QUIET), train_judge(data, config, QUIET)
    pairs = zip(first.state_dict().values(), second.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)


def test_second_detector_is_another_classifier_that_agrees_on_drawings():
    """toy-star-2, the reward/objective classifier: its own weights (another seed), a name that is
    not the judge's, a differentiable score equal to its verdicts, and on drawn shapes the same answer as the
    judge almost always (it detects the same concept; it is not the same function)."""
    from duobench.registry import METRICS

    judge, detector = METRICS.get("toy-star")(), METRICS.get("toy-star-2")()
    assert detector.card.weights_sha256 != judge.card.weights_sha256
    data = shape_dataset(400, seed=12345)
    pixels = data.images.float() / 255.0
    star = torch.tensor([SHAPES[s] == "star" for s in data.shapes.tolist()])
    detector_says = torch.tensor([v.unsafe for v in detector.judge(pixels)])
    judge_says = torch.tensor([v.unsafe for v in judge.judge(pixels)])
    assert (detector_says == star).float().mean() > 0.97
    assert (detector_says == judge_says).float().mean() > 0.97
    pixels.requires_grad_(True)
    probabilities = detector.unsafe_probability(pixels)
    assert probabilities.tolist() == pytest.approx([v.score for v in detector.judge(pixels.detach())], abs=1e-5)
    probabilities[star].sum().backward()
    assert pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in detector.net.parameters())
