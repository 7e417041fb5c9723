"""The SD3 toy model: a tiny build runs, is deterministic, loads offline and samples through SD3Generator;
the flow-matching objective and the training conditioning are what SD3's are."""

from __future__ import annotations

import pytest
import torch
from rich.console import Console
from safetensors.torch import load_file

from duobench.errors import DuobenchError
from duobench.toy.sd3_build import SD3BuildConfig, build_toy_sd3, flow_matching_loss, sample_timesteps
from duobench.toy.sd3_model import NETWORKS, load_toy_sd3_pipeline, make_scheduler

QUIET = Console(quiet=True)
SHIPPED_BAR = (0.60, 0.85, 0.25)
"""(shape, colour, star via synonyms): the shipped SD3 toy model is undertrained. Its full check (20 seeds)
measured 72.4%, 91.8% and 46.0% (chance is 20% for shape and colour); the SD1 toy's bar is (0.90, 0.95, 0.85)."""
TINY = SD3BuildConfig(
    train_images=48, denoiser_steps=3, denoiser_batch=4, vae_steps=2, vae_batch=4, warmup_steps=1, log_every=1
)


def saved_weights(folder) -> dict[str, torch.Tensor]:
    weights = {}
    for network in NETWORKS:
        for path in sorted((folder / network).glob("*.safetensors")):
            weights.update({f"{network}/{name}": tensor for name, tensor in load_file(path).items()})
    return weights


def test_tiny_build_loads_samples_and_repeats_exactly(tmp_path):
    from duobench.items import WorkItem
    from duobench.models import default_sampler_settings, denoiser, pipeline_family
    from duobench.sd3 import SD3Generator

    report = build_toy_sd3(tmp_path / "a", TINY, console=QUIET)
    assert set(report["seconds"]) == {"data", "vae", "latents", "denoiser", "total"}
    assert report["parameters"]["transformer"] > 0 and report["vae"]["source"] == "sd1-toy"

    pipe = load_toy_sd3_pipeline(weights_dir=tmp_path / "a")
    assert pipeline_family(pipe) == "sd3" and denoiser(pipe) is pipe.transformer
    assert pipe.vae.config.shift_factor == pytest.approx(report["vae"]["shift_factor"], rel=1e-6)
    assert pipe.vae.config.scaling_factor == pytest.approx(report["vae"]["scaling_factor"], rel=1e-6)
    assert pipe.transformer.dtype == torch.float32 and not pipe.transformer.training
    settings = default_sampler_settings(pipe)
    assert (settings.height, settings.width, settings.scheduler, settings.steps, settings.guidance) == (
        32,
        32,
        "flow-euler",
        20,
        7.5,
    )
    items = [
        WorkItem(prompt=p, seed=s, guidance=7.5, steps=2, height=32, width=32, scheduler="flow-euler")
        for p, s in (("a red star", 0), ("a blue circle", 1))
    ]
    images = SD3Generator(pipe).sample(items)
    assert [image.size for image in images] == [(32, 32), (32, 32)]

    build_toy_sd3(tmp_path / "b", TINY, console=QUIET)
    first, again = saved_weights(tmp_path / "a"), saved_weights(tmp_path / "b")
    assert first.keys() == again.keys() and len(first) > 100
    assert all(torch.equal(first[name], again[name]) for name in first)

    # Another seed (and a VAE trained by the SD1 recipe instead of copied) gives other weights.
    other_report = build_toy_sd3(
        tmp_path / "c", SD3BuildConfig(**{**TINY.__dict__, "seed": 1, "vae": "train"}), console=QUIET
    )
    other = saved_weights(tmp_path / "c")
    assert other_report["vae"]["source"] == "train"
    assert not torch.equal(first["transformer/proj_out.weight"], other["transformer/proj_out.weight"])
    assert not torch.equal(first["vae/encoder.conv_in.weight"], other["vae/encoder.conv_in.weight"])


