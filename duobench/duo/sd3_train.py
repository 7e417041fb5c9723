"""DUO's training loop for Stable Diffusion 3: the SD1 loop (`duobench.duo.loss.train_lora`) around the SD3
loss (`duobench.duo.sd3_loss`). Sample pairs, predict with and without the adapter, loss, step.

What differs from SD1, besides the loss:

- the LoRA sits on the transformer's image-stream joint-attention projections (`sd3_loss.LORA_TARGETS`);
- the empty prompt is the three encoders' (CLIP-L + CLIP-G + T5 at 77 tokens): per-token states and a pooled
  vector (`sd3_loss.null_conditioning`);
- pair latents are SD3-normalised, ``(z − shift)·scale`` (`sd3_loss.encode_sd3_pairs`);
- every random draw (the latent from its posterior, ε, the σ of each image) comes from one CPU generator
  seeded by ``config.seed`` and the process index, so a run does not depend on the device.

``DuoConfig``'s ``t_min``/``t_max`` are read as the SD3 script reads them, u ~ U[t_min/1000, t_max/1000]; its
defaults are SD1's. The official SD3 recipe is ``base_lr=3e-5, t_min=1`` with SD1's other defaults (β 500,
base λ 1e6, 1000 steps, 4 pairs per step, rank 32), given as method options (`sd3_loss.BASE_LR`).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duobench.duo import sd3_loss
from duobench.duo.loss import (
    PairLatents,
    effective_lambda,
    epoch_batches,
    train_lora_steps,
    training_accelerator,
)
from duobench.errors import DuobenchError

if TYPE_CHECKING:
    from duobench.duo.method import DuoConfig


def train_sd3_lora(
    transformer,
    scheduler,
    latents: PairLatents,
    prompt_embeds: torch.Tensor,
    pooled_embeds: torch.Tensor,
    config: DuoConfig,
    out_dir: Path,
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> list[dict[str, float]]:
    """Train one DUO LoRA on SD3's ``transformer`` and save it into ``out_dir``; return the per-step log.

    ``scheduler`` is the pipeline's flow-matching scheduler (its config gives the training schedule);
    ``prompt_embeds`` and ``pooled_embeds`` are the empty prompt's. accelerate supplies the device, mixed
    precision, multi-GPU gradient averaging and gradient accumulation, as on SD1.
    """

    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise DuobenchError(
            f"DUO-SD3's loss is defined for SD3's flow-matching schedule; this model's scheduler is "
            f"{type(scheduler).__name__}."
        )
    accelerator, world = training_accelerator(config, transformer, len(latents))
    lam = effective_lambda(config.base_lambda, config.beta)
    device = accelerator.device
    training_schedule = sd3_loss.training_scheduler(scheduler)
    latents = latents.to(torch.device("cpu"))  # drawn on the CPU, then moved: device-independent batches
    prompt_embeds, pooled_embeds = prompt_embeds.to(device), pooled_embeds.to(device)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    shuffle = torch.Generator().manual_seed(config.seed)  # the same epoch order on every process
    batches = epoch_batches(len(latents), config.micro_batch_pairs, accelerator.process_index, world, shuffle)

    def micro_batch_loss(model) -> tuple[torch.Tensor, dict[str, float]]:
        unsafe, safe = latents.sample(next(batches), generator)
        batch = sd3_loss.sample_batch(
            training_schedule, unsafe.to(device), safe.to(device), generator, config.t_min, config.t_max
        )
        return sd3_loss.duo_sd3_loss(
            model, batch, prompt_embeds, pooled_embeds, config.beta, lam, lora_transformer=transformer
        )

    return train_lora_steps(
        config,
        accelerator,
        transformer,
        sd3_loss.LORA_TARGETS,
        micro_batch_loss,
        out_dir,
        "DUO training (SD3)",
        on_step,
    )


def sd3_pair_trainer(pipe, config: DuoConfig) -> Callable[[object, Path], list[dict[str, float]]]:
    """``train(pair_set, folder) -> history`` for SD3's ``pipe``: its empty-prompt conditioning encoded once,
    then each pair set SD3-encoded and trained on (`train_sd3_lora`)."""
    from duobench.sd3 import MAX_SEQUENCE_LENGTH

    prompt_embeds, pooled_embeds = sd3_loss.null_conditioning(pipe, MAX_SEQUENCE_LENGTH)

    def train(pair_set, folder: Path) -> list[dict[str, float]]:
        latents = sd3_loss.encode_sd3_pairs(pipe.vae, *pair_set.pixels())
        return train_sd3_lora(
            pipe.transformer, pipe.scheduler, latents, prompt_embeds.detach(), pooled_embeds.detach(), config, folder
        )

    return train
