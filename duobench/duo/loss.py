"""DUO's loss and training loop, in one file that reads against the paper (Park et al., NeurIPS 2024).

The official code (`naver-ai/DUO`, ``train/unlearn-sd.py``) trains a LoRA with a Diffusion-DPO-style
preference loss. The SDEdit-safe image x⁺ is preferred and the unsafe image x⁻ dispreferred. The reference
model is the same UNet with the adapter switched off. Per pair i (ε-prediction, errors averaged over C,H,W):

    ℓθ⁻ = ‖εθ(x⁻_t, t, ∅) − ε‖²      ℓref⁻ = the same with the adapter off      (t  ~ U{0..749})
    ℓθ⁺ = ‖εθ(x⁺_t', t', ∅) − ε‖²    ℓref⁺ likewise                              (t' ~ U{0..749}, independent)
    diff     = (ℓθ⁺ − ℓref⁺) − (ℓθ⁻ − ℓref⁻)
    L_DPO    = mean_i −log σ(−β · diff_i)
    L_prior  = mean ‖εθ(ε, 999, ∅) − εref(ε, 999, ∅)‖²        (the output-preserving term, on pure noise)
    L        = L_DPO + λ_eff · L_prior

Points to notice, all as in the official code:

- the same ε noises x⁻_i and x⁺_i, and the pure-noise input of the prior term is that same ε;
- every image draws its own timestep in ``[t_min, t_max)`` (the official ``t_min=1`` means
  ``randint(max(t_min - 1, 0), t_max)``, that is ``[0, 750)``);
- every input is conditioned on the empty prompt, so the training is text-unconditional;
- there is no 0.5 factor on β as there is in Diffusion-DPO; ``learning_rate = base_lr·100/β`` and
  ``λ_eff = base_lambda·β/100``, so LR·β and LR·λ_eff stay fixed as β is swept;
- AdamW (weight decay 1e-2), gradient clipping at 1.0, constant LR, LoRA of rank 32 (alpha 32, Gaussian
  init) on the self-attention projections only (``--no_cross_attn``);
- 4 pairs per optimiser step (4 GPUs × 1 pair); here gradient accumulation over micro-batches gives the same
  effective batch on any number of processes.

One deliberate difference: the official code VAE-encodes every batch again and samples the latent from the
posterior each time. We encode each image once and keep the posterior's mean and standard deviation, then
draw a fresh latent from it every step. That is the same distribution, without re-running the encoder.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from duobench.errors import DuobenchError
from duobench.lora import lora_attached, save_lora
from duobench.progress import track

if TYPE_CHECKING:
    from duobench.duo.method import DuoConfig

logger = logging.getLogger(__name__)

LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0")
"""Self-attention projections only: the official scripts pass ``--no_cross_attn``."""


def effective_learning_rate(base_lr: float, beta: float) -> float:
    """The official rescaling: the DPO gradient grows with β, so the step size shrinks with it."""
    return base_lr * 100.0 / beta


def effective_lambda(base_lambda: float, beta: float) -> float:
    """The official rescaling of the output-preserving weight, keeping λ_eff·LR fixed across β."""
    return base_lambda * beta / 100.0


# --------------------------------------------------------------------------------------------------- loss


def duo_loss(
    model_err_unsafe: torch.Tensor,
    ref_err_unsafe: torch.Tensor,
    model_err_safe: torch.Tensor,
    ref_err_safe: torch.Tensor,
    prior_err: torch.Tensor,
    beta: float,
    lam: float,
) -> tuple[torch.Tensor, dict[str, float]]:
    """DUO's objective from per-pair denoising errors (each shape ``(B,)``) and the prior MSE (a scalar).

    Returns the loss and a few statistics for the log: the two halves of the loss, the two log-ratio
    proxies, and the share of pairs the model already ranks the right way (``diff < 0``).
    """
    safe_log_ratio = model_err_safe - ref_err_safe
    unsafe_log_ratio = model_err_unsafe - ref_err_unsafe
    diff = safe_log_ratio - unsafe_log_ratio
    dpo = -F.logsigmoid(-beta * diff).mean()
    loss = dpo + lam * prior_err
    stats = {
        "loss": loss.item(),
        "dpo": dpo.item(),
        "prior": prior_err.item(),
        "safe_log_ratio": safe_log_ratio.mean().item(),
        "unsafe_log_ratio": unsafe_log_ratio.mean().item(),
        "preference_accuracy": (diff < 0).float().mean().item(),
    }
    return loss, stats


# --------------------------------------------------------------------------------------------------- data


@dataclass
class PairLatents:
    """The VAE posterior (mean, std) of every pair's two images, already multiplied by the scaling factor."""

    unsafe_mean: torch.Tensor
    unsafe_std: torch.Tensor
    safe_mean: torch.Tensor
    safe_std: torch.Tensor

    def __len__(self) -> int:
        return self.unsafe_mean.shape[0]

    def to(self, device: torch.device) -> PairLatents:
        return PairLatents(*(t.to(device) for t in (self.unsafe_mean, self.unsafe_std, self.safe_mean, self.safe_std)))

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One fresh latent per image, as ``latent_dist.sample()`` would give."""
        unsafe = self.unsafe_mean[index] + self.unsafe_std[index] * _randn_like(self.unsafe_mean[index], generator)
        safe = self.safe_mean[index] + self.safe_std[index] * _randn_like(self.safe_mean[index], generator)
        return unsafe, safe


@torch.no_grad()
def encode_pairs(vae, unsafe_pixels: torch.Tensor, safe_pixels: torch.Tensor, batch_size: int = 8) -> PairLatents:
    """Encode pixel tensors in [-1, 1] (``(N, 3, H, W)`` each) into their scaled latent posteriors (fp32)."""

    def posterior(pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        means, stds = [], []
        for chunk in pixels.split(batch_size):
            dist = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
            means.append(dist.mean.float())
            stds.append(dist.std.float())
        scale = vae.config.scaling_factor
        return torch.cat(means) * scale, torch.cat(stds) * scale

    return PairLatents(*posterior(unsafe_pixels), *posterior(safe_pixels))


@dataclass
class DuoBatch:
    """The inputs of one DUO forward pass: clean latents, their shared noise and independent timesteps."""

    unsafe: torch.Tensor
    safe: torch.Tensor
    noise: torch.Tensor
    t_unsafe: torch.Tensor
    t_safe: torch.Tensor


def sample_batch(
    latents: PairLatents, index: torch.Tensor, t_min: int, t_max: int, generator: torch.Generator
) -> DuoBatch:
    """Draw latents for the pairs in ``index``, one noise per pair, and one timestep per image."""
    unsafe, safe = latents.sample(index, generator)
    noise = _randn_like(unsafe, generator)
    size, device = unsafe.shape[0], unsafe.device
    t_unsafe = torch.randint(t_min, t_max, (size,), generator=generator, device=device)
    t_safe = torch.randint(t_min, t_max, (size,), generator=generator, device=device)
    return DuoBatch(unsafe, safe, noise, t_unsafe, t_safe)


def epoch_batches(
    num_pairs: int, batch_pairs: int, rank: int, world: int, generator: torch.Generator
) -> Iterator[torch.Tensor]:
    """Endless shuffled epochs over the pairs, each process taking its own share (a DistributedSampler)."""
    while True:
        order = torch.randperm(num_pairs, generator=generator)[rank::world]
        for start in range(0, len(order) - batch_pairs + 1, batch_pairs):
            yield order[start : start + batch_pairs]


def _randn_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tensor.shape, generator=generator, device=tensor.device, dtype=tensor.dtype)


# ---------------------------------------------------------------------------------------------- predict


@contextmanager
def adapters_disabled(unet) -> Iterator[None]:
    """The reference model: the same UNet with its LoRA switched off."""
    unet.disable_adapters()
    try:
        yield
    finally:
        unet.enable_adapters()


def duo_errors(
    unet, lora_unet, noise_scheduler, batch: DuoBatch, null_embedding: torch.Tensor
) -> tuple[torch.Tensor, ...]:
    """The five inputs of `duo_loss`: model and reference errors on x⁻ and x⁺, and the prior MSE.

    ``unet`` is what carries gradients (maybe wrapped for multi-GPU); ``lora_unet`` is the bare module whose
    adapter is switched off for the reference pass.
    """
    size = batch.noise.shape[0]
    prior_t = torch.full_like(batch.t_unsafe, noise_scheduler.config.num_train_timesteps - 1)
    model_input = torch.cat(
        [
            noise_scheduler.add_noise(batch.unsafe, batch.noise, batch.t_unsafe),
            noise_scheduler.add_noise(batch.safe, batch.noise, batch.t_safe),
            batch.noise,
        ]
    )
    timesteps = torch.cat([batch.t_unsafe, batch.t_safe, prior_t])
    condition = null_embedding.expand(3 * size, -1, -1)
    dtype = lora_unet.dtype
    model_pred = unet(model_input.to(dtype), timesteps, condition.to(dtype)).sample.float()
    with torch.no_grad(), adapters_disabled(lora_unet):
        ref_pred = lora_unet(model_input.to(dtype), timesteps, condition.to(dtype)).sample.float()
    model_unsafe, model_safe, model_prior = model_pred.chunk(3)
    ref_unsafe, ref_safe, ref_prior = ref_pred.chunk(3)

    def per_sample_error(pred: torch.Tensor) -> torch.Tensor:
        return ((pred - batch.noise) ** 2).mean(dim=(1, 2, 3))

    return (
        per_sample_error(model_unsafe),
        per_sample_error(ref_unsafe),
        per_sample_error(model_safe),
        per_sample_error(ref_safe),
        F.mse_loss(model_prior, ref_prior),
    )


# ------------------------------------------------------------------------------------------------- loop


def train_lora(
    unet,
    noise_scheduler,
    latents: PairLatents,
    null_embedding: torch.Tensor,
    config: DuoConfig,
    out_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train one DUO LoRA on ``unet`` and save it into ``out_dir``; return the per-step log.

    Plain loop: sample pairs, predict with and without the adapter, loss, step. accelerate supplies the
    device, mixed precision, multi-GPU gradient averaging and gradient accumulation (so ``pairs_per_step``
    pairs make one optimiser step whatever the number of processes). A checkpoint of the adapter is saved
    every ``checkpoint_every`` steps; a non-finite or diverging loss stops training with a `DuobenchError`
    that names the last good checkpoint.
    """

    if noise_scheduler.config.prediction_type != "epsilon":
        raise DuobenchError(
            f"DUO's loss is defined for ε-prediction models (SD1.x); this model predicts "
            f"{noise_scheduler.config.prediction_type!r}."
        )
    accelerator, world = training_accelerator(config, unet, len(latents))
    lam = effective_lambda(config.base_lambda, config.beta)
    device = accelerator.device
    latents = latents.to(device)
    null_embedding = null_embedding.to(device)
    generator = torch.Generator(device).manual_seed(config.seed + accelerator.process_index)
    shuffle = torch.Generator().manual_seed(config.seed)  # the same epoch order on every process
    batches = epoch_batches(len(latents), config.micro_batch_pairs, accelerator.process_index, world, shuffle)

    def micro_batch_loss(model) -> tuple[torch.Tensor, dict[str, float]]:
        index = next(batches).to(device)
        batch = sample_batch(latents, index, config.t_min, config.t_max, generator)
        errors = duo_errors(model, unet, noise_scheduler, batch, null_embedding)
        return duo_loss(*errors, beta=config.beta, lam=lam)

    return train_lora_steps(config, accelerator, unet, LORA_TARGETS, micro_batch_loss, out_dir, "DUO training", on_step)


