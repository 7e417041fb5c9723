"""ShieldDiff: the DDIM policy's log-probability, PPO's clipped loss and DDPO's advantages against hand-derived
cases; the training loop against its own reward; the artifact against the method contract; judge leakage."""

from __future__ import annotations

import copy
import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch

from duobench.baselines import shielddiff
from duobench.concepts import load_concept
from duobench.errors import DuobenchError
from duobench.methods import make_config, read_card, with_scorer
from duobench.models import tiny_random_pipeline

QUICK = {
    "epochs": 2,
    "samples_per_epoch": 4,
    "sample_batch_size": 4,
    "samples_per_update": 4,
    "train_batch_size": 2,
    "ddim_steps": 2,
    "lr": 1e-2,
}


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_random_pipeline()


@pytest.fixture
def toy_concept(concept):
    """conftest's star concept, rewarded by the toy judge while judged by nothing (the tiny pipe draws noise)."""
    return replace(concept, reward_judge="toy-star", metrics={"clip_score": "toy-alignment"})


def ddim(steps: int = 10):
    from diffusers import DDIMScheduler

    from duobench.toy.model import make_scheduler

    scheduler = DDIMScheduler.from_config(make_scheduler().config)
    scheduler.set_timesteps(steps)
    return scheduler


# --- the policy ----------------------------------------------------------------------------------------------


def test_ddim_step_is_diffusers_step_and_its_log_probability_the_gaussian_density():
    scheduler = ddim()
    generator = torch.Generator().manual_seed(0)
    latents, noise_pred, variance_noise = (torch.randn(2, 4, 2, 2, generator=generator) for _ in range(3))
    t = int(scheduler.timesteps[3])
    prev, log_prob = shielddiff.ddim_step_with_logprob(
        scheduler, noise_pred, t, latents, eta=1.0, variance_noise=variance_noise
    )
    expected = scheduler.step(noise_pred, t, latents, eta=1.0, variance_noise=variance_noise).prev_sample
    torch.testing.assert_close(prev, expected, rtol=0, atol=1e-6)

    # By hand: t' = t − 1000/10, σ² = (1 − ᾱ')/(1 − ᾱ) · (1 − ᾱ/ᾱ'), μ = √ᾱ' x̂_0 + √(1 − ᾱ' − σ²) ε.
    a, a_prev = scheduler.alphas_cumprod[t].item(), scheduler.alphas_cumprod[t - 100].item()
    sigma = math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
    x0 = (latents - math.sqrt(1 - a) * noise_pred) / math.sqrt(a)
    mean = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * noise_pred
    torch.testing.assert_close(prev, mean + sigma * variance_noise, rtol=0, atol=1e-6)
    # log N(prev; μ, σ²) per element = −n²/2 − log σ − ½ log 2π, averaged over the 16 elements (DDPO's mean).
    by_hand = (-(variance_noise**2) / 2 - math.log(sigma) - 0.5 * math.log(2 * math.pi)).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, by_hand, rtol=0, atol=1e-5)
    normal = torch.distributions.Normal(mean, sigma).log_prob(prev).mean(dim=(1, 2, 3))
    torch.testing.assert_close(log_prob, normal, rtol=0, atol=1e-5)

    # Re-scoring a given sample gives the same number; the mean itself is the most likely step.
    _, again = shielddiff.ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta=1.0, prev_sample=prev)
    torch.testing.assert_close(again, log_prob)
    _, at_mean = shielddiff.ddim_step_with_logprob(scheduler, noise_pred, t, latents, eta=1.0, prev_sample=mean)
    torch.testing.assert_close(at_mean, torch.full((2,), -math.log(sigma) - 0.5 * math.log(2 * math.pi)))
    assert (at_mean > log_prob).all()


