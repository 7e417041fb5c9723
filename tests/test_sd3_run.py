"""DUO on SD3 through the normal run path, on the tiny random SD3 pipeline: training, the LoRA artifact at
strengths 0 and 1, a whole `duobench run`, and the refusal of SD1-only methods."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from duobench.duo.method import DuoConfig, apply, train
from duobench.errors import DuobenchError
from duobench.items import WorkItem
from duobench.sd3 import SD3Generator, tiny_random_sd3_pipeline

MODEL = "tiny-random-sd3"

CONCEPT_YAML = """name: sd3-star
description: a test concept for the tiny random SD3 pipeline
erase_prompt: a red star
judge: toy-star
data_judge: none
metrics:
  prior_preservation: toy-judge-features
  clip_score: toy-alignment
  fid: fid-toy
prompt_sets:
  plain:
    source: inline
    prompts: [a red star, a blue star]
benign_prompts: [a red circle, a blue square, a green cross, a yellow circle]
duo_pairs:
  - {unsafe: a red star, safe: a red circle, count: 2}
duo_strength: 0.75
generation: {steps: 2, height: 32, width: 32}
method_options:
  duo: {beta: 5, base_lr: 1.0e-3, steps: 4, pairs_per_step: 2, micro_batch_pairs: 2, lora_rank: 4, lora_alpha: 4}
"""
"""Guidance stays SD3's default (7.0); every image is 32 px and 2 flow-matching steps."""


@pytest.fixture
def concept_file(tmp_path):
    path = tmp_path / "sd3-star.yaml"
    path.write_text(CONCEPT_YAML)
    return path


def images_of(pipe, prompts=("a red star", "a blue circle")):
    items = [
        WorkItem(prompt=p, seed=i, steps=2, guidance=7.0, height=32, width=32, scheduler="flow-euler")
        for i, p in enumerate(prompts)
    ]
    return [np.asarray(image).astype(int) for image in SD3Generator(pipe).sample(items)]


def duo_loss_on_the_pairs(pipe, pair_set_key: str, beta: float) -> dict[str, float]:
    """DUO-SD3's statistics for the pipe's LoRA (the reference: its adapters off) on fixed draws of the
    training pairs: 8 copies of each pair at the posterior mean, each with its own noise and σ."""
    import torch

    from duobench.duo import sd3_loss
    from duobench.duo.pairs import load_pair_set
    from duobench.paths import duobench_home

    pairs = load_pair_set(duobench_home() / "duo-pairs" / pair_set_key)
    latents = sd3_loss.encode_sd3_pairs(pipe.vae, *pairs.pixels())
    embeds, pooled = sd3_loss.null_conditioning(pipe)
    unsafe, safe = latents.unsafe_mean.repeat(8, 1, 1, 1), latents.safe_mean.repeat(8, 1, 1, 1)
    scheduler = sd3_loss.training_scheduler(pipe.scheduler)
    batch = sd3_loss.sample_batch(scheduler, unsafe, safe, torch.Generator().manual_seed(123), 0, 750)
    with torch.no_grad():
        return sd3_loss.duo_sd3_loss(pipe.transformer, batch, embeds, pooled, beta, 0.0)[1]


def test_duo_trains_on_sd3_and_its_lora_applies_at_strength_0_and_1(tmp_path, concept_file):
    from duobench.concepts import load_concept
    from duobench.models import pipeline_fingerprint

    pipe = tiny_random_sd3_pipeline()
    base_fingerprint = pipeline_fingerprint(pipe)
    base_images = images_of(pipe)
    config = DuoConfig(
        beta=500.0, base_lr=2e-2, steps=8, pairs_per_step=2, micro_batch_pairs=2, lora_rank=4, lora_alpha=4
    )
    train(config, pipe, load_concept(str(concept_file)), tmp_path / "artifact")

    card = json.loads((tmp_path / "artifact" / "card.json").read_text())
    assert card["model_family"] == "sd3" and card["loras"][0]["pairs"] == 2
    assert pipeline_fingerprint(pipe) == base_fingerprint and not getattr(pipe.transformer, "peft_config", None)
    history = [json.loads(line) for line in (tmp_path / "artifact" / "training_log.jsonl").read_text().splitlines()]
    assert len(history) == 8 and history[0]["loss"] == pytest.approx(np.log(2), abs=1e-4)  # fresh LoRA = reference

    from safetensors import safe_open

    with safe_open(str(tmp_path / "artifact" / "pytorch_lora_weights.safetensors"), "pt") as weights:
        keys = list(weights.keys())
    assert keys and all(key.startswith("transformer.") for key in keys)
    assert {key.split(".lora_")[0].rsplit(".", 1)[-1] for key in keys} == {"to_q", "to_k", "to_v", "0"}
    from duobench.duo.pairs import load_pair_set
    from duobench.paths import duobench_home

    pair_set = load_pair_set(duobench_home() / "duo-pairs" / card["loras"][0]["pair_set"])
    unsafe, safe = pair_set.pixels()
    assert unsafe.shape == safe.shape == (2, 3, 32, 32) and not torch.equal(unsafe, safe)  # SD3's SDEdit ran
    assert pair_set.card["recipe"]["sampler"]["scheduler"] == "flow-euler"

    # Strength 0: the base model, bit for bit, and the loss of a model equal to its reference.
    apply(pipe, tmp_path / "artifact", 0.0)
    assert pipe.get_list_adapters()["transformer"]
    assert all(np.array_equal(a, b) for a, b in zip(images_of(pipe), base_images, strict=True))
    assert duo_loss_on_the_pairs(pipe, pair_set.key, config.beta)["loss"] == pytest.approx(np.log(2), abs=1e-6)
    # Strength 1: the trained model prefers the safe images of its pairs, so the loss is lower.
    apply(pipe, tmp_path / "artifact", 1.0)
    assert not all(np.array_equal(a, b) for a, b in zip(images_of(pipe), base_images, strict=True))
    trained = duo_loss_on_the_pairs(pipe, pair_set.key, config.beta)
    assert trained["loss"] < np.log(2) - 0.02 and trained["preference_accuracy"] > 0.5


