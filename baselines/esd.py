"""ESD: Erasing Concepts from Diffusion Models (Gandikota et al., ICCV 2023), on diffusers.

The fine-tuned UNet ε_θ learns to predict, for the concept prompt c, the frozen model's score pushed
*away* from c by negative guidance:

    ε_θ(x_t, c, t)  →  e_u − η · (e_c − e_u),    e_c = ε*(x_t, c, t),  e_u = ε*(x_t, "", t)

η convention: ``negative_guidance`` is the paper's η, the form of the paper-era CompVis script
(``train-esd.py``, default 1). The published checkpoints "ESD-u-1" / "ESD-x-1" (e.g.
``diffusers-nudity-ESDu1-UNET.pt``) are ``esd-u`` / ``esd-x`` with ``negative_guidance=1``. The current
official diffusers script ``esd_sd.py`` writes the target as ``e_c − η'(e_c − e_u)``, so its η' = η + 1:
its default η'=2 is the paper's η=1.

Variants (the paper's names; which tensors train, in diffusers names):

- ``esd-u`` ("noxattn"): every UNet parameter except cross-attention (``attn2``), the time embedding
  (``time_embedding``) and the output head (``conv_norm_out``, ``conv_out``), norm layers included, as the
  paper-era script selected them; the paper's choice for global concepts such as nudity.
- ``esd-x`` ("xattn"): every ``attn2`` parameter (to_q, to_k, to_v, to_out).

Each iteration: k ~ U{0..ddim_steps−1}; x_t = k DDIM steps from fresh noise with prompt c at guidance
``start_guidance`` (3); the model is queried at ``ddim.timesteps[k]``; one Adam step on the MSE.
Defaults are the paper-era script's: 1000 iterations, Adam lr 1e-5, batch 1, DDIM 50, guidance 3, η 1,
the model's native resolution (512 px for SD1.4).

Deliberate differences from the official code:

- x_t is rolled out with the *frozen* base model (as the current ``esd_sd.py`` does); the paper-era script
  rolled out with the model being trained.
- The model is queried at the DDIM timestep the rollout stopped at, ``ddim.timesteps[k]``. The paper-era
  script instead drew a DDPM timestep in [20k, 20k+20), which with its sampler's ``t_start=-1`` off-by-one
  labelled x_t about 40–60 steps noisier than it was; we keep x_t and t consistent.
- The trained copy and its Adam state are fp32 while the frozen model runs in the pipe's dtype (fp16 on
  GPU); the paper-era script ran both models in fp32. With a half-precision pipe the loss's forward passes
  (trained and frozen) run under ``torch.autocast`` to the pipe's dtype, so the fp32 copy computes in half
  as mixed-precision training does, and in fp16 the loss is scaled (a dynamic ``GradScaler``; an iteration
  whose gradient overflowed takes no step, its loss is still recorded). The rollout that draws x_t is
  sampling without gradient and runs in the pipe's dtype as before (`duobench.precision`). In fp32 nothing
  changes, bit for bit.
- One concept prompt per iteration (the concept's ``erase_prompt`` as a whole); the paper-era
  ``--seperator`` mode that samples one of several comma-separated concepts per iteration is not offered.

Artifact: ``unet_delta.safetensors`` (fp32 ``edited − base`` of the changed tensors); ``strength`` s gives
``W_base + s · delta``.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from duobench.baselines.rollout import denoise_partially, initial_noise, loss_summary, predict_noise
from duobench.baselines.weight_delta import apply_weight_delta, save_weight_delta, weight_delta
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import MethodSpec, write_card
from duobench.precision import Precision
from duobench.progress import track

VARIANTS = ("esd-u", "esd-x")
_ESD_U_EXCLUDED_PREFIXES = ("time_embedding", "conv_norm_out", "conv_out")


@dataclass(frozen=True)
class ESDConfig:
    """Hyper-parameters of the paper-era script (``train-esd.py``); ``negative_guidance`` is the paper's η."""

    negative_guidance: float = 1.0
    iterations: int = 1000
    lr: float = 1e-5
    start_guidance: float = 3.0
    ddim_steps: int = 50
    seed: int = 0