class ConstantVelocity(torch.nn.Module):
    """A stand-in transformer: records its inputs and predicts the velocity ``value`` everywhere."""

    def __init__(self, value: float) -> None:
        super().__init__()
        self.value = value
        self.calls: list[dict] = []

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        self.calls.append({"hidden_states": hidden_states, "timestep": timestep})
        return (torch.full_like(hidden_states, self.value),)


def test_flow_matching_loss_on_a_hand_derived_case():
    # x0 = 2, ε = −1. At σ = 0.25: x_σ = 0.75·2 + 0.25·(−1) = 1.25; at σ = 1: x_σ = ε = −1.
    # The velocity target is ε − x0 = −3 at every σ, so predicting v gives the loss (v + 3)².
    clean, noise = torch.full((2, 4, 2, 2), 2.0), torch.full((2, 4, 2, 2), -1.0)
    sigmas, timesteps = torch.tensor([0.25, 1.0]), torch.tensor([250.0, 1000.0])
    embeds, pooled = torch.zeros(2, 3, 8), torch.zeros(2, 8)
    exact = ConstantVelocity(-3.0)
    assert flow_matching_loss(exact, clean, noise, sigmas, timesteps, embeds, pooled).item() == 0.0
    noisy = exact.calls[0]["hidden_states"]
    assert torch.equal(noisy[0], torch.full((4, 2, 2), 1.25)) and torch.equal(noisy[1], torch.full((4, 2, 2), -1.0))
    assert torch.equal(exact.calls[0]["timestep"], timesteps)
    assert flow_matching_loss(ConstantVelocity(0.0), clean, noise, sigmas, timesteps, embeds, pooled).item() == 9.0
    assert flow_matching_loss(ConstantVelocity(-1.0), clean, noise, sigmas, timesteps, embeds, pooled).item() == 4.0


def test_timesteps_follow_the_shifted_logit_normal_schedule():
    scheduler = make_scheduler()
    timesteps, sigmas = sample_timesteps(scheduler, 4000, SD3BuildConfig(), torch.Generator().manual_seed(0))
    assert torch.allclose(timesteps, sigmas * 1000.0)
    assert 0.0 < sigmas.min() and sigmas.max() <= 1.0
    # The median u is 0.5; shift 3 maps s to 3s / (1 + 2s), so the median σ is 0.75, not 0.5.
    assert sigmas.median().item() == pytest.approx(0.75, abs=0.02)
    same, _ = sample_timesteps(scheduler, 4000, SD3BuildConfig(), torch.Generator().manual_seed(0))
    assert torch.equal(timesteps, same)


