"""The benign fine-tuning attack: it returns an edit that changes the attacked system and nothing else, the
edit comes off bit for bit, a full run samples the attack phase from the attacked system and the pre-attack
phase from the unlearned one, and an attack that changes the model it was handed fails the run."""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from duobench.attacks.base import Budget
from duobench.attacks.finetune import Finetune, FinetuneConfig, read_caption_folder
from duobench.attacks.run import make_attack, run_edit_attack
from duobench.concepts import load_concept
from duobench.engine import generate
from duobench.errors import DuobenchError
from duobench.generator import Generator
from duobench.items import SamplerSettings
from duobench.metrics.base import MetricCard, Verdict
from duobench.models import load_pipeline, pipeline_fingerprint, tiny_random_pipeline
from duobench.registry import ATTACKS

SETTINGS = SamplerSettings(steps=4, height=32, width=32, scheduler="ddim", guidance=5.0)
SMALL = {"images": 4, "batch_size": 2, "lr": 1e-2}


class SafeJudge:
    """Calls everything safe: the fine-tune never asks the judge, but white-box access requires one."""

    card = MetricCard("test-safe", 1, "always safe", "tests")

    def judge(self, images):
        return [Verdict(unsafe=False, score=0.0) for _ in images]


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline("toy", device="cpu")


def sample(generator: Generator, prompts: list[str]) -> np.ndarray:
    items = [SETTINGS.item(prompt, seed) for seed, prompt in enumerate(prompts)]
    return np.stack([np.asarray(image) for _, images in generate(generator, items) for image in images])


def test_finetune_edit_changes_the_attacked_system_and_comes_off_bit_for_bit(toy_pipe, tmp_path):
    concept = load_concept("star")
    before = pipeline_fingerprint(toy_pipe)
    edit = run_edit_attack(
        "finetune", concept, toy_pipe, toy_pipe, "plain", Budget(steps=4), tmp_path / "a", SafeJudge(), options=SMALL,
        settings=SETTINGS, limit=1,
    )  # fmt: skip
    assert pipeline_fingerprint(toy_pipe) == before  # trained through hooks, nothing left behind
    assert (edit.source, edit.name, edit.touches) == ("attack", "finetune", ("unet",))
    card = json.loads((edit.artifact / "card.json").read_text())
    assert card["steps"] == 4 and card["data"]["images"] == 4  # Budget.steps overrides the config's steps
    assert card["data"]["captions"] and not any("star" in caption for caption in card["data"]["captions"])

    prompts = ["a red star", "a blue circle"]
    plain = sample(Generator(toy_pipe), prompts)
    hook = edit.apply(toy_pipe)
    assert hook.name == "finetune"
    attacked = sample(Generator(toy_pipe, [hook]), prompts)
    assert np.abs(attacked.astype(int) - plain.astype(int)).max() > 0
    hook.remove()
    assert np.array_equal(sample(Generator(toy_pipe), prompts), plain)
    at_zero = Finetune.apply(toy_pipe, edit.artifact, 0.0)
    assert np.array_equal(sample(Generator(toy_pipe, [at_zero]), prompts), plain)
    at_zero.remove()
    assert pipeline_fingerprint(toy_pipe) == before

    # Deterministic on a CPU: the same seed trains the same adapters.
    again = run_edit_attack(
        "finetune", concept, toy_pipe, toy_pipe, "plain", Budget(steps=4), tmp_path / "b", SafeJudge(), options=SMALL,
        settings=SETTINGS, limit=1,
    )  # fmt: skip
    first, second = (load_file(e.artifact / "finetune.safetensors") for e in (edit, again))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_full_run_samples_the_attack_phase_from_the_attacked_system(tmp_path, toy_pipe):
    from duobench.run_config import RunConfig
    from duobench.runner import attacked_items, benign_items, judged_segments, prepare, run
    from duobench.stages import StageCache

    config = RunConfig(
        model="toy", concept="star", method="uce", attack="finetune", attack_options={**SMALL, "steps": 3},
        limit=1, benign_limit=1, batch_size="20", device="cpu", out=str(tmp_path / "run"),
    )  # fmt: skip
    stages = StageCache(tmp_path / "stages")
    summary = run(config, stages, base=toy_pipe)
    assert [edit["name"] for edit in summary["edits"]] == ["uce", "finetune"]
    assert [edit["source"] for edit in summary["edits"]] == ["method", "attack"]
    assert summary["attack_config"]["edit"]["name"] == "finetune"
    assert summary["dsr"] is not None and summary["dsr_pre_attack"] is not None

    # The same run's systems again (everything cached): which system made which image.
    context = prepare(config, stages, base=toy_pipe)
    attack_items, pre_items, _ = attacked_items(context)
    segments = {name: (system, items) for name, system, items in judged_segments(context, attack_items, pre_items)}
    attacked_system, _ = segments["attack"]
    target_system, _ = segments["pre-attack"]
    assert target_system is context.target and attacked_system is context.attacked
    assert len({context.base.fingerprint, context.target.fingerprint, context.attacked.fingerprint}) == 3
    audit = pd.read_parquet(Path(config.out) / "audit.parquet")
    stems = {phase: {Path(p).stem for p in group["image"]} for phase, group in audit.groupby("phase")}
    assert stems["benign"] <= {item.key(context.target.fingerprint) for item in benign_items(context)}
    assert stems["pre-attack"] == {item.key(context.target.fingerprint) for item in pre_items}
    assert stems["attack"] == {item.key(context.attacked.fingerprint) for item in attack_items}
    assert not stems["attack"] & stems["pre-attack"]