def is_trained(parameter_name: str, variant: str) -> bool:
    """Whether ``variant`` fine-tunes the UNet parameter of this (diffusers) name."""
    if variant == "esd-x":
        return "attn2" in parameter_name
    if variant == "esd-u":
        return "attn2" not in parameter_name and not parameter_name.startswith(_ESD_U_EXCLUDED_PREFIXES)
    raise DuobenchError(f"Unknown ESD variant {variant!r}; choose one of {', '.join(VARIANTS)}.")


def negatively_guided_target(noise_concept: torch.Tensor, noise_empty: torch.Tensor, eta: float) -> torch.Tensor:
    """The paper's target ``e_u − η (e_c − e_u)``: the unconditional score moved away from the concept."""
    return noise_empty - eta * (noise_concept - noise_empty)


def esd_loss(trained, frozen, latents, timestep, cond, uncond, eta: float) -> torch.Tensor:
    """MSE between the trained model's prediction for the concept and the frozen model's guided target."""
    with torch.no_grad():
        target = negatively_guided_target(
            predict_noise(frozen, latents, timestep, cond),
            predict_noise(frozen, latents, timestep, uncond),
            eta,
        )
    return F.mse_loss(predict_noise(trained, latents, timestep, cond), target)


def finetune(config: ESDConfig, pipe, concept: Concept, variant: str) -> tuple[torch.nn.Module, list[float]]:
    """A fine-tuned fp32 copy of ``pipe.unet`` and the loss per iteration; ``pipe`` is left untouched."""
    from diffusers import DDIMScheduler

    if config.ddim_steps < 1 or config.iterations < 0:
        raise DuobenchError("ESD needs ddim_steps >= 1 and iterations >= 0.")
    frozen = pipe.unet
    trained = copy.deepcopy(frozen).float().train()
    trainable = []
    for name, parameter in trained.named_parameters():
        parameter.requires_grad_(is_trained(name, variant))
        if parameter.requires_grad:
            trainable.append(parameter)
    optimizer = torch.optim.Adam(trainable, lr=config.lr)
    precision = Precision.of(frozen)
    scaler = precision.grad_scaler()
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(config.ddim_steps, device=frozen.device)
    cond, uncond = encode_token_ids(pipe, tokenize(pipe, [concept.erase_prompt, ""])).float().chunk(2)
    generator = torch.Generator().manual_seed(config.seed)
    latent_size = frozen.config.sample_size
    losses = []
    with track(f"{variant} training", config.iterations, unit="iterations") as progress:
        for _ in range(config.iterations):
            stop = int(torch.randint(config.ddim_steps, (1,), generator=generator))
            noise = initial_noise(frozen, latent_size, latent_size, generator) * ddim.init_noise_sigma
            latents = denoise_partially(frozen, ddim, noise, cond, uncond, config.start_guidance, stop)
            with precision.autocast():
                loss = esd_loss(trained, frozen, latents, ddim.timesteps[stop], cond, uncond, config.negative_guidance)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.advance(loss=losses[-1])
    return trained.requires_grad_(False).eval(), losses


def train(config: ESDConfig, pipe, concept: Concept, out_dir: Path, *, variant: str) -> None:
    trained, losses = finetune(config, pipe, concept, variant)
    edited = {name: p for name, p in trained.named_parameters() if is_trained(name, variant)}
    delta = weight_delta(pipe.unet.state_dict(), edited)
    save_weight_delta(delta, out_dir)
    write_card(
        out_dir,
        variant,
        config,
        concept,
        erase_prompt=concept.erase_prompt,
        eta_convention="target = e_u - eta * (e_c - e_u) (paper; official esd_sd.py uses eta + 1)",
        changed_tensors=len(delta),
        changed_parameters=sum(t.numel() for t in delta.values()),
        **loss_summary(losses),
    )


ESD_U = MethodSpec(
    name="esd-u",
    config_cls=ESDConfig,
    train=functools.partial(train, variant="esd-u"),
    apply=apply_weight_delta,
    description="ESD-u: fine-tune all but cross-attention toward negative guidance (paper eta=1)",
    seed_fields=("seed",),
)
ESD_X = MethodSpec(
    name="esd-x",
    config_cls=ESDConfig,
    train=functools.partial(train, variant="esd-x"),
    apply=apply_weight_delta,
    description="ESD-x: fine-tune cross-attention toward negative guidance (paper eta=1)",
    seed_fields=("seed",),
)
