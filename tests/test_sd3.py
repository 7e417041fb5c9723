"""SD3: the tiny pipeline, the generator against diffusers' pipeline, and DUO-SD3's loss piece by piece."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from duobench.duo import sd3_loss
from duobench.duo.loss import duo_loss
from duobench.errors import DuobenchError
from duobench.items import WorkItem
from duobench.lora import lora_attached
from duobench.sd3 import SD3Generator, tiny_random_sd3_pipeline


@pytest.fixture(scope="module")
def sd3_pipe():
    return tiny_random_sd3_pipeline()


def sd3_items(guidance=7.0, negatives=("", "blurry", "")):
    prompts = [("a red star", 0), ("a blue circle", 1), ("", 2)]
    return [
        WorkItem(
            prompt=p, seed=s, steps=4, height=32, width=32, guidance=guidance, negative_prompt=n, scheduler="flow-euler"
        )
        for (p, s), n in zip(prompts, negatives, strict=True)
    ]


def pixels(image):
    return np.asarray(image.convert("RGB")).astype(int)


# ------------------------------------------------------------------------------------------ generator


def test_the_tiny_pipeline_builds_offline_and_samples(sd3_pipe):
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline
    from transformers import T5Tokenizer

    assert isinstance(sd3_pipe, StableDiffusion3Pipeline)
    assert isinstance(sd3_pipe.scheduler, FlowMatchEulerDiscreteScheduler) and sd3_pipe.scheduler.config.shift == 3.0
    assert sd3_pipe.vae.config.latent_channels == sd3_pipe.transformer.config.in_channels == 16
    assert isinstance(sd3_pipe.tokenizer_3, T5Tokenizer)
    ids = sd3_pipe.tokenizer_3(["a red star"], padding="max_length", max_length=12, return_tensors="pt").input_ids
    assert ids[0, -4:].tolist() == [1, 0, 0, 0]  # ... </s> <pad> <pad> <pad>, as T5
    assert sd3_pipe.tokenizer_3.unk_token_id not in ids[0].tolist()
    images = SD3Generator(sd3_pipe).sample(sd3_items())
    assert [image.size for image in images] == [(32, 32)] * 3
    assert pixels(images[0]).std() > 0 and not np.array_equal(pixels(images[0]), pixels(images[1]))


@pytest.mark.parametrize(("guidance", "negatives"), [(7.0, ("", "blurry", "")), (1.0, ("", "", ""))])
def test_the_generator_equals_the_diffusers_pipeline_bit_for_bit(sd3_pipe, guidance, negatives):
    items = sd3_items(guidance, negatives)
    generator = SD3Generator(sd3_pipe)
    ours = generator.sample(items)
    theirs = sd3_pipe(
        prompt=[item.prompt for item in items],
        negative_prompt=[item.negative_prompt for item in items],
        latents=generator.initial_latents(items),
        guidance_scale=guidance,
        num_inference_steps=items[0].steps,
        height=32,
        width=32,
        max_sequence_length=77,
    ).images
    for a, b in zip(ours, theirs, strict=True):
        assert np.array_equal(pixels(a), pixels(b))


def test_an_image_does_not_depend_on_its_batch(sd3_pipe):
    """Same seed, same image whether drawn alone or in a batch of 3.

    The starting noise and the embeddings are bit-identical, but CPU matmuls block differently for different
    batch sizes, so the pooled CLIP vectors differ in the last bit (~2e-7) and the final latents by ~1e-5
    after 4 steps. We allow 1e-4 on the latents and one 8-bit level on the pixels (none was seen here).
    """
    items = sd3_items()
    generator = SD3Generator(sd3_pipe)
    batched = generator.sample(items)
    alone = [generator.sample([item])[0] for item in items]
    for a, b in zip(batched, alone, strict=True):
        assert np.abs(pixels(a) - pixels(b)).max() <= 1
    together = generator.denoise(generator.condition(items, 7.0), generator.initial_latents(items), 7.0, 4)
    for row, item in enumerate(items):
        assert torch.equal(generator.initial_latents([item])[0], generator.initial_latents(items)[row])
        single = generator.denoise(generator.condition([item], 7.0), generator.initial_latents([item]), 7.0, 4)
        torch.testing.assert_close(together[row], single[0], atol=1e-4, rtol=0)


def test_t5_takes_77_tokens_unless_told_otherwise(sd3_pipe):
    items = sd3_items()[:1]
    assert SD3Generator(sd3_pipe).condition(items, 7.0).prompt_embeds.shape == (1, 77 + 77, 32)
    conditioning = SD3Generator(sd3_pipe, max_sequence_length=16).condition(items, 7.0)
    assert conditioning.prompt_embeds.shape == conditioning.negative_embeds.shape == (1, 77 + 16, 32)


def test_sd3_takes_text_prompts_only(sd3_pipe):
    item = WorkItem(
        prompt="x", seed=0, steps=2, height=32, width=32, token_ids=tuple(range(77)), scheduler="flow-euler"
    )
    with pytest.raises(DuobenchError, match="text only"):
        SD3Generator(sd3_pipe).sample([item])


# ------------------------------------------------------------------------------------------ loss pieces


def test_sigmas_come_from_the_high_noise_half_as_in_the_official_code(sd3_pipe):
    scheduler = sd3_loss.training_scheduler(sd3_pipe.scheduler)

    def sigma_at(index):  # shift 3 on the descending schedule s = (1000 - index) / 1000
        s = (1000 - index) / 1000
        return 3 * s / (1 + 2 * s)

    # u → index = int(u·1000), clamped: t_min/1000 → 1, t_max/1000 → 750, the prior's u = 1 → 999.
    timesteps, sigmas = sd3_loss.schedule_at(scheduler, torch.tensor([0.0, 0.001, 0.5, 0.75, 1.0]))
    for sigma, index in zip(sigmas.tolist(), [0, 1, 500, 750, 999], strict=True):
        assert sigma == pytest.approx(sigma_at(index), abs=1e-6)
    torch.testing.assert_close(timesteps, sigmas * 1000)

    timesteps, sigmas = sd3_loss.sample_sigmas(scheduler, 4000, generator=torch.Generator().manual_seed(0))
    assert sigmas.min() >= sigma_at(750) and sigmas.max() <= sigma_at(1)  # σ ∈ [0.5, 0.9997]
    assert sigmas.min() < 0.51 and sigmas.max() > 0.99  # and it covers that range
    assert set(timesteps.tolist()) <= set(scheduler.timesteps.tolist())

    prior_t, prior_s = sd3_loss.prior_sigmas(scheduler, 3)
    assert prior_s.tolist() == pytest.approx([sigma_at(999)] * 3) and prior_s[0] < 0.004  # the lowest noise
    assert prior_t[0] == pytest.approx(1000 * sigma_at(999), abs=1e-4)

    scheduler.set_timesteps(4)
    with pytest.raises(ValueError, match="training_scheduler"):
        sd3_loss.sample_sigmas(scheduler, 2)


def test_noising_and_preconditioning_by_hand():
    x0 = torch.tensor([[1.0, -2.0], [0.5, 4.0]]).reshape(2, 2, 1, 1)
    noise = torch.tensor([[3.0, 1.0], [-1.0, 0.0]]).reshape(2, 2, 1, 1)
    sigmas = torch.tensor([0.25, 1.0])
    noisy = sd3_loss.noisy_latents(x0, noise, sigmas)
    assert noisy.flatten().tolist() == [0.75 * 1 + 0.25 * 3, 0.75 * -2 + 0.25 * 1, -1.0, 0.0]
    output = torch.tensor([[2.0, -4.0], [8.0, 1.0]]).reshape(2, 2, 1, 1)
    predicted = sd3_loss.preconditioned_prediction(output, noisy, sigmas)
    assert predicted.flatten().tolist() == [1.5 - 0.5, -1.25 + 1.0, -1.0 - 8.0, 0.0 - 1.0]
    # The exact velocity ε − x0 gives back x0.
    torch.testing.assert_close(sd3_loss.preconditioned_prediction(noise - x0, noisy, sigmas), x0)


def test_the_dpo_term_by_hand_and_as_sd1_defines_it():
    model_unsafe, ref_unsafe = torch.tensor([0.2, 0.4]), torch.tensor([0.1, 0.4])
    model_safe, ref_safe = torch.tensor([0.3, 0.1]), torch.tensor([0.5, 0.1])
    beta = 2.0
    loss, diff = sd3_loss.dpo_loss(model_unsafe, ref_unsafe, model_safe, ref_safe, beta)
    # diff = (ℓθ⁺ − ℓref⁺) − (ℓθ⁻ − ℓref⁻) = (−0.2 − 0.1, 0 − 0); −log σ(−β·d) = log(1 + e^{β·d})
    torch.testing.assert_close(diff, torch.tensor([-0.3, 0.0]))
    by_hand = (math.log(1 + math.exp(beta * -0.3)) + math.log(2)) / 2
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)
    sd1, _ = duo_loss(model_unsafe, ref_unsafe, model_safe, ref_safe, torch.tensor(0.0), beta=beta, lam=0.0)
    assert loss.item() == sd1.item()


def test_the_prior_term_by_hand():
    model, ref = torch.tensor([[1.0, 2.0], [3.0, 4.0]]), torch.tensor([[1.0, 0.0], [3.0, 5.0]])
    assert sd3_loss.prior_loss(model, ref).item() == pytest.approx((0 + 4 + 0 + 1) / 4)
    assert sd3_loss.prior_loss(model, model.clone()).item() == 0.0


class ScalingTransformer(torch.nn.Module):
    """A stand-in transformer: output = c·input, c = 0.5 with the adapter on and 0 with it off. It records
    what it was called with."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.tensor(0.5))
        self.adapter_on = True
        self.calls = []

    @property
    def dtype(self):
        return torch.float32

    def disable_adapters(self):
        self.adapter_on = False

    def enable_adapters(self):
        self.adapter_on = True

    def forward(self, hidden_states, timestep, encoder_hidden_states, pooled_projections, return_dict):
        self.calls.append((timestep, encoder_hidden_states.shape, pooled_projections.shape))
        return (hidden_states * (self.weight if self.adapter_on else 0.0),)