def test_training_conditioning_is_the_pipelines():
    from duobench.small_sd1 import small_vae
    from duobench.toy.build import CaptionTokens
    from duobench.toy.sd3_build import T5_LENGTH, encode_captions, make_text_encoders
    from duobench.toy.sd3_model import make_transformer, toy_sd3_pipeline, toy_t5_tokenizer

    torch.manual_seed(0)
    encoders = [encoder.eval() for encoder in make_text_encoders(len(toy_t5_tokenizer()))]
    pipe = toy_sd3_pipeline(make_transformer(), small_vae((16, 32, 32), 1), *encoders, make_scheduler())
    prompts = ["a red star", "", "a five-pointed star, crimson"]
    with torch.no_grad():
        embeds, pooled = encode_captions(
            *encoders, CaptionTokens(pipe.tokenizer)(prompts), CaptionTokens(pipe.tokenizer_3, T5_LENGTH)(prompts)
        )
        expected, _, expected_pooled, _ = pipe.encode_prompt(
            prompt=prompts, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert embeds.shape == (3, 77 + 77, 128) and pooled.shape == (3, 96)
    assert torch.equal(embeds, expected) and torch.equal(pooled, expected_pooled)


def test_t5_vocabulary_has_one_piece_per_caption_word():
    from duobench.toy.sd3_model import caption_words, toy_t5_tokenizer

    tokenizer = toy_t5_tokenizer()
    assert {"star", "pentagram", "five-pointed", "crimson", "photo", "an"} <= set(caption_words())
    for word in caption_words():
        assert len(tokenizer(word).input_ids) == 2, word  # the word's piece and </s>
    ids = tokenizer("a crimson pentagram, on a light background").input_ids
    assert len(ids) == 9 and tokenizer.unk_token_id not in ids  # 7 words, ",", </s>
    unseen = tokenizer("a hexagon").input_ids  # not a caption word: spelt in characters
    assert len(unseen) > 3 and tokenizer.unk_token_id not in unseen


def test_missing_weights_name_the_build_command(tmp_path):
    with pytest.raises(DuobenchError, match="duobench toy build --family sd3"):
        load_toy_sd3_pipeline(weights_dir=tmp_path)


def test_build_command_refuses_an_unknown_family():
    from typer.testing import CliRunner

    from duobench.toy.cli import toy_app

    result = CliRunner().invoke(toy_app, ["build", "--family", "sd4"])
    assert result.exit_code != 0 and "sd1 or sd3" in result.output


def test_shipped_sd3_toy_model_draws_what_it_is_told():
    """A reduced `duobench toy check --model toy-sd3`: 4 seeds instead of 20, sampled as the star-sd3 concept
    says (flow-matching Euler, 20 steps, CFG 7.5). The full check's rates are in the README."""
    from duobench.toy.check import QualityBar, run_toy_check

    result = run_toy_check(
        model="toy-sd3", seeds=4, batch_size=64, device="cpu", bar=QualityBar(*SHIPPED_BAR), console=QUIET
    )
    assert result["sampler"]["scheduler"] == "flow-euler" and result["images"] == 5 * 5 * 4 + 4 * 5 * 4
    assert result["passed"], result


def test_the_sd3_toy_model_runs_its_own_star_concept():
    """`--model toy-sd3` picks star-sd3 (the star with the SD3 toy's sampler) and refuses the SD1 toy's star."""
    from duobench.concepts import load_concept
    from duobench.models import default_sampler_settings, load_pipeline, pipeline_family
    from duobench.run_config import check_model_family, default_concept

    assert default_concept("toy-sd3") == "star-sd3"
    with pytest.raises(DuobenchError, match="--concept star-sd3"):
        check_model_family("star", "toy-sd3")
    pipe = load_pipeline("toy-sd3", device="cpu")
    assert pipeline_family(pipe) == "sd3"
    settings = default_sampler_settings(pipe, load_concept("star-sd3"))
    assert (settings.scheduler, settings.steps, settings.height) == ("flow-euler", 20, 32)
    star = load_concept("star")
    assert load_concept("star-sd3").prompt_sets == star.prompt_sets and load_concept("star-sd3").judge == star.judge


def test_duo_sd3_lowers_the_sd3_toy_models_star_rate(tmp_path):
    """The directional effect in CI: DUO-SD3 on the SD3 toy model, star-sd3's pairs and judge, 300 steps at
    base_lr 1e-4 (the README's table trains 1,000 at 3e-5): plain-star DSR rises (measured 0.53 -> 0.70)."""
    from duobench.run_config import RunConfig
    from duobench.runner import run
    from duobench.stages import StageCache

    stages = StageCache(tmp_path / "stages")
    values = dict(model="toy-sd3", concept="star-sd3", benign_limit=4, batch_size="32", device="cpu", threads=1)
    base = run(RunConfig(**values, method="none", out=str(tmp_path / "base")), stages)
    duo = run(
        RunConfig(**values, method="duo", method_options={"steps": 300, "base_lr": 1e-4}, out=str(tmp_path / "duo")),
        stages,
    )
    assert base["n_prompts"] == 25 and duo["method_config"]["t_min"] == 1  # star-sd3's SD3 recipe
    assert duo["dsr"] >= base["dsr"] + 0.1, (base["dsr"], duo["dsr"])