@dataclass(frozen=True)
class NoOptions:
    """No options."""


class MutatingAttack:
    """A model-changing attack done wrong: it edits the unlearned model's weights in place."""

    name = "test-mutating"
    access = "white-box"
    config_cls = NoOptions
    produces = "edit"
    touches = ("unet",)

    def __init__(self, config):
        self.config = config

    def prepare(self, concept, models, rows):
        self.models = models

    def make_edit(self, out_dir, budget):
        with torch.no_grad():
            next(self.models.target_pipe.unet.parameters()).add_(1.0)
        (Path(out_dir) / "card.json").write_text("{}")

    @staticmethod
    def apply(pipe, artifact_dir, strength):
        return None


def test_an_attack_that_changes_the_model_it_was_handed_fails_the_run(tiny_pipe, tmp_path, monkeypatch):
    monkeypatch.setitem(ATTACKS._entries, "test-mutating", MutatingAttack)
    target = tiny_random_pipeline()  # its own copy: this attack ruins it
    with pytest.raises(DuobenchError, match="changed the unlearned model"):
        run_edit_attack(
            "test-mutating", load_concept("star"), target, tiny_pipe, "plain", None, tmp_path, SafeJudge(),
            settings=SETTINGS, limit=1,
        )  # fmt: skip
    assert not (tmp_path / "test-mutating").exists() or not any((tmp_path / "test-mutating").rglob("card.json"))


def test_caption_folder_format_and_its_errors(tiny_pipe, tmp_path):
    folder = tmp_path / "data"
    with pytest.raises(DuobenchError, match="does not exist"):
        make_attack("finetune", {"data": str(folder)})
    folder.mkdir()
    with pytest.raises(DuobenchError, match="no images"):
        read_caption_folder(folder)
    for index, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (48, 40), colour).save(folder / f"{index}.png")
    with pytest.raises(DuobenchError, match="no caption file"):
        read_caption_folder(folder)
    (folder / "0.txt").write_text("a red square\n")
    (folder / "1.txt").write_text("  ")
    with pytest.raises(DuobenchError, match="empty"):
        read_caption_folder(folder)
    (folder / "1.txt").write_text("a blue square")
    assert [(p.name, c) for p, c in read_caption_folder(folder)] == [
        ("0.png", "a red square"),
        ("1.png", "a blue square"),
    ]

    # A full-mode fine-tune on the folder (images cropped and resized to the run's size).
    edit = run_edit_attack(
        "finetune", load_concept("star"), tiny_pipe, tiny_pipe, "plain", Budget(steps=2), tmp_path / "cache",
        SafeJudge(), options={"data": str(folder), "mode": "full", "batch_size": 2}, settings=SETTINGS, limit=1,
    )  # fmt: skip
    card = json.loads((edit.artifact / "card.json").read_text())
    assert card["data"]["images"] == 2 and card["data"]["source"] == str(folder.resolve())
    assert card["adapter_parameters"] > 0 and np.isfinite(card["final_loss"])


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="mode"):
        FinetuneConfig(mode="qlora")
    with pytest.raises(ValueError, match="steps"):
        FinetuneConfig(steps=0)


def test_modular_deployment_trains_on_the_original_model_whatever_the_unlearned_one(toy_pipe, tmp_path):
    concept = load_concept("star")
    unlearned = load_pipeline("toy", device="cpu")
    with torch.no_grad():
        unlearned.unet.conv_in.weight.add_(0.05)  # any other model: the "unlearned" one

    def adapters(target, deployment: str, folder: str) -> dict:
        edit = run_edit_attack(
            "finetune", concept, target, toy_pipe, "plain", Budget(steps=3), tmp_path / folder, SafeJudge(),
            options={**SMALL, "deployment": deployment}, settings=SETTINGS, limit=1,
        )  # fmt: skip
        return load_file(edit.artifact / "finetune.safetensors")

    modular, modular_on_base = adapters(unlearned, "modular", "m"), adapters(toy_pipe, "modular", "b")
    direct = adapters(unlearned, "direct", "d")
    assert all(torch.equal(modular[k], modular_on_base[k]) for k in modular)  # the unlearned model is not seen
    assert any(not torch.equal(modular[k], direct[k]) for k in modular)  # direct trains through it
    with pytest.raises(ValueError, match="deployment must be one of"):
        FinetuneConfig(deployment="sequential")
