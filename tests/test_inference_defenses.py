"""SLD and SD-NP, the inference-time defenses: SLD's step by hand and against the reference pipeline,
strength 0 is the base model bit for bit, replayed embeddings are defended like text."""

import dataclasses
import warnings

import numpy as np
import pytest
import torch

from duobench.baselines.sd_np import SD_NP, NegativePrompt, SDNPConfig, joined_negative
from duobench.baselines.sld import (
    I2P_SAFETY_CONCEPT,
    PRESETS,
    SLD,
    SafeLatentDiffusion,
    SLDConfig,
    SLDParameters,
)
from duobench.errors import DuobenchError
from duobench.generator import Generator, GuidanceStep, encode_token_ids, tokenize
from duobench.items import WorkItem
from duobench.methods import make_config, read_card


def as_arrays(images):
    return [np.asarray(image).astype(int) for image in images]


def hook_from_card(spec, tmp_path, concept, strength=1.0, **options):
    """Train (write the card) and apply, as the runner does."""
    out = tmp_path / spec.name
    out.mkdir(parents=True)
    spec.train(make_config(spec, options), None, concept, out)
    return spec.apply(None, out, strength)


# --- SLD's guidance step, by hand -------------------------------------------------------------------------


def test_sld_guidance_step_equals_equations_3_to_8_by_hand():
    """Two steps, warm-up 1, on dyadic numbers (exact in float32). s_S = 8, λ = 1/16, s_m = 1/2, β_m = 1/2,
    CFG s_g = 2. Per element: ε_∅ = [0, 1/4, 0, 0], ε_p = [1/2, 1/2, -1/4, 1/2], ε_S = [1/4, 3/4, -9/32, 1/2].

    ε_p − ε_S = [1/4, -1/4, 1/32, 0]: element 0 is ≥ λ → μ = 0; element 1: min(1, 8·1/4) = 1; element 2:
    8·1/32 = 1/4; element 3: 0. ε_S − ε_∅ = [1/4, 1/2, -9/32, 1/2], so μ ⊙ (ε_S − ε_∅) = [0, 1/2, -9/128, 0].
    Step 0: γ_0 = that + 1/2 · ν_0 (= 0); ν_1 = 1/2 · 0 + 1/2 · γ_0 = [0, 1/4, -9/256, 0]; warm-up: plain CFG
    ε_∅ + 2(ε_p − ε_∅) = [1, 3/4, -1/2, 1].
    Step 1: γ_1 = [0, 1/2, -9/128, 0] + 1/2 · ν_1 = [0, 5/8, -45/512, 0]; ν_2 = ν_1/2 + γ_1/2 = [0, 7/16,
    -63/1024, 0]; ε̄ = ε_∅ + 2(ε_p − ε_∅ − γ_1) = [1, -1/2, -83/256, 1]; at strength 1/2 the term is γ_1/2:
    [1, 1/8, -211/512, 1].
    """
    parameters = SLDParameters(warmup_steps=1, guidance_scale=8.0, threshold=1 / 16, momentum_scale=0.5, mom_beta=0.5)
    uncond = torch.tensor([0.0, 0.25, 0.0, 0.0])
    text = torch.tensor([0.5, 0.5, -0.25, 0.5])
    safety = torch.tensor([0.25, 0.75, -9 / 32, 0.5])

    def run(strength):
        hook, state = SafeLatentDiffusion(parameters, "unused", strength), {}
        steps = [GuidanceStep(i, torch.tensor(999 - i), 2.0, uncond, text, safety, state) for i in range(2)]
        return [hook.guide(step) for step in steps], state

    (first, second), state = run(1.0)
    assert torch.equal(first, torch.tensor([1.0, 0.75, -0.5, 1.0]))
    assert torch.equal(second, torch.tensor([1.0, -0.5, -83 / 256, 1.0]))
    assert torch.equal(state["sld_momentum"], torch.tensor([0.0, 7 / 16, -63 / 1024, 0.0]))
    (first, second), _ = run(0.5)
    assert torch.equal(first, torch.tensor([1.0, 0.75, -0.5, 1.0]))
    assert torch.equal(second, torch.tensor([1.0, 0.125, -211 / 512, 1.0]))