def train_lora_steps(
    config,
    accelerator,
    module,
    targets: tuple[str, ...],
    micro_batch_loss: Callable[[Any], tuple[torch.Tensor, dict[str, float]]],
    out_dir: Path,
    title: str,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """The optimisation loop both DUO trainers share (SD1's UNet, SD3's transformer): a fresh LoRA on
    ``targets`` of ``module``, AdamW at DUO's effective learning rate, ``micro_batch_loss(model)`` per
    micro-batch with gradient accumulation and clipping, the divergence stop, checkpoints every
    ``checkpoint_every`` steps, and the adapter saved into ``out_dir``; returns the per-step log."""
    original_device = module.device
    learning_rate = effective_learning_rate(config.base_lr, config.beta)
    history: list[dict[str, float]] = []
    last_checkpoint: Path | None = None
    with (
        lora_attached(module, targets, config.lora_rank, config.lora_alpha, config.seed) as lora_parameters,
        track(title, config.steps, unit="steps") as progress,
    ):
        optimizer = torch.optim.AdamW(
            lora_parameters, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
        )
        model, optimizer = accelerator.prepare(module, optimizer)
        try:
            model.train()
            for step in range(1, config.steps + 1):
                micro_stats = []
                for _ in range(accelerator.gradient_accumulation_steps):
                    with accelerator.accumulate(model):
                        loss, stats = micro_batch_loss(model)
                        _stop_if_bad(accelerator, loss, config.divergence_loss, step, last_checkpoint)
                        accelerator.backward(loss)
                        if accelerator.sync_gradients:
                            stats["grad_norm"] = float(
                                accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                            )
                        optimizer.step()
                        optimizer.zero_grad()
                        micro_stats.append(stats)
                record = {"step": step, **{k: _mean(s.get(k) for s in micro_stats) for k in micro_stats[-1]}}
                if accelerator.scaler is None and not math.isfinite(record["grad_norm"]):
                    reason = f"gradient norm is {record['grad_norm']}"
                    raise DuobenchError(_stop_message(step, reason, last_checkpoint))
                history.append(record)
                progress.advance(loss=record["loss"], preference_accuracy=record["preference_accuracy"])
                if on_step is not None:
                    on_step(step, record)
                if step % config.checkpoint_every == 0 and step < config.steps:
                    last_checkpoint = out_dir / f"checkpoint-{step}"
                    if accelerator.is_main_process:
                        save_lora(module, last_checkpoint)
                    logger.info("%s step %d: %s; saved %s", title, step, record, last_checkpoint)
            if accelerator.is_main_process:
                save_lora(module, out_dir)
            accelerator.wait_for_everyone()
        finally:
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # undoes the autocast forward patch
            accelerator.free_memory()
            module.to(original_device)
    return history


def _stop_if_bad(accelerator, loss: torch.Tensor, divergence_loss: float, step: int, last: Path | None) -> None:
    """Stop every process together when any one sees a non-finite or diverged loss."""
    value = loss.detach().float()
    bad = torch.tensor(float(not torch.isfinite(value) or value > divergence_loss), device=value.device)
    if accelerator.reduce(bad, reduction="sum").item() > 0:
        reason = f"loss is {value.item()}" + ("" if not torch.isfinite(value) else f" > {divergence_loss}")
        raise DuobenchError(_stop_message(step, reason, last))


def _stop_message(step: int, reason: str, last: Path | None) -> str:
    kept = f"The last good checkpoint is {last}." if last else "No checkpoint had been saved yet."
    return (
        f"DUO training stopped at step {step}: the {reason}, so training diverged. {kept} Lower base_lr, "
        "raise beta, or check the pair images."
    )


def _mean(values) -> float:
    values = [v for v in values if v is not None]
    return sum(values) / len(values)


def _mixed_precision(setting: str, dtype: torch.dtype) -> str:
    if setting != "auto":
        return setting
    return {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "no")


def training_accelerator(config, model, pairs: int):
    """The accelerate setup of both DUO trainers (SD1's UNet, SD3's transformer): checks that the pair set and
    ``pairs_per_step`` divide over the processes, and returns ``(accelerator, number of processes)`` with the
    gradient accumulation that makes ``pairs_per_step`` pairs one optimiser step."""
    from accelerate import Accelerator, PartialState

    world = PartialState(cpu=model.device.type == "cpu").num_processes
    if config.pairs_per_step % (config.micro_batch_pairs * world):
        raise DuobenchError(
            f"pairs_per_step={config.pairs_per_step} must be a multiple of micro_batch_pairs="
            f"{config.micro_batch_pairs} × {world} process(es)."
        )
    if pairs // world < config.micro_batch_pairs:
        raise DuobenchError(
            f"DUO needs at least {config.micro_batch_pairs * world} pairs for {config.micro_batch_pairs} "
            f"pair(s) per micro-batch on {world} process(es), but the pair set has {pairs}."
        )
    accumulation = config.pairs_per_step // (config.micro_batch_pairs * world)
    mixed_precision = _mixed_precision(config.mixed_precision, model.dtype)
    try:
        accelerator = Accelerator(
            cpu=model.device.type == "cpu",
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=accumulation,
        )
    except ValueError as error:  # accelerate's process-wide state was set up differently earlier
        raise DuobenchError(
            f"Cannot train DUO with mixed_precision={mixed_precision!r} on {model.device.type}: {error} "
            "Train in a fresh process, or set mixed_precision to the one this process already uses."
        ) from error
    return accelerator, world