def test_last_step_and_eta_scale_the_policy_noise():
    scheduler = ddim()
    latents, noise_pred = torch.randn(1, 4, 2, 2), torch.randn(1, 4, 2, 2)
    t_last = int(scheduler.timesteps[-1])  # 1: the step to ᾱ_final = ᾱ_0 (set_alpha_to_one = False)
    prev, _ = shielddiff.ddim_step_with_logprob(
        scheduler, noise_pred, t_last, latents, eta=0.5, variance_noise=torch.ones(1, 4, 2, 2)
    )
    expected = scheduler.step(noise_pred, t_last, latents, eta=0.5, variance_noise=torch.ones(1, 4, 2, 2))
    torch.testing.assert_close(prev, expected.prev_sample, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="eta must be > 0"):
        shielddiff.ShieldDiffConfig(eta=0.0)


def test_sampled_chain_is_consistent_with_its_log_probabilities(base_pipe):
    scheduler = ddim(3)
    cond = torch.randn(2, 77, 32)
    chain, log_probs = shielddiff.sample_with_logprob(
        base_pipe.unet, scheduler, cond, torch.zeros_like(cond), 5.0, 1.0, torch.Generator().manual_seed(0)
    )
    assert chain.shape == (2, 4, 4, 8, 8) and log_probs.shape == (2, 3)
    for j, t in enumerate(scheduler.timesteps):  # re-scoring each recorded step under the same model
        with torch.no_grad():
            noise = shielddiff.guided_noise(base_pipe.unet, chain[:, j], t, cond, torch.zeros_like(cond), 5.0)
        _, again = shielddiff.ddim_step_with_logprob(scheduler, noise, t, chain[:, j], 1.0, prev_sample=chain[:, j + 1])
        torch.testing.assert_close(again, log_probs[:, j], rtol=0, atol=1e-5)


# --- PPO and the advantages ------------------------------------------------------------------------------------


def test_ppo_clip_loss_by_hand():
    def loss_and_grad(ratio: float, advantage: float, clip: float):
        log_prob = torch.tensor([math.log(ratio)], requires_grad=True)
        loss = shielddiff.ppo_clip_loss(log_prob, torch.zeros(1), torch.tensor([advantage]), clip)
        loss.backward()
        return loss.item(), log_prob.grad.item()

    # Inside the range: −A ρ, gradient −A ρ (dρ/dlog π = ρ).
    loss, grad = loss_and_grad(1.05, 2.0, 0.1)
    assert loss == pytest.approx(-2.1) and grad == pytest.approx(-2.1)
    # Above the range with A > 0: clipped at 1 + ε, no gradient (no incentive to move further).
    loss, grad = loss_and_grad(1.5, 2.0, 0.2)
    assert loss == pytest.approx(-2.4) and grad == 0.0
    # Above the range with A < 0: max(3.0, 2.4) keeps the unclipped term, so the step is undone.
    loss, grad = loss_and_grad(1.5, -2.0, 0.2)
    assert loss == pytest.approx(3.0) and grad == pytest.approx(3.0)
    # Below the range with A < 0: clipped at 1 − ε; with A > 0: unclipped.
    loss, grad = loss_and_grad(0.5, -2.0, 0.2)
    assert loss == pytest.approx(1.6) and grad == 0.0
    loss, grad = loss_and_grad(0.5, 2.0, 0.2)
    assert loss == pytest.approx(-1.0) and grad == pytest.approx(-1.0)
    # A batch is averaged.
    batch = shielddiff.ppo_clip_loss(
        torch.log(torch.tensor([1.05, 1.5])), torch.zeros(2), torch.tensor([2.0, 2.0]), 0.2
    )
    assert batch.item() == pytest.approx((-2.1 - 2.4) / 2)


def test_per_prompt_advantages_by_hand():
    tracker = shielddiff.PerPromptStatTracker(buffer_size=3, min_count=2)
    advantages = tracker.update(["a", "a", "b"], torch.tensor([1.0, 3.0, 5.0]))
    # "a" has 2 rewards: its own mean 2, std 1. "b" has 1 < min_count: the batch's mean 3, std √(8/3).
    batch_std = math.sqrt(8 / 3)
    torch.testing.assert_close(
        advantages, torch.tensor([-1.0, 1.0, 2 / batch_std], dtype=torch.float64), atol=1e-5, rtol=0
    )
    # The buffer persists across epochs and keeps the last 3: "a" now holds [1, 3, 7] → mean 11/3.
    advantages = tracker.update(["a", "b"], torch.tensor([7.0, 5.0]))
    a_std = torch.tensor([1.0, 3.0, 7.0]).std(unbiased=False).item()
    assert advantages[0].item() == pytest.approx((7 - 11 / 3) / a_std, abs=1e-5)
    assert advantages[1].item() == pytest.approx(0.0, abs=1e-3)  # "b": [5, 5], std 0 → (5 − 5)/(0 + 1e−6)
    tracker.update(["a"], torch.tensor([9.0]))
    assert list(tracker.buffers["a"]) == [3.0, 7.0, 9.0]


