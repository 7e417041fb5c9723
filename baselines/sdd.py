"""SDD: Safe self-Distillation Diffusion (Kim et al., "Towards Safe Self-Distillation of Internet-Scale
Text-to-Image Diffusion Models", ICML 2023 workshop), on diffusers.

The model distils its own unconditional score into its concept-conditioned one: the cross-attention
layers (``attn2``) of a *student* ε_θ learn

    ε_θ(z_t, c_s, t)  →  sg[ε_θ(z_t, "", t)]        (sg: stop-gradient, the target is a detached copy)

on latents z_t drawn from an EMA *teacher* θ*, and the teacher is what is kept. So the concept prompt's
score comes to equal the empty prompt's: ESD's target with η = 0, except that the target is the model being
trained, not a frozen copy.

Each iteration, as the official ``train_sdd.py`` (nannullna/safe-diffusion@a2e820c) does it:

1. k ~ U{0..N−1}, N = ``ddim_steps`` (50); z_T ~ N(0, I); z_t = k DDIM steps (η = 0) of the **teacher** from
   z_T with classifier-free guidance s_g = ``guidance`` (3) on the concept prompt c_p (``:505-532``).
2. t ~ U{T(1 − (k+1)/N), …, T(1 − k/N) − 1}, T = the scheduler's training steps (1000): the DDPM timesteps
   of DDIM step k's interval, which holds ``ddim.timesteps[k]`` where z_t sits (``:513-516``).
3. L = mean ‖ε_θ(z_t, c_s, t) − sg ε_θ(z_t, "", t)‖² (``:539-543``).
4. AdamW step (lr 1e-5, β 0.9/0.999, ε 1e-8, weight decay 1e-4, constant rate) after clipping the gradient
   norm at 1 (``:749-756``).
5. θ* ← m θ* + (1 − m) θ with m = ``ema_decay`` (0.999) (``:758-762``).

Defaults are the official script's (argparse ``:61-126`` and ``run_sdd_nudity.sh``): 1500 iterations,
batch 1, ``xattn`` (every parameter whose name contains ``attn2``), the values above. The EraseEval port
(fmp453/erase-eval ``train_methods/train_sdd.py``) takes weight decay 1e-2 and EMA 0.998 from the paper's
appendix B; both are options (``weight_decay``, ``ema_decay``).

The target. Both the official code and its README pseudo-code take the unconditional estimate from the
*student* (``e_0 = unet_student(latents, t, c_0)`` under ``no_grad``); ``target="teacher"`` takes it from the
EMA teacher instead, a variant the official code does not have.

Deliberate differences from the official code:

- **k = 0 is pure noise, labelled as pure noise.** The official ``sample_until`` breaks out of the DDIM loop
  at ``i == until − 1``, which never happens for ``until = 0``, so in 1/N of the iterations it runs the
  whole trajectory and trains on a (nearly) clean latent labelled t ∈ [980, 1000). Here k = 0 takes no
  DDIM step: the student sees z_T at a pure-noise t, as the timestep draw intends. The official behaviour
  is not offered.
- The EMA runs over the trained (``attn2``) parameters only. The official loop runs over every parameter,
  but the others are equal in student and teacher, so ``m·p + (1 − m)·p = p`` up to float rounding; skipping
  them keeps every other tensor bit for bit the base model's and the artifact a cross-attention delta.
- One concept: c_p = c_s = the concept's ``erase_prompt``. The official multi-concept modes (``composite``,
  ``random``, ``iterative``, ``sequential`` over ``--removing_concepts``) all reduce to this for a single
  concept, which is what ``run_sdd_nudity.sh`` trains ("nudity"). Only ``xattn`` is offered of the official
  ``--finetuning_method`` choices (``full``, ``selfattn``, ``noxattn``, ``notime`` are not).
- At ``guidance`` ≤ 1 the official rollout drops the concept and samples unconditionally; ours applies the
  guidance formula at any scale (at 1 it follows the concept prompt). The default, 3, is unaffected.
- Student and teacher are fp32 copies of the pipe's UNet (the official default is fp32; its ``--use_fp16``
  autocast is not offered); the pipe itself is not touched.
- The latent is the model's native size (the official code hard-codes 64 × 64, SD1.4 at 512 px). One CPU
  ``torch.Generator`` seeded by ``seed`` draws k, t and z_T; the official code draws k and t from the global
  RNG and z_T from a CUDA generator (its run script's seed is 42), so no official run is reproduced bit for
  bit. Validation images and intermediate checkpoints every 100 steps are not written.

Artifact: ``unet_delta.safetensors`` (fp32 ``teacher − base`` of the ``attn2`` tensors); ``strength`` s gives
``W_base + s · delta``, so 0 is the base model.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from duobench.baselines.rollout import denoise_partially, initial_noise, loss_summary, predict_noise
from duobench.baselines.weight_delta import apply_weight_delta, save_weight_delta, weight_delta
from duobench.concepts import Concept
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import MethodSpec, write_card

TARGETS = ("student", "teacher")


@dataclass(frozen=True)
class SDDConfig:
    """Hyper-parameters of the official ``train_sdd.py`` / ``run_sdd_nudity.sh``."""

    iterations: int = 1500
    lr: float = 1e-5
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    guidance: float = 3.0
    ddim_steps: int = 50
    max_grad_norm: float = 1.0
    target: str = "student"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.ddim_steps < 1 or self.iterations < 0 or not 0 <= self.ema_decay <= 1:
            raise ValueError("SDD needs ddim_steps >= 1, iterations >= 0 and 0 <= ema_decay <= 1")


def is_trained(parameter_name: str) -> bool:
    """The official ``xattn`` selection: every UNet parameter of a cross-attention layer."""
    return "attn2" in parameter_name


def ddpm_interval(step: int, ddim_steps: int, train_steps: int) -> tuple[int, int]:
    """``[start, end)``: the training timesteps inside DDIM step ``step``'s interval of the schedule."""
    start = round((1 - (step + 1) / ddim_steps) * train_steps)
    end = round((1 - step / ddim_steps) * train_steps)
    return start, end