def test_the_full_loss_assembles_the_pieces_as_the_official_code(sd3_pipe):
    """x⁻, x⁺ and the prior chunk stacked in that order, one ε per pair, the prior chunk ε itself at
    index 999; checked against the formulas written out on a stand-in transformer."""
    scheduler = sd3_loss.training_scheduler(sd3_pipe.scheduler)
    g = torch.Generator().manual_seed(0)
    unsafe, safe = torch.randn(2, 4, 2, 2, generator=g), torch.randn(2, 4, 2, 2, generator=g)
    batch = sd3_loss.sample_batch(scheduler, unsafe, safe, torch.Generator().manual_seed(1))
    assert batch.noise.shape == unsafe.shape and batch.sigmas.shape == batch.timesteps.shape == (6,)
    model = ScalingTransformer()
    embeds, pooled = torch.zeros(1, 5, 3), torch.zeros(1, 7)
    beta, lam = 10.0, 100.0
    loss, stats = sd3_loss.duo_sd3_loss(model, batch, embeds, pooled, beta=beta, lam=lam)

    assert [tuple(shape) for _, shape, _ in model.calls] == [(6, 5, 3)] * 2
    assert all(torch.equal(t, batch.timesteps) for t, _, _ in model.calls)
    s = batch.sigmas.reshape(-1, 1, 1, 1)
    x_unsafe = (1 - s[:2]) * unsafe + s[:2] * batch.noise
    x_safe = (1 - s[2:4]) * safe + s[2:4] * batch.noise
    x_prior = (1 - s[4:]) * batch.noise + s[4:] * batch.noise  # = ε up to rounding

    def err(pred, target):
        return ((pred - target) ** 2).mean(dim=(1, 2, 3))

    # Reference output 0 → x̂ = x_σ; model output 0.5·x_σ → x̂ = x_σ·(1 − 0.5σ).
    diff = (err(x_safe * (1 - 0.5 * s[2:4]), safe) - err(x_safe, safe)) - (
        err(x_unsafe * (1 - 0.5 * s[:2]), unsafe) - err(x_unsafe, unsafe)
    )
    prior = ((0.5 * s[4:] * x_prior) ** 2).mean()
    expected = -F.logsigmoid(-beta * diff).mean() + lam * prior
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # The code subtracts two x̂ ≈ ε that differ by 0.5σ·ε with σ ≈ 0.003: float32 keeps ~4 digits of that.
    assert stats["prior"] == pytest.approx(prior.item(), rel=1e-3)
    loss.backward()
    assert model.weight.grad is not None and model.adapter_on


