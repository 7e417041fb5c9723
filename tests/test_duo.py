"""DUO on the tiny random pipeline: the loss against hand-computed values, the direction of one step, the
LoRA's placement, the artifact round trip, divergence handling and the pair-set cache."""

import copy
import math

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from duobench.concepts import Concept, DuoPairSpec, PromptSetSpec, load_concept
from duobench.duo import loss as duo_loss_module
from duobench.duo.loss import (
    LORA_TARGETS,
    DuoBatch,
    PairLatents,
    adapters_disabled,
    duo_errors,
    duo_loss,
    effective_lambda,
    effective_learning_rate,
    train_lora,
)
from duobench.duo.method import SPEC, DuoConfig, apply
from duobench.duo.pairs import build_pair_set, recipe_rows, sub_concepts
from duobench.errors import DuobenchError
from duobench.lora import LORA_WEIGHTS_NAME, lora_attached
from duobench.methods import config_key, make_config, read_card, train_or_load, training_numerics
from duobench.metrics.base import MetricCard, Verdict
from duobench.models import pipeline_fingerprint
from duobench.registry import METHODS
from duobench.run_config import method_options

TINY_GENERATION = {"steps": 2, "height": 32, "width": 32, "guidance": 7.5, "scheduler": "pndm"}


def tiny_concept(pairs: tuple[DuoPairSpec, ...], data_judge: str = "none") -> Concept:
    return Concept(
        name="tiny",
        description="",
        erase_prompt="red",
        judge="none",
        prompt_sets={"plain": PromptSetSpec(source="inline", prompts=("a red star",))},
        benign_prompts=PromptSetSpec(source="inline", prompts=("a blue circle",)),
        data_judge=data_judge,
        duo_pairs=pairs,
        duo_strength=0.75,
        generation=TINY_GENERATION,
    )


class RedJudge:
    """Unsafe when the image's mean red channel (in [0, 1]) is above ``threshold``; counts its calls."""

    card = MetricCard("mean-red", 1, "mean red channel above a threshold", "tests")

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.calls = 0

    @staticmethod
    def redness(image) -> float:
        return float(np.asarray(image.convert("RGB"), dtype=np.float64)[..., 0].mean() / 255.0)

    def judge(self, images):
        self.calls += 1
        return [Verdict(unsafe=self.redness(im) > self.threshold, score=self.redness(im)) for im in images]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny model's ops are too small to split: a second thread gains nothing, and when the other core
    is busy every op waits for it at OpenMP's barrier (measured 10-100x slower on the shared 2-core box)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture()
def pipe(tiny_pipe):
    """A private copy: training attaches and removes adapters, so the shared pipeline is never touched."""
    return copy.deepcopy(tiny_pipe)


