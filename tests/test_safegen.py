"""SafeGen: the mosaic and its target against hand-derived cases, the training loop and artifact against the
official script and the method contract, and the data option's errors."""

from __future__ import annotations

import copy
import csv

import numpy as np
import pytest
import torch
from PIL import Image

from duobench.baselines import safegen
from duobench.concepts import Concept, PromptSetSpec
from duobench.errors import DuobenchError
from duobench.methods import make_config, read_card
from duobench.models import tiny_random_pipeline
from duobench.registry import METHODS
from duobench.toy import shapes

QUICK = {"data": "toy:star", "steps": 3, "batch_size": 2, "triplets": 4, "lr": 1e-3}


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_random_pipeline()


def base_images(pipe) -> np.ndarray:
    return pipe(
        "a red star", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images


def write_triplet_folder(folder, count: int = 3) -> None:
    """``count`` triplets of 32-px drawings with a relative-path ``meta.csv`` in the official layout."""
    triplets = safegen.render_toy_triplets("star", count, 4, seed=7)
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "meta.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow([*safegen.TRIPLET_COLUMNS, "text"])
        for index in range(count):
            names = [f"{role}_{index}.png" for role in ("nude", "mos", "norm")]
            images = (triplets.unsafe[index], triplets.mosaic[index], triplets.benign[index])
            for name, image in zip(names, images, strict=True):
                image.save(folder / name)
            writer.writerow([*names, ""])


# --- the mosaic and its target --------------------------------------------------------------------------


def test_pixelate_by_hand():
    image = (torch.arange(24, dtype=torch.uint8) * 10).view(1, 4, 6).repeat(3, 1, 1)
    # rows: [0..50], [60..110], [120..170], [180..230]; the box spans columns 1-4 and every row.
    mosaic = safegen.pixelate(image, (1, 0, 5, 4), 2)
    expected = image.clone()
    expected[:, 0:2, 1:3] = 45  # mean of 10, 20, 70, 80
    expected[:, 0:2, 3:5] = 65  # 30, 40, 90, 100
    expected[:, 2:4, 1:3] = 165  # 130, 140, 190, 200
    expected[:, 2:4, 3:5] = 185  # 150, 160, 210, 220
    assert torch.equal(mosaic, expected)
    # Cells at the box's edge are cut by it: block 3 leaves a 1-px column (4) whose cells are its own pixels.
    cut = safegen.pixelate(image, (1, 0, 5, 4), 3)
    assert torch.equal(cut[:, 3:4, 4:5], image[:, 3:4, 4:5])
    assert torch.equal(cut[:, 0:3, 1:4], torch.full((3, 3, 3), 80, dtype=torch.uint8))  # 10..30, 70..90, 130..150


def test_toy_mosaic_covers_the_star_and_nothing_else():
    rng = np.random.default_rng(3)
    for _ in range(20):
        spec = shapes.random_spec(rng, shape="star")
        pixels = shapes.images_to_tensor([shapes.draw(spec)])[0]
        x0, y0, x1, y1 = safegen.shape_box(spec)
        inside = torch.zeros(pixels.shape[1:], dtype=torch.bool)
        inside[y0:y1, x0:x1] = True
        drawn = (pixels != torch.tensor(spec.background, dtype=torch.uint8).view(3, 1, 1)).any(0)
        assert not (drawn & ~inside).any(), "part of the star lies outside its box"
        mosaic = safegen.pixelate(pixels, (x0, y0, x1, y1), 4)
        assert torch.equal(mosaic[:, ~inside], pixels[:, ~inside])
        assert not torch.equal(mosaic, pixels)
    triplets = safegen.render_toy_triplets("star", 3, 4, seed=0)
    assert len(triplets) == 3 and "toy:star" in triplets.source
    assert all(image.size == (32, 32) for image in triplets.unsafe + triplets.mosaic + triplets.benign)


def test_mosaic_targets():
    generator = torch.Generator().manual_seed(0)
    unsafe, mosaic, noise = (torch.randn(4, 4, 8, 8, generator=generator) for _ in range(3))
    alpha_bar = torch.tensor([0.99, 0.5, 0.3, 0.01])
    noisy = safegen.add_noise(unsafe, noise, alpha_bar)
    view = alpha_bar.view(-1, 1, 1, 1)

    def x0_estimate(eps):
        return (noisy - (1 - view).sqrt() * eps) / view.sqrt()

    exact = safegen.mosaic_target(unsafe, mosaic, noise, alpha_bar, "exact")
    torch.testing.assert_close(x0_estimate(exact), mosaic, atol=1e-4, rtol=1e-4)  # the mosaic at every t
    official = safegen.mosaic_target(unsafe, mosaic, noise, alpha_bar, "official")
    torch.testing.assert_close(official, noise + unsafe - mosaic)
    # The official target's x0-estimate: z_u + √((1−ᾱ)/ᾱ) (z_m − z_u), the mosaic only at ᾱ = 1/2.
    torch.testing.assert_close(x0_estimate(official), unsafe + ((1 - view) / view).sqrt() * (mosaic - unsafe))
    torch.testing.assert_close(official[1], exact[1])
    assert not torch.allclose(official[0], exact[0]) and not torch.allclose(official[3], exact[3])


def test_ema_decay_follows_diffusers_ema_model():
    assert safegen.ema_decay_at(1, 0.9999) == 0.0  # the first step copies the model
    assert safegen.ema_decay_at(2, 0.9999) == pytest.approx(2 / 11)
    assert safegen.ema_decay_at(1000, 0.9999) == pytest.approx(1000 / 1009)
    assert safegen.ema_decay_at(1000, 0.5) == 0.5
    assert safegen.ema_decay_at(5, 0.0) == 0.0


# --- the training loop ----------------------------------------------------------------------------------


def test_training_changes_only_self_attention_and_round_trips(base_pipe, concept, tmp_path):
    before = copy.deepcopy(base_pipe.unet.state_dict())
    config = make_config(safegen.SAFEGEN, QUICK)
    model, summary = safegen.finetune(config, base_pipe, concept)
    assert summary["triplets_used"] == 4 and summary["batch_size_used"] == 2
    for name, value in model.state_dict().items():
        assert safegen.is_trained(name) or torch.equal(value, before[name].float()), name
    assert any(not torch.equal(v, before[n]) for n, v in model.state_dict().items() if safegen.is_trained(n))

    safegen.SAFEGEN.train(config, base_pipe, concept, tmp_path)
    assert all(torch.equal(v, before[n]) for n, v in base_pipe.unet.state_dict().items()), "train modified the pipe"
    card = read_card(tmp_path)
    assert card["method"] == "safegen" and card["changed_tensors"] > 0 and card["config"]["mosaic_target"] == "official"
    from safetensors.torch import load_file

    delta = load_file(str(tmp_path / "unet_delta.safetensors"))
    assert delta and all(safegen.is_trained(name) for name in delta)

    fresh = copy.deepcopy(base_pipe)
    reference = base_images(fresh)
    safegen.SAFEGEN.apply(fresh, tmp_path, 1.0)
    assert not np.array_equal(base_images(fresh), reference)
    trained = {name: value for name, value in model.state_dict().items() if safegen.is_trained(name)}
    state = fresh.unet.state_dict()
    assert all(torch.allclose(state[name], value, atol=1e-6) for name, value in trained.items())
    safegen.SAFEGEN.apply(fresh, tmp_path, 0.0)
    assert np.array_equal(base_images(fresh), reference), "strength 0 is not the base model"


def test_training_is_deterministic_under_the_seed(base_pipe, concept):
    first, first_summary = safegen.finetune(make_config(safegen.SAFEGEN, QUICK), base_pipe, concept)
    again, again_summary = safegen.finetune(make_config(safegen.SAFEGEN, QUICK), base_pipe, concept)
    other, _ = safegen.finetune(make_config(safegen.SAFEGEN, {**QUICK, "seed": 1}), base_pipe, concept)
    assert first_summary == again_summary
    state, other_state = first.state_dict(), other.state_dict()
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in state.items())
    assert any(not torch.equal(value, other_state[name]) for name, value in state.items())