def test_a_fresh_lora_is_the_reference_and_a_few_steps_lower_the_loss(sd3_pipe):
    transformer = sd3_pipe.transformer
    scheduler = sd3_loss.training_scheduler(sd3_pipe.scheduler)
    embeds, pooled = sd3_loss.null_conditioning(sd3_pipe)
    assert embeds.shape == (1, 77 + 77, 32) and pooled.shape == (1, 32)
    g = torch.Generator().manual_seed(0)
    unsafe, safe = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 8, 8, generator=g)
    batch = sd3_loss.sample_batch(scheduler, unsafe, safe, torch.Generator().manual_seed(1))
    before = {name: p.clone() for name, p in transformer.state_dict().items()}
    with lora_attached(transformer, sd3_loss.LORA_TARGETS, rank=4, alpha=4, seed=0) as parameters:
        adapted = {name for name, _ in transformer.named_modules() if name.endswith(".lora_A")}
        assert adapted and all(n.rsplit(".", 2)[-2] in {"to_q", "to_k", "to_v", "0"} for n in adapted)
        assert not any("add_" in n or "to_add_out" in n for n in adapted)
        optimizer = torch.optim.AdamW(parameters, lr=1e-3, weight_decay=1e-2)
        history = []
        for _ in range(5):
            loss, stats = sd3_loss.duo_sd3_loss(transformer, batch, embeds, pooled, beta=500.0, lam=5e6)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            history.append(stats)
    # The LoRA's B starts at zero: the policy is the reference, so no preference and no prior penalty yet.
    assert history[0]["prior"] == 0.0 and history[0]["dpo"] == pytest.approx(math.log(2))
    assert history[-1]["loss"] < history[0]["loss"] - 0.05
    assert history[-1]["preference_accuracy"] == 1.0
    after = transformer.state_dict()
    assert all(torch.equal(before[name], after[name]) for name in before)  # the LoRA came off cleanly


def test_pair_latents_are_sd3_normalised(sd3_pipe):
    vae = sd3_pipe.vae
    pixels_in = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1
    latents = sd3_loss.encode_sd3_pairs(vae, pixels_in, pixels_in.flip(0))
    with torch.no_grad():
        dist = vae.encode(pixels_in).latent_dist
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor
    torch.testing.assert_close(latents.unsafe_mean, (dist.mean - shift) * scale)
    torch.testing.assert_close(latents.unsafe_std, dist.std * scale)
    torch.testing.assert_close(latents.safe_mean, latents.unsafe_mean.flip(0))
