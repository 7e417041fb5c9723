"""DUO's loss for Stable Diffusion 3, in one file that reads against the official ``train/unlearn-sd3.py``.

The SD1 loss (`duobench.duo.loss`) carried over to SD3's rectified flow. Per pair i, with x⁻ the unsafe
(dispreferred) and x⁺ the SDEdit-safe (preferred) image's latent ``(z − shift)·scale``, ε one noise per pair,
and every input conditioned on the empty prompt ∅ (CLIP-L + CLIP-G + T5, 77 T5 tokens):

    x_σ        = (1 − σ)·x0 + σ·ε                                 (flow-matching forward process)
    x̂θ(x_σ)    = vθ(x_σ, t(σ), ∅)·(−σ) + x_σ                     (``precondition_outputs``: predicts x0)
    ℓθ⁻ = ‖x̂θ(x⁻_σ) − x⁻‖²       ℓref⁻ = the same with the adapter off       (σ = σ(u), u ~ U[0.001, 0.75])
    ℓθ⁺ = ‖x̂θ(x⁺_σ') − x⁺‖²      ℓref⁺ likewise                              (σ' independent of σ)
    diff     = (ℓθ⁺ − ℓref⁺) − (ℓθ⁻ − ℓref⁻)
    L_DPO    = mean_i −log σ(−β · diff_i)
    L_prior  = mean ‖x̂θ(ε, t₉₉₉) − x̂ref(ε, t₉₉₉)‖²               (the output-preserving term)
    L        = L_DPO + λ_eff · L_prior

Errors are means over C, H, W. The DPO term is the SD1 one exactly: the same sign convention, no 0.5 on β
(Diffusion-DPO has one), ``learning_rate = base_lr·100/β`` and ``λ_eff = base_lambda·β/100``; the official
SD3 script sets ``base_lr=3e-5`` (LR 6e-6 at β = 500) and ``base_lambda=1e6`` (λ_eff 5e6). The reference
is the same transformer with its LoRA switched off. The LoRA has rank 32, alpha 32, Gaussian init, on every
``to_q``/``to_k``/``to_v``/``to_out.0``: the image-stream projections of the joint attention, not the text
stream's ``add_*_proj``/``to_add_out`` (`LORA_TARGETS`).

Timesteps, as the official code draws them: u ~ U[t_min/1000, t_max/1000] (``t_min=1, t_max=750``) per
image, ``index = int(u·1000)`` clamped to [0, 999], and ``t = scheduler.timesteps[index]``, σ the matching
``scheduler.sigmas[index]``, from a fresh ``FlowMatchEulerDiscreteScheduler`` (its 1000 training steps,
shift 3.0). The scheduler's timesteps *descend*: index 0 is σ = 1 (pure noise) and index 999 is σ ≈ 0.003.
The official ``logit_normal`` weighting scheme weights every σ by 1 (diffusers'
``compute_loss_weighting_for_sd3``), so the errors here are unweighted.

Official quirks, all reproduced; each is a choice a reader could make differently:

1. **Only the high-noise half is trained.** Indices 1-749 of a descending schedule are σ ∈ (0.50, 0.9997]
   under shift 3 (index 750 would be σ = 0.5 exactly). The SD1 script's ``t ∈ [0, 750)`` leaves out the
   *noisiest* quarter of DDPM's ascending schedule; the same numbers on SD3's descending one leave out the
   *cleanest* quarter of the indices instead, which under shift 3 is every σ < 0.5. Kept: it is the trained
   model the paper reports (Table 4). I would keep it too: nudity is decided in the coarse, high-noise
   steps, and the low-noise steps that fix texture are exactly what the prior term is meant to leave alone.
2. **The prior chunk is pure noise with the lowest-noise label.** Its u = 1 gives index 999 (the clamp of
   1000), i.e. t ≈ 2.99, σ ≈ 0.003, while its input is ``(1 − σ)·ε + σ·ε`` = ε. SD1's prior chunk is ε at
   t = 999, the *noisiest* step, which is consistent; on SD3 the consistent label would be index 0 (σ = 1).
   The mismatch is almost certainly a porting slip (u = 1 meant "the end of the chain", as 999 did on SD1).
3. **The prior term is taken on preconditioned outputs**, so it equals σ²·‖vθ − vref‖² with σ ≈ 0.003:
   the λ_eff = 5e6 of the script becomes ≈ 45 on the raw velocities. This and (2) interact: "fixing" the
   label to σ = 1 without dividing λ by ≈ 1.1e5 would make the prior term about 10⁵ times stronger and
   freeze the model. I would change (2) and (3) together: feed ε at index 0 and keep λ_eff·σ² the same,
   which preserves the trained strength while asking the model to keep its output where the input is
   really pure noise. Kept as official here, since the paper's SD3 numbers come from the quirky setting.
4. **u is continuous but the timestep is not:** ``int(u·1000)`` floors onto the 1000 training timesteps
   (u is drawn on the CPU; the formula ``r·t_max/1000 + (1 − r)·t_min/1000`` is kept to the letter, so
   its rounding matches).
5. **One ε per pair, shared by x⁻, x⁺ and the prior chunk**, as on SD1; σ is drawn independently for x⁻
   and x⁺ (2B draws), as ``--method dpo`` does.

Deviations from the official code:

- precision: the official run keeps the latents, σ and the preconditioning in fp16 (the weight dtype) and
  upcasts only inside the MSE; here σ, the noising and the preconditioning are fp32, and only the
  transformer's input is cast to its dtype. With σ ≈ 0.003 on the prior chunk, fp16 preconditioning loses
  most of the velocity's bits before the difference is taken;
- σ is read by index (``sigmas[index]``) rather than by searching the timestep for its position, which is
  the same value since the schedule's timesteps are distinct;
- the same posterior-sampling shortcut as SD1 (`encode_sd3_pairs`): each image is VAE-encoded once and a
  fresh latent drawn from its posterior at every step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from duobench.duo.loss import PairLatents, adapters_disabled

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""The official SD3 targets: every joint-attention image-stream projection."""