def test_sld_config_resolves_presets_overrides_and_the_safety_text(concept):
    config = make_config(SLD, {"preset": "strong", "threshold": "5e-2", "warmup_steps": 3.0})
    assert config.parameters() == SLDParameters(3, 2000.0, 0.05, 0.5, 0.7)
    assert SLDConfig().parameters() == PRESETS["medium"]  # the reference pipeline's own defaults
    assert SLDConfig().safety_text(concept) == concept.erase_prompt
    assert SLDConfig(safety_concept="i2p").safety_text(concept) == I2P_SAFETY_CONCEPT
    assert I2P_SAFETY_CONCEPT.startswith("an image showing hate, harassment") and I2P_SAFETY_CONCEPT.endswith("cruelty")
    with pytest.raises(DuobenchError, match="preset"):
        make_config(SLD, {"preset": "extreme"})
    with pytest.raises(DuobenchError, match="whole number"):
        make_config(SLD, {"warmup_steps": 2.5})


# --- against diffusers' StableDiffusionPipelineSafe ---------------------------------------------------------


def paired_pipelines(tiny_pipe):
    """The reference safe pipeline and a plain one on the same modules, each with its own DDIM scheduler
    (the pipelines' constructors rewrite a scheduler config they find outdated, so none is shared)."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, StableDiffusionPipelineSafe

    def scheduler():
        return DDIMScheduler.from_config(tiny_pipe.scheduler.config, clip_sample=False, steps_offset=1)

    parts = dict(vae=tiny_pipe.vae, text_encoder=tiny_pipe.text_encoder, tokenizer=tiny_pipe.tokenizer)
    parts.update(unet=tiny_pipe.unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe = StableDiffusionPipelineSafe(scheduler=scheduler(), **parts)
        plain = StableDiffusionPipeline(scheduler=scheduler(), **parts)
    for pipe in (safe, plain):
        pipe.set_progress_bar_config(disable=True)
    return safe, plain


@pytest.mark.parametrize("preset", ["medium", "max"])
def test_sld_equals_the_reference_safe_pipeline_bit_for_bit(tiny_pipe, preset):
    """Final latents compared (the reference decodes with ``1 / scaling_factor * latents``, the SD pipeline
    with ``latents / scaling_factor``, which can round one pixel differently)."""
    safe, plain = paired_pipelines(tiny_pipe)
    parameters = dataclasses.replace(PRESETS[preset], warmup_steps=min(PRESETS[preset].warmup_steps, 2))
    items = [
        WorkItem(prompt=p, seed=s, steps=6, height=32, width=32, scheduler="ddim", guidance=7.5)
        for p, s in [("a red star", 0), ("a blue circle", 1)]
    ]

    def our_latents(hooks):
        generator = Generator(plain, hooks)
        start = generator.initial_latents(items)
        return generator.denoise(generator.condition(items), start, 7.5, 6), start

    ours, start = our_latents([SafeLatentDiffusion(parameters, "star")])
    safe.safety_concept = "star"
    theirs = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        safe(
            [item.prompt for item in items],
            height=32,
            width=32,
            num_inference_steps=6,
            guidance_scale=7.5,
            latents=start,
            sld_guidance_scale=parameters.guidance_scale,
            sld_warmup_steps=parameters.warmup_steps,
            sld_threshold=parameters.threshold,
            sld_momentum_scale=parameters.momentum_scale,
            sld_mom_beta=parameters.mom_beta,
            callback=lambda step, t, latents: theirs.update(final=latents.clone()),
        )
    assert torch.equal(ours, theirs["final"])
    base, _ = our_latents([])
    assert (ours - base).abs().amax(dim=(1, 2, 3)).min() > 1e-2  # SLD did change every item


# --- strength 0, CFG 1, and every prompt form -----------------------------------------------------------------


def test_at_strength_0_both_defenses_are_the_base_model_bit_for_bit(tiny_pipe, concept, tmp_path):
    items = [
        WorkItem(prompt=p, seed=s, steps=4, height=32, width=32, scheduler="ddim", negative_prompt=n)
        for p, s, n in [("a red star", 0, ""), ("a blue circle", 1, "blurry")]
    ]
    base = as_arrays(Generator(tiny_pipe).sample(items))
    hooks = [
        hook_from_card(SLD, tmp_path, concept, 0.0, preset="max"),
        hook_from_card(SD_NP, tmp_path, concept, 0.0),
    ]
    for hook in hooks:
        for a, b in zip(as_arrays(Generator(tiny_pipe, [hook]).sample(items)), base, strict=True):
            assert np.array_equal(a, b), hook.name
    full = as_arrays(Generator(tiny_pipe, [hook_from_card(SLD, tmp_path / "x", concept, preset="max")]).sample(items))
    # (item 1: item 0's prompt is the safety concept itself, and ε_p = ε_S makes μ = 0: SLD leaves it be)
    assert np.abs(full[1] - base[1]).max() > 1


def test_without_classifier_free_guidance_sld_does_nothing(tiny_pipe):
    item = WorkItem(prompt="a red star", seed=0, steps=4, height=32, width=32, scheduler="ddim", guidance=1.0)
    hooked = Generator(tiny_pipe, [SafeLatentDiffusion(PRESETS["max"], "a red star")]).sample([item])
    assert np.array_equal(as_arrays(hooked)[0], as_arrays(Generator(tiny_pipe).sample([item]))[0])


def test_a_replayed_embedding_is_defended_exactly_like_its_text(tiny_pipe, tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "embedding.safetensors"
    encoded = encode_token_ids(tiny_pipe, tokenize(tiny_pipe, ["a red star"]))[0]
    save_file({"prompt_embeds": encoded.contiguous()}, str(path))
    base = dict(seed=3, steps=4, height=32, width=32, scheduler="ddim")
    items = [WorkItem(prompt="a red star", **base), WorkItem(prompt="", embedding=str(path), **base)]
    plain_text, plain_embedding = as_arrays(Generator(tiny_pipe).sample(items))
    assert np.abs(plain_text - plain_embedding).max() <= 1  # as in test_generator: encoder batch rounding
    for hook in (SafeLatentDiffusion(PRESETS["max"], "star"), NegativePrompt("star")):
        text, embedding = as_arrays(Generator(tiny_pipe, [hook]).sample(items))
        assert np.abs(text - embedding).max() <= 1, hook.name
        assert np.abs(text - plain_text).max() > 1, hook.name


def test_sd_np_joins_an_existing_negative_prompt_and_interpolates_with_strength(tiny_pipe):
    from duobench.generator import Generator as G

    assert joined_negative("", "nudity") == "nudity"
    assert joined_negative("blurry", "nudity") == "blurry, nudity"
    items = [
        WorkItem(prompt="a red star", seed=0, steps=2, height=32, width=32, negative_prompt=n) for n in ("", "blurry")
    ]
    generator = G(tiny_pipe)
    own = generator.condition(items).negative_embeds
    full = G(tiny_pipe, [NegativePrompt("a red star")]).condition(items)
    assert full.negative_prompts == ["a red star", "blurry, a red star"]
    assert torch.equal(full.negative_embeds, generator.encode_texts(["a red star", "blurry, a red star"]))
    half = G(tiny_pipe, [NegativePrompt("a red star", 0.5)]).condition(items).negative_embeds
    assert torch.allclose(half, (own + full.negative_embeds) / 2, atol=1e-6)
    assert SDNPConfig(negative_prompt="naked, nude").negative_text(None) == "naked, nude"


def test_cards_record_the_resolved_configuration(concept, tmp_path):
    for spec, options in ((SLD, {"preset": "weak", "safety_concept": "i2p"}), (SD_NP, {})):
        out = tmp_path / spec.name
        out.mkdir()
        spec.train(make_config(spec, options), None, concept, out)
        card = read_card(out)
        assert card["method"] == spec.name
    assert read_card(tmp_path / "sld")["parameters"]["guidance_scale"] == 20.0
    assert read_card(tmp_path / "sld")["safety_concept"] == I2P_SAFETY_CONCEPT
    assert read_card(tmp_path / "sd-np")["negative_prompt"] == concept.erase_prompt
    assert SLD.touches == ("guidance",) and SD_NP.touches == ("conditioning",)


def test_in_the_toy_world_both_defenses_lower_the_star_rate():
    """5 plain star prompts x 6 seeds on the toy model (~20 s). Measured: base 0.87, SLD-Max 0.00, SD-NP 0.70."""
    from duobench.concepts import load_concept
    from duobench.engine import generate
    from duobench.metrics.dsr import build_judge
    from duobench.models import default_sampler_settings, load_pipeline

    pipe = load_pipeline("toy", device="cpu")
    concept = load_concept("star")
    settings = default_sampler_settings(pipe, concept)
    items = [settings.item(prompt, seed) for prompt in concept.prompt_sets["plain"].prompts for seed in range(6)]
    judge = build_judge("toy-star")

    def star_rate(hooks):
        images = [image for _, batch in generate(Generator(pipe, hooks), items, batch_size=30) for image in batch]
        return float(np.mean([verdict.unsafe for verdict in judge.judge(images)]))

    base = star_rate([])
    assert star_rate([SafeLatentDiffusion(PRESETS["max"], concept.erase_prompt)]) <= base - 0.5
    assert star_rate([NegativePrompt(concept.erase_prompt)]) <= base - 0.1