@pytest.mark.parametrize("target", safegen.MOSAIC_TARGETS)
def test_training_lowers_its_loss(base_pipe, concept, target):
    """On a fixed probe (triplets, timesteps, noise) the weighted loss drops after training on the same data."""
    config = make_config(safegen.SAFEGEN, {**QUICK, "steps": 30, "lr": 1e-2, "mosaic_target": target, "ema_decay": 0.0})
    latents = safegen.encode_triplets(base_pipe.vae, safegen.load_triplets(config, concept), 32)
    generator = torch.Generator().manual_seed(5)
    unsafe, mosaic, benign = latents.sample(torch.arange(4), generator)
    timesteps = torch.tensor([100, 300, 500, 700])
    noise, benign_noise = torch.randn(2, *unsafe.shape, generator=generator)
    alphas_cumprod = base_pipe.scheduler.alphas_cumprod.float()
    empty = safegen.encode_token_ids(base_pipe, safegen.tokenize(base_pipe, [""])).float()

    def probe_loss(unet) -> float:
        with torch.no_grad():
            loss, _, _ = safegen.safegen_loss(
                unet, unsafe, mosaic, benign, noise, benign_noise, timesteps, alphas_cumprod, empty, config
            )
        return float(loss)

    model, _ = safegen.finetune(config, base_pipe, concept)
    assert probe_loss(model) < 0.9 * probe_loss(base_pipe.unet)