T_MIN = 1
T_MAX = 750
"""The official SD3 script's ``--t_min=1 --t_max=750``: u ~ U[0.001, 0.75], i.e. schedule indices 1-749."""

BASE_LR = 3e-5
BASE_LAMBDA = 1e6
"""The official SD3 script's base rates; `duobench.duo.loss.effective_learning_rate` / `effective_lambda`
rescale them by β as on SD1."""


def training_scheduler(scheduler):
    """A fresh flow-matching scheduler with the model's config: its 1000 training timesteps and sigmas.

    The official code deep-copies the pipeline's scheduler before any ``set_timesteps``; a scheduler that has
    sampled holds its inference steps instead, so build a new one from the config.
    """
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)


# ------------------------------------------------------------------------------------------- pieces


def sample_sigmas(
    scheduler,
    count: int,
    t_min: int = T_MIN,
    t_max: int = T_MAX,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` independent (timesteps, sigmas) as the official code draws them (quirks 1 and 4).

    u ~ U[t_min/1000, t_max/1000] on the CPU, index ``int(u·N)`` clamped to [0, N − 1], and the
    scheduler's timestep and σ at that index. ``scheduler`` must hold its training schedule
    (`training_scheduler`).
    """
    r = torch.rand(size=(count,), generator=generator, device="cpu")
    u = r * t_max / 1000 + (1 - r) * t_min / 1000
    return schedule_at(scheduler, u)


def prior_sigmas(scheduler, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The prior chunk's (timesteps, sigmas): u = 1, i.e. the last index, σ ≈ 0.003 (quirk 2)."""
    return schedule_at(scheduler, torch.ones(count))


def schedule_at(scheduler, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The training schedule's (timestep, σ) at ``index = int(u·N)``, clamped to the schedule."""
    steps = scheduler.config.num_train_timesteps
    if len(scheduler.timesteps) != steps:
        raise ValueError(
            f"the scheduler holds {len(scheduler.timesteps)} inference steps, not its {steps} training ones; "
            "pass training_scheduler(pipe.scheduler)"
        )
    index = (u * steps).long().clamp(0, steps - 1)
    return scheduler.timesteps[index].float(), scheduler.sigmas[index].float()


def _per_sample(sigmas: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return sigmas.to(like.device, like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The flow-matching forward process: x_σ = (1 − σ)·x0 + σ·ε, one σ per sample."""
    sigma = _per_sample(sigmas, x0)
    return (1.0 - sigma) * x0 + sigma * noise


def preconditioned_prediction(model_output: torch.Tensor, noisy: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The x0 the velocity implies: v·(−σ) + x_σ (exact when v = ε − x0)."""
    return model_output * (-_per_sample(sigmas, noisy)) + noisy


def per_sample_error(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error per sample over C, H, W (the logit-normal scheme's weights are all 1)."""
    return ((prediction.float() - target.float()) ** 2).reshape(target.shape[0], -1).mean(dim=1)


def dpo_loss(
    model_err_unsafe: torch.Tensor,
    ref_err_unsafe: torch.Tensor,
    model_err_safe: torch.Tensor,
    ref_err_safe: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """mean −log σ(−β·diff) with diff = (ℓθ⁺ − ℓref⁺) − (ℓθ⁻ − ℓref⁻); returns the loss and ``diff``.

    The same convention as SD1's `duobench.duo.loss.duo_loss`: ``diff < 0`` means the model already moved
    towards the safe image and away from the unsafe one, relative to the reference.
    """
    diff = (model_err_safe - ref_err_safe) - (model_err_unsafe - ref_err_unsafe)
    return -F.logsigmoid(-beta * diff).mean(), diff


def prior_loss(model_prior: torch.Tensor, ref_prior: torch.Tensor) -> torch.Tensor:
    """The output-preserving term: the MSE between the model's and the reference's (preconditioned)
    outputs on the pure-noise chunk, over every element."""
    return F.mse_loss(model_prior.float(), ref_prior.float(), reduction="mean")


# ------------------------------------------------------------------------------------------- batch


@dataclass
class DuoSD3Batch:
    """The inputs of one DUO-SD3 forward pass: clean latents, their shared noise, and the (timestep, σ) of
    every row of the stacked input ``[x⁻ (B), x⁺ (B), prior (B)]``."""

    unsafe: torch.Tensor
    safe: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    sigmas: torch.Tensor


def sample_batch(
    scheduler,
    unsafe: torch.Tensor,
    safe: torch.Tensor,
    generator: torch.Generator,
    t_min: int = T_MIN,
    t_max: int = T_MAX,
) -> DuoSD3Batch:
    """One noise per pair, one σ per image, and the prior chunk's σ at index 999; all drawn from the CPU
    ``generator``, so a batch does not depend on the device."""
    noise = torch.randn(unsafe.shape, generator=generator, dtype=unsafe.dtype).to(unsafe.device)
    size = unsafe.shape[0]
    timesteps, sigmas = sample_sigmas(scheduler, 2 * size, t_min, t_max, generator)
    prior_t, prior_s = prior_sigmas(scheduler, size)
    return DuoSD3Batch(unsafe, safe, noise, torch.cat([timesteps, prior_t]), torch.cat([sigmas, prior_s]))


def duo_sd3_loss(
    transformer,
    batch: DuoSD3Batch,
    prompt_embeds: torch.Tensor,
    pooled_prompt_embeds: torch.Tensor,
    beta: float,
    lam: float,
    lora_transformer=None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DUO-SD3's loss on a batch and a few statistics for the log.

    ``transformer`` carries the gradients (maybe wrapped for multi-GPU); ``lora_transformer`` (default: the
    same) is the bare module whose adapter is switched off for the reference pass. ``prompt_embeds`` and
    ``pooled_prompt_embeds`` are the empty prompt's (one row, or one per stacked row), as `null_conditioning`
    gives them.
    """
    lora_transformer = lora_transformer if lora_transformer is not None else transformer
    size = batch.noise.shape[0]
    x0 = torch.cat([batch.unsafe, batch.safe, batch.noise])
    noisy = noisy_latents(x0, batch.noise.repeat(3, 1, 1, 1), batch.sigmas)
    rows = 3 * size
    dtype = lora_transformer.dtype
    inputs = {
        "hidden_states": noisy.to(dtype),
        "timestep": batch.timesteps.to(noisy.device),
        "encoder_hidden_states": prompt_embeds.expand(rows, -1, -1).to(dtype),
        "pooled_projections": pooled_prompt_embeds.expand(rows, -1).to(dtype),
        "return_dict": False,
    }
    model_pred = preconditioned_prediction(transformer(**inputs)[0].float(), noisy, batch.sigmas)
    with torch.no_grad(), adapters_disabled(lora_transformer):
        ref_pred = preconditioned_prediction(lora_transformer(**inputs)[0].float(), noisy, batch.sigmas)
    model_unsafe, model_safe, model_prior = model_pred.chunk(3)
    ref_unsafe, ref_safe, ref_prior = ref_pred.chunk(3)
    dpo, diff = dpo_loss(
        per_sample_error(model_unsafe, batch.unsafe),
        per_sample_error(ref_unsafe, batch.unsafe),
        per_sample_error(model_safe, batch.safe),
        per_sample_error(ref_safe, batch.safe),
        beta,
    )
    prior = prior_loss(model_prior, ref_prior)
    loss = dpo + lam * prior
    stats = {
        "loss": loss.item(),
        "dpo": dpo.item(),
        "prior": prior.item(),
        "preference_accuracy": (diff < 0).float().mean().item(),
    }
    return loss, stats


# ------------------------------------------------------------------------------------------- inputs


@torch.no_grad()
def null_conditioning(pipe, max_sequence_length: int = 77) -> tuple[torch.Tensor, torch.Tensor]:
    """The empty prompt's (embeds (1, 77 + T5 length, D), pooled (1, D_pooled)) from the three encoders."""
    embeds, _, pooled, _ = pipe.encode_prompt(
        prompt=[""],
        prompt_2=None,
        prompt_3=None,
        do_classifier_free_guidance=False,
        device=pipe.transformer.device,
        max_sequence_length=max_sequence_length,
    )
    return embeds, pooled


@torch.no_grad()
def encode_sd3_pairs(vae, unsafe_pixels: torch.Tensor, safe_pixels: torch.Tensor, batch_size: int = 8) -> PairLatents:
    """Encode pixel tensors in [-1, 1] into SD3-normalised latent posteriors: the latent ``(z − shift)·scale``
    of z ~ N(μ, s²) is N((μ − shift)·scale, (s·scale)²). `PairLatents.sample` then draws them."""
    shift, scale = vae.config.shift_factor, vae.config.scaling_factor

    def posterior(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for chunk in pixels.split(batch_size):
            dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        return (torch.cat(means) - shift) * scale, torch.cat(stds) * scale

    return PairLatents(*posterior(unsafe_pixels), *posterior(safe_pixels))
