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

import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from duobench.duo import sd3_loss
from duobench.duo.loss import (
    PairLatents,
    _mean,
    _mixed_precision,
    _stop_if_bad,
    _stop_message,
    effective_lambda,
    effective_learning_rate,
    epoch_batches,
)
from duobench.errors import DuobenchError
from duobench.lora import lora_attached, save_lora
from duobench.progress import track

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
    from accelerate import Accelerator, PartialState

    if type(scheduler).__name__ != "FlowMatchEulerDiscreteScheduler":
        raise DuobenchError(
            f"DUO-SD3's loss is defined for SD3's flow-matching schedule; this model's scheduler is "
            f"{type(scheduler).__name__}."
        )
    world = PartialState(cpu=transformer.device.type == "cpu").num_processes
    if config.pairs_per_step % (config.micro_batch_pairs * world):
        raise DuobenchError(
            f"pairs_per_step={config.pairs_per_step} must be a multiple of micro_batch_pairs="
            f"{config.micro_batch_pairs} × {world} process(es)."
        )
    if len(latents) // world < config.micro_batch_pairs:
        raise DuobenchError(
            f"DUO needs at least {config.micro_batch_pairs * world} pairs for {config.micro_batch_pairs} "
            f"pair(s) per micro-batch on {world} process(es), but the pair set has {len(latents)}."
        )
    accumulation = config.pairs_per_step // (config.micro_batch_pairs * world)
    mixed_precision = _mixed_precision(config.mixed_precision, transformer.dtype)
    try:
        accelerator = Accelerator(
            cpu=transformer.device.type == "cpu",
            mixed_precision=mixed_precision,
            gradient_accumulation_steps=accumulation,
        )
    except ValueError as error:  # accelerate's process-wide state was set up differently earlier
        raise DuobenchError(
            f"Cannot train DUO with mixed_precision={mixed_precision!r} on {transformer.device.type}: {error} "
            "Train in a fresh process, or set mixed_precision to the one this process already uses."
        ) from error
    original_device = transformer.device
    learning_rate = effective_learning_rate(config.base_lr, config.beta)
    lam = effective_lambda(config.base_lambda, config.beta)
    device = accelerator.device
    training_schedule = sd3_loss.training_scheduler(scheduler)
    latents = latents.to(torch.device("cpu"))  # drawn on the CPU, then moved: device-independent batches
    prompt_embeds, pooled_embeds = prompt_embeds.to(device), pooled_embeds.to(device)
    generator = torch.Generator().manual_seed(config.seed + accelerator.process_index)
    shuffle = torch.Generator().manual_seed(config.seed)  # the same epoch order on every process
    batches = epoch_batches(len(latents), config.micro_batch_pairs, accelerator.process_index, world, shuffle)
    history: list[dict[str, float]] = []
    last_checkpoint: Path | None = None
    with (
        lora_attached(
            transformer, sd3_loss.LORA_TARGETS, config.lora_rank, config.lora_alpha, config.seed
        ) as lora_parameters,
        track("DUO training (SD3)", config.steps, unit="steps") as progress,
    ):
        optimizer = torch.optim.AdamW(
            lora_parameters, lr=learning_rate, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
        )
        model, optimizer = accelerator.prepare(transformer, optimizer)
        try:
            model.train()
            for step in range(1, config.steps + 1):
                micro_stats = []
                for _ in range(accumulation):
                    with accelerator.accumulate(model):
                        unsafe, safe = latents.sample(next(batches), generator)
                        batch = sd3_loss.sample_batch(
                            training_schedule,
                            unsafe.to(device),
                            safe.to(device),
                            generator,
                            config.t_min,
                            config.t_max,
                        )
                        loss, stats = sd3_loss.duo_sd3_loss(
                            model, batch, prompt_embeds, pooled_embeds, config.beta, lam, lora_transformer=transformer
                        )
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
                    raise DuobenchError(_stop_message(step, f"gradient norm is {record['grad_norm']}", last_checkpoint))
                history.append(record)
                progress.advance(loss=record["loss"], preference_accuracy=record["preference_accuracy"])
                if on_step is not None:
                    on_step(step, record)
                if step % config.checkpoint_every == 0 and step < config.steps:
                    last_checkpoint = out_dir / f"checkpoint-{step}"
                    if accelerator.is_main_process:
                        save_lora(transformer, last_checkpoint)
            if accelerator.is_main_process:
                save_lora(transformer, out_dir)
            accelerator.wait_for_everyone()
        finally:
            accelerator.unwrap_model(model, keep_fp32_wrapper=False)  # undoes the autocast forward patch
            accelerator.free_memory()
            transformer.to(original_device)
    return history


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