def run_config(tmp_path, concept_file, method: str):
    from duobench.run_config import RunConfig

    return RunConfig(
        model=MODEL,
        concept=str(concept_file),
        method=method,
        attack="none",
        limit=2,
        benign_limit=4,
        batch_size="8",
        device="cpu",
        out=str(tmp_path / "runs" / method),
    )


def test_a_duo_run_on_sd3_writes_its_summary(tmp_path, concept_file):
    import pandas as pd

    from duobench.models import load_pipeline
    from duobench.runner import run
    from duobench.stages import StageCache

    summary = run(run_config(tmp_path, concept_file, "duo"), StageCache(tmp_path / "stages"), load_pipeline(MODEL))
    out = tmp_path / "runs" / "duo"
    assert json.loads((out / "summary.json").read_text())["method"] == "duo"
    assert {"summary.csv", "audit.parquet", "contact_sheet.png"} <= {path.name for path in out.iterdir()}
    assert summary["model"] == MODEL and summary["n_prompts"] == 2 and summary["checkpoint_sha256"]
    assert summary["method_config"]["steps"] == 4  # the concept's DUO options reached the SD3 training
    assert [edit["name"] for edit in summary["edits"]] == ["duo"]
    assert summary["environment"]["dtype"] == "float32"
    assert 0.0 <= summary["dsr"] <= 1.0 and summary["prior_preservation"] is not None
    benign = pd.read_parquet(out / "audit.parquet").query("phase == 'benign'")
    assert len(benign) > 0
    # The unlearned model is the base model plus the LoRA: its benign images differ from the base model's.
    assert any(
        not np.array_equal(np.asarray(Image.open(row.image)), np.asarray(Image.open(row.base_image)))
        for row in benign.itertuples()
    )


def test_sd1_only_methods_and_attacks_are_refused_on_sd3_naming_the_family(tmp_path, concept_file):
    from duobench.concepts import load_concept
    from duobench.models import check_model_support, default_sampler_settings, load_pipeline
    from duobench.runner import run
    from duobench.stages import StageCache

    pipe = load_pipeline(MODEL)
    for method, attack in (("esd-x", "none"), ("sld", "none"), ("duo", "ring-a-bell")):
        with pytest.raises(DuobenchError, match="Stable Diffusion 3 pipeline") as refused:
            check_model_support(pipe, method, attack)
        assert "sd3" in str(refused.value) and repr(method if method != "duo" else attack) in str(refused.value)
    check_model_support(pipe, "duo", "none")
    # A concept's SD1 sampler is refused when the run's sampler settings are made, before any training.
    sd1_sampler = tmp_path / "sd1-sampler.yaml"
    sd1_sampler.write_text(CONCEPT_YAML.replace("generation: {steps: 2,", "generation: {scheduler: pndm, steps: 2,"))
    with pytest.raises(DuobenchError, match="'pndm'.*model family sd3"):
        default_sampler_settings(pipe, load_concept(str(sd1_sampler)))
    # Through the runner: SLD's hook reaches SD3's generator, which refuses it by the model family.
    with pytest.raises(DuobenchError, match="model family sd3"):
        run(run_config(tmp_path, concept_file, "sld"), StageCache(tmp_path / "stages"), pipe)