def self_distillation_loss(student, target_model, latents, timestep, concept, empty) -> torch.Tensor:
    """``MSE(ε_student(z_t, c_s, t), sg ε_target(z_t, "", t))``; ``target_model`` is the student itself in the
    official code."""
    with torch.no_grad():
        target = predict_noise(target_model, latents, timestep, empty)
    return F.mse_loss(predict_noise(student, latents, timestep, concept), target)


@torch.no_grad()
def ema_update(teacher: Iterable[torch.Tensor], student: Iterable[torch.Tensor], decay: float) -> None:
    """``θ* ← m θ* + (1 − m) θ``, in place on the teacher's tensors."""
    for teacher_tensor, student_tensor in zip(teacher, student, strict=True):
        teacher_tensor.mul_(decay).add_(student_tensor, alpha=1 - decay)


def finetune(config: SDDConfig, pipe, concept: Concept) -> tuple[torch.nn.Module, list[float]]:
    """The EMA teacher after training (an fp32 copy of ``pipe.unet``) and the loss per iteration; ``pipe`` is
    left untouched."""
    from diffusers import DDIMScheduler

    student = copy.deepcopy(pipe.unet).float().train()
    teacher = copy.deepcopy(student).requires_grad_(False).eval()
    names = [name for name, _ in student.named_parameters() if is_trained(name)]
    student.requires_grad_(False)
    trained = [student.get_parameter(name).requires_grad_(True) for name in names]
    averaged = [teacher.get_parameter(name) for name in names]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    ddim.set_timesteps(config.ddim_steps, device=student.device)
    train_steps = ddim.config.num_train_timesteps
    concept_embedding, empty = encode_token_ids(pipe, tokenize(pipe, [concept.erase_prompt, ""])).float().chunk(2)
    target_model = student if config.target == "student" else teacher
    generator = torch.Generator().manual_seed(config.seed)
    latent_size = student.config.sample_size
    losses = []
    for _ in range(config.iterations):
        step = int(torch.randint(config.ddim_steps, (1,), generator=generator))
        start, end = ddpm_interval(step, config.ddim_steps, train_steps)
        timestep = torch.randint(start, end, (1,), generator=generator).to(student.device)
        noise = initial_noise(student, latent_size, latent_size, generator) * ddim.init_noise_sigma
        # step = 0 takes no DDIM step: z_T at a pure-noise t (the official loop ran the whole trajectory here).
        latents = denoise_partially(teacher, ddim, noise, concept_embedding, empty, config.guidance, step)
        loss = self_distillation_loss(student, target_model, latents, timestep, concept_embedding, empty)
        loss.backward()
        if config.max_grad_norm > 0:
            torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema_update(averaged, trained, config.ema_decay)
        losses.append(loss.item())
    return teacher, losses


def train(config: SDDConfig, pipe, concept: Concept, out_dir: Path) -> None:
    teacher, losses = finetune(config, pipe, concept)
    edited = {name: parameter for name, parameter in teacher.named_parameters() if is_trained(name)}
    delta = weight_delta(pipe.unet.state_dict(), edited)
    save_weight_delta(delta, out_dir)
    write_card(
        out_dir,
        "sdd",
        config,
        concept,
        erase_prompt=concept.erase_prompt,
        saved_model="EMA teacher (cross-attention)",
        loss_target=f"sg eps_{config.target}(z_t, '', t)",
        changed_tensors=len(delta),
        changed_parameters=sum(t.numel() for t in delta.values()),
        **loss_summary(losses),
    )


SDD = MethodSpec(
    name="sdd",
    config_cls=SDDConfig,
    train=train,
    apply=apply_weight_delta,
    description="SDD: self-distil cross-attention so eps(concept) matches eps(''), EMA teacher kept",
    seed_fields=("seed",),
)