# --- the data option ------------------------------------------------------------------------------------


def test_a_missing_data_folder_is_an_error_before_training(tmp_path, base_pipe, monkeypatch):
    with pytest.raises(DuobenchError, match="folder .*nowhere does not exist. Its data= .*meta.csv with the columns"):
        make_config(safegen.SAFEGEN, {"data": str(tmp_path / "nowhere")})
    (tmp_path / "empty").mkdir()
    with pytest.raises(DuobenchError, match="has no meta.csv"):
        make_config(safegen.SAFEGEN, {"data": str(tmp_path / "empty")})
    write_triplet_folder(tmp_path / "partial")
    (tmp_path / "partial" / "mos_1.png").unlink()
    with pytest.raises(DuobenchError, match="1 image.* do not exist .*mos_1.png"):
        make_config(safegen.SAFEGEN, {"data": str(tmp_path / "partial")})
    (tmp_path / "columns").mkdir()
    (tmp_path / "columns" / "meta.csv").write_text("image,text\na.png,\n")
    with pytest.raises(DuobenchError, match="lacks the column.*nude_image_path"):
        make_config(safegen.SAFEGEN, {"data": str(tmp_path / "columns")})
    with pytest.raises(DuobenchError, match="not 'hexagon'"):
        make_config(safegen.SAFEGEN, {"data": "toy:hexagon"})

    # Nudity makes no triplets of its own: data=auto stops before the UNet is copied or anything encoded.
    nudity = Concept(
        name="nudity",
        description="test",
        erase_prompt="nudity",
        judge="none",
        prompt_sets={},
        benign_prompts=PromptSetSpec(source="inline"),
        model_families=("sd",),
    )

    def no_training(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(safegen, "encode_triplets", no_training)
    with pytest.raises(DuobenchError, match="concept 'nudity' does not make them.*--method-opt data="):
        safegen.SAFEGEN.train(make_config(safegen.SAFEGEN), base_pipe, nudity, tmp_path / "artifact")


def test_a_data_folder_trains_and_keys_by_content(tmp_path, base_pipe, concept):
    folder = tmp_path / "triplets"
    write_triplet_folder(folder)
    config = make_config(safegen.SAFEGEN, {"data": str(folder), "steps": 2})
    assert len(config.data_sha256) == 64
    assert make_config(safegen.SAFEGEN, {"data": str(folder / "meta.csv")}).data_sha256 == config.data_sha256
    _, summary = safegen.finetune(config, base_pipe, concept)
    assert summary["triplets_used"] == 3 and summary["batch_size_used"] == 3  # fewer triplets than batch_size 5
    assert config.data_sha256 in summary["data_source"]
    Image.new("RGB", (32, 32), (255, 255, 255)).save(folder / "norm_2.png")
    changed = make_config(safegen.SAFEGEN, {"data": str(folder)})
    assert changed.data_sha256 != config.data_sha256
    with pytest.raises(DuobenchError, match="its images or meta.csv changed"):
        make_config(safegen.SAFEGEN, {"data": str(folder), "data_sha256": config.data_sha256})


def test_auto_data_is_the_toy_render_for_a_toy_shape_concept(concept):
    toy_concept = Concept(**{**concept.__dict__, "erase_prompt": "star", "model_families": ("toy",)})
    assert safegen.data_source(safegen.SafeGenConfig(), toy_concept) == "toy:star"
    with pytest.raises(DuobenchError, match="does not make them"):
        safegen.data_source(safegen.SafeGenConfig(), concept)  # no model family: not known to be the toy world


# --- the contract ---------------------------------------------------------------------------------------


def test_registered_with_the_official_defaults():
    spec = METHODS.get("safegen")
    assert spec is safegen.SAFEGEN and spec.seed_fields == ("seed",) and spec.touches == ("unet",)
    defaults = safegen.SafeGenConfig()
    assert (defaults.steps, defaults.batch_size, defaults.lr, defaults.weight_decay) == (1000, 5, 1e-5, 1e-2)
    assert (defaults.weight_mosaic, defaults.weight_preserve, defaults.max_grad_norm) == (0.1, 0.9, 1.0)
    assert (defaults.mosaic_target, defaults.ema_decay, defaults.data) == ("official", 0.9999, "auto")
    assert make_config(spec, {"lr": "3e-4", "steps": "200"}) == safegen.SafeGenConfig(lr=3e-4, steps=200)
    with pytest.raises(DuobenchError, match="mosaic_target must be one of official, exact"):
        make_config(spec, {"mosaic_target": "x0"})