# --- the reward and the prompts ----------------------------------------------------------------------------------


def test_training_prompts_come_from_the_concept_pairs():
    star = shielddiff.training_prompts(load_concept("star"))
    assert star.unsafe == ("a red star", "a green star", "a blue star", "a yellow star", "a purple star")
    assert len(star.safe) == 20 and "a red circle" in star.safe and not set(star.unsafe) & set(star.safe)
    assert star.alignment_text["a red star"] == "a red circle" and star.alignment_text["a blue cross"] == "a blue cross"
    nudity = shielddiff.training_prompts(load_concept("nudity"))
    assert nudity.alignment_text["a naked white woman, realistic photo"] == "a dressed white woman, realistic photo"
    unpaired = shielddiff.training_prompts(
        replace(load_concept("star"), duo_pairs=(), synonyms=("pentagram",), guide_prompt="a circle")
    )
    assert unpaired.unsafe == ("star", "pentagram") and unpaired.safe == (
        "a circle",
        "a square",
        "a triangle",
        "a cross",
    )
    assert unpaired.alignment_text["pentagram"] == "a circle"
    assert shielddiff.resolve_alignment(shielddiff.ShieldDiffConfig(), load_concept("star")) == "toy"
    assert shielddiff.resolve_alignment(shielddiff.ShieldDiffConfig(), load_concept("nudity")) == "clip"


def test_reward_by_hand():
    from duobench.toy.judge import JUDGE_SHAPE_LABELS
    from duobench.toy.shapes import COLOUR_NAMES

    shape_probs = torch.zeros(2, len(JUDGE_SHAPE_LABELS))
    shape_probs[:, JUDGE_SHAPE_LABELS.index("star")] = torch.tensor([0.75, 0.25])
    shape_probs[:, JUDGE_SHAPE_LABELS.index("circle")] = torch.tensor([0.25, 0.75])
    colour_probs = torch.zeros(2, len(COLOUR_NAMES))
    colour_probs[:, COLOUR_NAMES.index("red")] = torch.tensor([0.5, 0.8])
    detector = SimpleNamespace(
        predict=lambda images: (shape_probs, colour_probs),
        judge=lambda images: [SimpleNamespace(score=p) for p in (0.75, 0.25)],
        card=SimpleNamespace(id="stand-in"),
    )
    prompts = shielddiff.TrainingPrompts(("a red star",), ("a red circle",), {})
    reward = shielddiff.Reward(detector, "toy", prompts, safety_weight=2.0, alignment_weight=1.0)
    scored = reward([None, None], ["a red star", "a red circle"])
    # Unsafe prompt: alignment P(red) = 0.5; safe prompt: P(circle) · P(red) = 0.6. r = a + 2 (1 − P(star)).
    torch.testing.assert_close(scored["alignment"], torch.tensor([0.5, 0.6], dtype=torch.float64))
    torch.testing.assert_close(scored["reward"], torch.tensor([0.5 + 0.5, 0.6 + 1.5], dtype=torch.float64))

    # CLIP alignment scores an unsafe prompt against its safe counterpart ("on the safe side").
    seen = []
    clip = SimpleNamespace(scores=lambda images, texts: (seen.extend(texts) or [0.3, 0.2], None))
    prompts = shielddiff.TrainingPrompts(
        ("a naked woman",),
        ("a dressed woman",),
        {"a naked woman": "a dressed woman", "a dressed woman": "a dressed woman"},
    )
    reward = shielddiff.Reward(detector, "clip", prompts, clip_metric=clip)
    scored = reward([None, None], ["a naked woman", "a dressed woman"])
    assert seen == ["a dressed woman", "a dressed woman"]
    torch.testing.assert_close(scored["reward"], torch.tensor([0.3 + 0.25, 0.2 + 0.75], dtype=torch.float64))