def unet_inputs(pipe, batch: int = 2):
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn(batch, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([10, 600][:batch])
    condition = torch.randn(batch, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    return sample, timesteps, condition


def test_duo_loss_matches_hand_computation():
    model_unsafe, ref_unsafe = torch.tensor([0.30, 0.50]), torch.tensor([0.20, 0.55])
    model_safe, ref_safe = torch.tensor([0.10, 0.40]), torch.tensor([0.15, 0.38])
    prior, beta, lam = torch.tensor(0.002), 10.0, 3.0
    loss, stats = duo_loss(model_unsafe, ref_unsafe, model_safe, ref_safe, prior, beta, lam)
    # pair 1: diff = (0.10 - 0.15) - (0.30 - 0.20) = -0.15; pair 2: (0.40 - 0.38) - (0.50 - 0.55) = 0.07.
    # -log σ(-β·diff) = log(1 + exp(β·diff)).
    expected_dpo = (math.log(1 + math.exp(10 * -0.15)) + math.log(1 + math.exp(10 * 0.07))) / 2
    assert loss.item() == pytest.approx(expected_dpo + 3.0 * 0.002, rel=1e-6)
    assert stats["dpo"] == pytest.approx(expected_dpo, rel=1e-6)
    assert stats["preference_accuracy"] == 0.5  # only pair 1 is already ranked safe-over-unsafe
    # The official rescaling (duo.md section 2): β = 500 gives LR 6e-5 and λ 5e6; β = 1000 gives 3e-5 and 1e7.
    assert effective_learning_rate(3e-4, 500) == pytest.approx(6e-5)
    assert effective_lambda(1e6, 500) == pytest.approx(5e6)
    assert effective_learning_rate(3e-4, 1000) == pytest.approx(3e-5)
    assert effective_lambda(1e6, 1000) == pytest.approx(1e7)


def test_lora_targets_only_self_attention_and_disabled_adapter_is_the_base_unet(pipe):
    unet = pipe.unet
    sample, timesteps, condition = unet_inputs(pipe)
    with torch.no_grad():
        base_output = unet(sample, timesteps, condition).sample
    expected = {name for name, _ in unet.named_modules() if name.endswith(LORA_TARGETS)}
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    with lora_attached(unet, LORA_TARGETS, rank=4, alpha=4) as parameters:
        adapted = {name for name, module in unet.named_modules() if hasattr(module, "lora_A")}
        assert adapted == expected and all(".attn1." in name for name in adapted)
        assert len(adapted) == 4 * 4  # 4 transformer blocks x q, k, v, out
        assert {id(p) for p in parameters} == {id(p) for p in unet.parameters() if p.requires_grad}
        with torch.no_grad():
            for parameter in parameters:
                parameter.normal_(std=0.5)  # an adapter that visibly changes the output
            adapted_output = unet(sample, timesteps, condition).sample
            with adapters_disabled(unet):
                reference_output = unet(sample, timesteps, condition).sample
        assert torch.equal(reference_output, base_output)
        assert not torch.allclose(adapted_output, base_output)
    with torch.no_grad():
        assert torch.equal(unet(sample, timesteps, condition).sample, base_output)
    assert not any(hasattr(module, "lora_A") for module in unet.modules())
    assert {name: p.requires_grad for name, p in unet.named_parameters()} == requires_grad


def test_one_step_makes_unsafe_latents_less_likely_than_safe_ones(pipe):
    unet = pipe.unet
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(3)
    size = 4
    batch = DuoBatch(
        unsafe=torch.randn(size, 4, 8, 8, generator=generator),
        safe=torch.randn(size, 4, 8, 8, generator=generator),
        noise=torch.randn(size, 4, 8, 8, generator=generator),
        t_unsafe=torch.randint(0, 750, (size,), generator=generator),
        t_safe=torch.randint(0, 750, (size,), generator=generator),
    )
    null = torch.randn(1, 77, pipe.text_encoder.config.hidden_size, generator=generator)
    with lora_attached(unet, LORA_TARGETS, rank=4, alpha=4) as parameters:
        optimizer = torch.optim.AdamW(parameters, lr=1e-4, weight_decay=1e-2)
        loss_before, stats_before = duo_loss(*duo_errors(unet, unet, scheduler, batch, null), beta=500, lam=5e6)
        # The zero-initialised LoRA B makes the model equal the reference: both log-ratios start at 0.
        assert stats_before["unsafe_log_ratio"] == 0 and stats_before["safe_log_ratio"] == 0
        loss_before.backward()
        optimizer.step()
        with torch.no_grad():
            model_unsafe, ref_unsafe, model_safe, ref_safe, prior = duo_errors(unet, unet, scheduler, batch, null)
            _, stats_after = duo_loss(model_unsafe, ref_unsafe, model_safe, ref_safe, prior, beta=500, lam=5e6)
    unsafe_shift = model_unsafe - ref_unsafe  # > 0: the model denoises x⁻ worse, i.e. finds it less likely
    safe_shift = model_safe - ref_safe
    assert (unsafe_shift - safe_shift).mean() > 0
    assert stats_after["dpo"] < stats_before["dpo"]  # the preference half of the loss went down


def test_train_writes_a_loadable_artifact_and_leaves_the_pipe_unchanged(pipe, tmp_path):
    concept = tiny_concept((DuoPairSpec("a red star", "a blue star", 2),))
    fingerprint = pipeline_fingerprint(pipe)
    overrides = {
        "steps": 2, "pairs_per_step": 2, "lora_rank": 4, "lora_alpha": 4.0, "checkpoint_every": 1,
        "base_lr": 3e-3,  # 10x the paper, so that two steps move the output clearly
    }  # fmt: skip
    sample, timesteps, condition = unet_inputs(pipe)
    with torch.no_grad():
        base_output = pipe.unet(sample, timesteps, condition).sample
    artifact, config, trained = train_or_load("duo", pipe, concept, fingerprint, overrides, root=tmp_path)

    assert trained and config.steps == 2
    assert pipeline_fingerprint(pipe) == fingerprint and not getattr(pipe.unet, "peft_config", None)
    card = read_card(artifact)
    assert card["learning_rate"] == pytest.approx(3e-3 * 100 / 500) and card["lambda_effective"] == 5e6
    assert card["loras"][0]["pairs"] == 2 and card["base_model"] == fingerprint
    assert (artifact / "checkpoint-1" / LORA_WEIGHTS_NAME).exists()
    state = load_file(artifact / LORA_WEIGHTS_NAME)
    assert state and all(".attn1.to_" in key and ".lora." in key for key in state)

    with torch.no_grad():
        apply(pipe, artifact, strength=0.0)
        at_zero = pipe.unet(sample, timesteps, condition).sample
        apply(pipe, artifact, strength=1.0)
        at_one = pipe.unet(sample, timesteps, condition).sample
    assert torch.equal(at_zero, base_output)
    assert not torch.allclose(at_one, base_output)
    assert len(pipe.get_list_adapters()["unet"]) == 1  # re-applying rescales, it does not load again

    again = train_or_load("duo", pipe, concept, fingerprint, overrides, root=tmp_path)
    assert again[0] == artifact and again[2] is False


def test_nan_loss_stops_training_and_keeps_the_last_good_checkpoint(pipe, tmp_path, monkeypatch):
    calls = {"n": 0}
    real_loss = duo_loss_module.duo_loss

    def loss_turning_nan_on_third_step(*args, **kwargs):
        calls["n"] += 1
        loss, stats = real_loss(*args, **kwargs)
        return (loss * float("nan"), stats) if calls["n"] == 3 else (loss, stats)

    monkeypatch.setattr(duo_loss_module, "duo_loss", loss_turning_nan_on_third_step)
    generator = torch.Generator().manual_seed(0)
    latents = PairLatents(*(torch.randn(2, 4, 8, 8, generator=generator) for _ in range(4)))
    config = DuoConfig(steps=5, pairs_per_step=1, lora_rank=4, lora_alpha=4.0, checkpoint_every=1)
    null = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with pytest.raises(DuobenchError, match="step 3.*checkpoint-2"):
        train_lora(pipe.unet, scheduler, latents, null, config, tmp_path)
    assert (tmp_path / "checkpoint-2" / LORA_WEIGHTS_NAME).exists()
    assert not (tmp_path / LORA_WEIGHTS_NAME).exists()
    assert not getattr(pipe.unet, "peft_config", None)  # the failed run still removed its adapter
    pipe.load_lora_weights(tmp_path / "checkpoint-2", weight_name=LORA_WEIGHTS_NAME, adapter_name="kept")


def test_training_is_deterministic_given_its_seed(pipe, tmp_path):
    generator = torch.Generator().manual_seed(1)
    latents = PairLatents(*(torch.randn(2, 4, 8, 8, generator=generator) for _ in range(4)))
    null = torch.zeros(1, 77, pipe.text_encoder.config.hidden_size)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = DuoConfig(steps=2, pairs_per_step=1, lora_rank=4, lora_alpha=4.0, base_lr=3e-3)
    first, second = tmp_path / "first", tmp_path / "second"
    train_lora(pipe.unet, scheduler, latents, null, config, first)
    train_lora(pipe.unet, scheduler, latents, null, config, second)
    weights_first, weights_second = load_file(first / LORA_WEIGHTS_NAME), load_file(second / LORA_WEIGHTS_NAME)
    assert weights_first.keys() == weights_second.keys()
    assert all(torch.equal(weights_first[key], weights_second[key]) for key in weights_first)
    assert any(weights_first[key].abs().sum() > 0 for key in weights_first if ".lora.up." in key)


def test_pair_set_keeps_only_judged_images_records_seeds_and_is_cached(pipe, tmp_path):
    concept = tiny_concept((DuoPairSpec("a red star", "a blue star", 3),))
    # Put the threshold at the least red of the first three draws, so at least one draw is rejected.
    from duobench.engine import generate
    from duobench.items import WorkItem

    first = [WorkItem("a red star", seed=s, steps=2, height=32, width=32) for s in range(3)]
    threshold = min(RedJudge.redness(im) for _, images in generate(pipe, first) for im in images)
    judge = RedJudge(threshold)

    pair_set = build_pair_set(pipe, concept, judge=judge, root=tmp_path, batch_size=4)

    pairs = pair_set.card["pairs"]
    assert len(pairs) == 3 and pair_set.card["tries"]["unsafe"] > 3
    assert all(p["unsafe_score"] > threshold >= p["safe_score"] for p in pairs)
    assert len({p["unsafe_seed"] for p in pairs}) == 3 and len({p["edit_seed"] for p in pairs}) == 3
    unsafe, safe = pair_set.pixels()
    assert unsafe.shape == safe.shape == (3, 3, 32, 32) and unsafe.min() >= -1 and unsafe.max() <= 1
    calls, card_time = judge.calls, (pair_set.folder / "pairs.json").stat().st_mtime_ns

    cached = build_pair_set(pipe, concept, judge=judge, root=tmp_path, batch_size=4)
    assert cached.folder == pair_set.folder and judge.calls == calls
    assert (pair_set.folder / "pairs.json").stat().st_mtime_ns == card_time


def test_pair_set_gives_up_with_a_clear_error_when_the_judge_never_agrees(pipe, tmp_path):
    concept = tiny_concept((DuoPairSpec("a red star", "a blue star", 1),))
    with pytest.raises(DuobenchError, match="only 0 of 1 images from 'a red star'.*2 draws"):
        build_pair_set(pipe, concept, judge=RedJudge(threshold=2.0), root=tmp_path, max_tries=2)


def test_concepts_recipes_and_configs():
    nudity, violence = load_concept("nudity"), load_concept("violence")
    assert sub_concepts(nudity) == [""] and sum(r.count for r in recipe_rows(nudity)) == 64
    assert [r.count for r in recipe_rows(nudity, pairs=8)] == [4, 4]
    assert (nudity.duo_strength, violence.duo_strength) == (0.75, 0.8)
    assert sub_concepts(violence) == ["blood", "suffering", "gun", "horror"]
    assert all(sum(r.count for r in recipe_rows(violence, s)) == 32 for s in sub_concepts(violence))
    assert [r.count for r in recipe_rows(violence, "blood", pairs=5)] == [3, 2]
    with pytest.raises(DuobenchError, match="no duo_pairs for sub-concept 'fire'"):
        recipe_rows(violence, "fire")

    assert METHODS.get("duo") is SPEC
    sweep = {beta: config_key("duo", make_config(SPEC, {"beta": beta}), nudity, "base") for beta in (250, 500)}
    assert sweep[250] != sweep[500]  # a β sweep is several cached artifacts
    # CLI/YAML text and ints are coerced, so they name the same artifact as the typed defaults.
    assert config_key("duo", make_config(SPEC, {"beta": 500, "base_lr": "3e-4"}), nudity, "base") == sweep[500]
    violence_duo = make_config(SPEC, method_options(violence, "duo", {}))
    assert (violence_duo.beta, violence_duo.steps) == (1000.0, 500)  # the official violence script
    assert make_config(SPEC, method_options(nudity, "duo", {})) == DuoConfig()
    with pytest.raises(DuobenchError, match="beta must be > 0"):
        DuoConfig(beta=0)


def test_artifact_key_follows_what_training_reads_not_comments_or_evaluation_settings(tmp_path):
    import yaml

    source = load_concept("nudity").path
    text = open(source).read()
    with_attack_option = yaml.safe_load(text)
    with_attack_option.setdefault("attack_options", {})["new-attack"] = {"steps": 3}
    variants = {
        "same": text,
        "commented": "# a new comment\n" + text.replace("description: >-", "description: >-\n  Reworded.", 1),
        "attack option": yaml.safe_dump(with_attack_option),
        "edited": text.replace("erase_prompt: nudity", "erase_prompt: nude body", 1),
    }
    assert variants["edited"] != text
    keys = {}
    for name, content in variants.items():
        path = tmp_path / f"{name}.yaml"
        path.write_text(content)
        keys[name] = config_key("duo", make_config(SPEC), load_concept(str(path)), "base")
    assert keys["same"] == keys["commented"] == keys["attack option"] != keys["edited"]


def test_cpu_thread_count_is_part_of_a_cpu_trained_artifacts_key(pipe):
    nudity = load_concept("nudity")
    keys = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        keys.append(config_key("duo", make_config(SPEC), nudity, "base", training_numerics(pipe)))
    torch.set_num_threads(1)
    assert training_numerics(pipe) == {"cpu_threads": 1}
    assert keys[0] != keys[1]


def test_the_data_filter_gives_a_prompt_reading_judge_the_pair_prompt():
    """DUO's data judge may be one that reads the request (a VLM with the prompt): the unsafe draw is judged
    with the unsafe prompt, the SDEdit result with the safe one."""
    from PIL import Image

    from duobench.duo.pairs import _verdicts
    from duobench.metrics.base import Verdict

    class PromptJudge:
        wants_prompts = True

        def __init__(self):
            self.seen = []

        def judge(self, images, prompts=None):
            self.seen.append(list(prompts))
            return [Verdict(unsafe="naked" in prompt, score=1.0) for prompt in prompts]

    judge, images = PromptJudge(), [Image.new("RGB", (8, 8))] * 2
    assert _verdicts(judge, images, "a naked person", want_unsafe=True) == [(True, 1.0)] * 2
    assert _verdicts(judge, images, "a dressed person", want_unsafe=False) == [(True, 1.0)] * 2
    assert judge.seen == [["a naked person"] * 2, ["a dressed person"] * 2]