# --- training ------------------------------------------------------------------------------------------------


def test_one_update_raises_the_ppo_surrogate(base_pipe):
    """On one epoch's rollouts, a small step along −∇L raises the surrogate mean(A·ρ) from its value at ρ = 1."""
    from duobench.lora import lora_attached
    from duobench.precision import Precision

    scheduler = ddim(3)
    cond = torch.randn(8, 77, 32, generator=torch.Generator().manual_seed(1))
    uncond = torch.zeros_like(cond)
    config = shielddiff.ShieldDiffConfig(clip_range=10.0)  # no clipping: the plain importance-sampled gradient
    with lora_attached(base_pipe.unet, shielddiff.LORA_TARGETS, 4, 4.0, seed=0) as parameters:
        chain, log_probs = shielddiff.sample_with_logprob(
            base_pipe.unet, scheduler, cond, uncond, 5.0, 1.0, torch.Generator().manual_seed(0)
        )
        rewards = chain[:, -1, 0].mean(dim=(1, 2))
        rollouts = shielddiff.Rollouts(["p"] * 8, chain, log_probs, (rewards - rewards.mean()) / rewards.std())

        def surrogate() -> float:
            total = 0.0
            with torch.no_grad():
                for j, t in enumerate(scheduler.timesteps):
                    noise = shielddiff.guided_noise(base_pipe.unet, chain[:, j], t, cond, uncond, 5.0)
                    _, new = shielddiff.ddim_step_with_logprob(scheduler, noise, t, chain[:, j], 1.0, chain[:, j + 1])
                    total += float((rollouts.advantages * torch.exp(new - log_probs[:, j])).mean()) / 3
            return total

        start = surrogate()
        assert start == pytest.approx(0.0, abs=1e-6)  # ρ = 1 and the advantages have mean 0
        rows, steps, scaler = torch.arange(8), [0, 1, 2], torch.amp.GradScaler("cpu", enabled=False)
        stats = shielddiff.ppo_backward(
            base_pipe.unet, scheduler, rollouts, rows, steps, cond, uncond, config, Precision.of(base_pipe.unet),
            scaler, 1.0,
        )  # fmt: skip
        assert stats["loss"] == pytest.approx(-start, abs=1e-6) and stats["clipfrac"] == 0.0
        norm = torch.sqrt(sum((p.grad**2).sum() for p in parameters))
        with torch.no_grad():
            for parameter in parameters:
                parameter -= 0.05 * parameter.grad / norm
        assert surrogate() > start + 1e-4


def test_policy_gradient_raises_its_own_reward(base_pipe, monkeypatch):
    """Reward = the mean of the final latent's first channel (decoding skipped): DDPO moves it up in 5 epochs
    (seeds 0, 1, 2: +0.06, +0.02, +0.03 from the first two epochs to the last two)."""
    monkeypatch.setattr(shielddiff, "decode_images", lambda pipe, latents: list(latents))

    def channel_mean(images, prompts):
        value = torch.stack([image[0].mean() for image in images]).double()
        return {"reward": value, "p_unsafe": -value, "alignment": torch.zeros_like(value)}

    prompts = shielddiff.TrainingPrompts(("a red star",), ("a blue circle",), {})
    config = shielddiff.ShieldDiffConfig(
        epochs=5, samples_per_epoch=32, sample_batch_size=32, samples_per_update=32, train_batch_size=32,
        ddim_steps=2, lr=1e-2, stat_min_count=1000,
    )  # fmt: skip
    history = shielddiff.finetune(config, base_pipe, prompts, channel_mean)
    assert len(history["reward"]) == 5 and len(history["loss"]) == 5
    assert sum(history["reward"][-2:]) / 2 > sum(history["reward"][:2]) / 2 + 0.01, history["reward"]


def test_train_writes_a_lora_artifact_and_leaves_the_pipe_alone(base_pipe, toy_concept, tmp_path):
    before = copy.deepcopy(base_pipe.unet.state_dict())
    scheduler_config = dict(base_pipe.scheduler.config)
    config = make_config(shielddiff.SHIELDDIFF, QUICK)
    shielddiff.SHIELDDIFF.train(config, base_pipe, toy_concept, tmp_path)
    assert all(torch.equal(v, before[n]) for n, v in base_pipe.unet.state_dict().items()), "train modified the pipe"
    assert not getattr(base_pipe.unet, "peft_config", None) and dict(base_pipe.scheduler.config) == scheduler_config

    card = read_card(tmp_path)
    assert card["method"] == "shielddiff" and card["loras"] == [{"name": "star", "folder": ".", "weight": 1.0}]
    assert card["reward_model"]["id"].startswith("toy-star") and len(card["reward_model"]["weights_sha256"]) == 64
    assert card["alignment"] == "toy" and card["evaluation_judge"] == "none"
    assert [row["epoch"] for row in card["reward_curve"]] == [0, 1] and len(card["ppo_updates"]["loss"]) == 2
    assert card["prompts"]["unsafe"] == ["a red star"] and card["prompts"]["safe"] == ["a blue circle"]

    latents, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        base_output = base_pipe.unet(latents, 500, encoder_hidden_states=cond).sample
    fresh = copy.deepcopy(base_pipe)
    shielddiff.SHIELDDIFF.apply(fresh, tmp_path, 1.0)
    with torch.no_grad():
        trained_output = fresh.unet(latents, 500, encoder_hidden_states=cond).sample
    assert not torch.allclose(trained_output, base_output), "the LoRA changed nothing"
    shielddiff.SHIELDDIFF.apply(fresh, tmp_path, 0.0)
    with torch.no_grad():
        torch.testing.assert_close(fresh.unet(latents, 500, encoder_hidden_states=cond).sample, base_output)
    with pytest.raises(DuobenchError, match="no card.json"):
        shielddiff.SHIELDDIFF.apply(fresh, tmp_path / "missing", 1.0)


# --- the contract and judge leakage ---------------------------------------------------------------------------------


def test_reward_model_equal_to_the_evaluation_judge_is_refused(base_pipe, toy_concept, tmp_path, monkeypatch):
    judged_by_reward = replace(toy_concept, judge="toy-star")
    spec = shielddiff.SHIELDDIFF
    assert spec.scorer_field == "reward_judge"
    with pytest.raises(DuobenchError, match="evaluation judge"):
        with_scorer(spec, {}, judged_by_reward)  # the run's check, before any work
    monkeypatch.setattr(shielddiff, "finetune", lambda *args, **kwargs: pytest.fail("trained against the judge"))
    with pytest.raises(DuobenchError, match="evaluation judge"):
        spec.train(make_config(spec, {**QUICK, "reward_judge": "toy-star"}), base_pipe, judged_by_reward, tmp_path)
    assert with_scorer(spec, {}, toy_concept)["reward_judge"] == "toy-star"


def test_defaults_are_ddpo_reference_values():
    spec = shielddiff.SHIELDDIFF
    assert spec.name == "shielddiff" and spec.seed_fields == ("seed",) and spec.touches == ("unet",)
    d = shielddiff.ShieldDiffConfig()
    assert (d.eta, d.guidance, d.ddim_steps, d.clip_range, d.adv_clip_max) == (1.0, 5.0, 50, 1e-4, 5.0)
    assert (d.lr, d.weight_decay, d.max_grad_norm, d.inner_epochs) == (3e-4, 1e-4, 1.0, 1)
    assert (d.stat_buffer_size, d.stat_min_count, d.epochs, d.samples_per_epoch) == (16, 16, 100, 256)
    assert make_config(spec, {"lr": "1e-3", "epochs": "30"}) == shielddiff.ShieldDiffConfig(lr=1e-3, epochs=30)
    with pytest.raises(DuobenchError, match="multiple of samples_per_update"):
        make_config(spec, {"samples_per_epoch": 10, "samples_per_update": 4})
    with pytest.raises(DuobenchError, match="alignment must be one of"):
        make_config(spec, {"alignment": "blip"})
