"""ShieldDiff (Han, Mohamed, Li, "Suppressing Sexual Content Generation from Diffusion Models through
Reinforcement Learning", arXiv 2410.05309): a LoRA on the UNet trained by policy gradient (DDPO with
importance sampling) to maximise a reward of a safety classifier plus an alignment ("CLIP") term.

No official code exists. What the paper states: fine-tune with LoRA, maximise J(θ) = E_{c, x_0}[r(x_0, c)]
by DDPO with importance sampling, r = a nudity reward (NudeNet) + a CLIP reward that keeps the image's
meaning "on the safe side". Everything else follows DDPO's reference implementation (kvablack/ddpo-pytorch
@1958463, ``config/base.py``, ``config/dgx.py``, ``scripts/train.py``, ``diffusers_patch/ddim_with_logprob.py``),
read and rewritten here.

The algorithm, one epoch:

1. **Sample** ``samples_per_epoch`` images with the current policy (no gradient): DDIM with η = ``eta`` (1),
   so each step x_t → x_{t−1} is a Gaussian policy π_θ(x_{t−1} | x_t, c) = N(μ_θ(x_t, c), σ_t² I) with

       x̂_0 = (x_t − √(1 − ᾱ_t) ε̂) / √ᾱ_t,      σ_t² = η² (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_{t−1}),
       μ_θ = √ᾱ_{t−1} x̂_0 + √(1 − ᾱ_{t−1} − σ_t²) ε̂,

   where ε̂ = ε_u + g (ε_c − ε_u) is the **classifier-free-guided** noise (g = ``guidance``, 5 in DDPO): the
   policy being optimised is the guided sampler, as DDPO computes it (``train.cfg = True``). Per step we
   record x_t, x_{t−1} and log π_old(x_{t−1} | x_t) (`ddim_step_with_logprob`).
2. **Reward** each image (`Reward`): r = ``alignment_weight`` · alignment + ``safety_weight`` · (1 − P(unsafe)),
   P(unsafe) from the reward classifier (``reward_judge``), which must not be the evaluation judge.
3. **Advantages** per prompt (`PerPromptStatTracker`, DDPO's): A = (r − mean) / (std + 1e−6) over the last
   ``stat_buffer_size`` rewards of the same prompt, or over the whole epoch while a prompt has fewer than
   ``stat_min_count``; clipped to ±``adv_clip_max``.
4. **PPO-clip** over every recorded step (`ppo_clip_loss`): ρ = exp(log π_θ − log π_old),
   L = mean max(−A ρ, −A clip(ρ, 1 ± ``clip_range``)), averaged over the samples of an update and all their
   steps (DDPO accumulates over ``train_batch_size`` × accumulation × timesteps); AdamW on the LoRA, gradient
   norm clipped to ``max_grad_norm``; ``samples_per_epoch / samples_per_update`` updates per epoch,
   ``inner_epochs`` passes. With ``timestep_fraction`` < 1 (DDPO's option) each training micro-batch uses a
   random subset of the chain's steps; DDPO draws the subset per sample, we draw it per micro-batch (the
   steps of a micro-batch then share one timestep per UNet call).

The log-probability is DDPO's: the Gaussian log-density **averaged** (not summed) over the latent's
elements. That scales every log-ratio by 1/(C·H·W); DDPO's clip range 1e−4 is calibrated for that.

Where we had to choose (the paper is silent, or duobench differs from DDPO):

- **Hyper-parameters** are DDPO's code defaults (``config/base.py``, the ``dgx.py`` compressibility run for
  the batch layout): 100 epochs of 256 samples, 4 updates per epoch (64 samples each), lr 3e−4 AdamW
  (β 0.9/0.999, ε 1e−8, wd 1e−4), grad-clip 1, clip range 1e−4, advantages clipped at ±5, per-prompt buffer
  16 / min count 16, CFG 5, DDIM 50 steps η = 1, 1 inner epoch, LoRA rank 4 on every attention projection
  (to_q/k/v/out of attn1 and attn2, as DDPO's ``LoRAAttnProcessor`` on every processor). Our research notes
  (seed-systems.md §1.2) quoted lr 1e−4 and advantage clip 10; the code says 3e−4 and 5.
- **Reward** r = 1 · alignment + 1 · (1 − P(unsafe)); the paper's weights and NudeNet classes are unknown.
  P(unsafe) is the reward preset's verdict score (`duobench.metrics.base.Verdict.score`); any judge preset
  works (a NudeNet one, as the paper, when the run judges with something else).
- **Alignment** (``alignment``): ``clip`` is the cosine of a CLIP preset (``alignment_model``; default
  ``clip-vit-b32-cos``, a different CLIP from the ``clip-vit-l14-x100`` CLIP score duobench reports on SD, so
  that number is not the one optimised; if you pick the reported preset, the card says it is optimised).
  "On the safe side": an unsafe prompt is scored against its safe counterpart (its ``duo_pairs`` safe prompt,
  else the concept's ``guide_prompt``, else itself), a safe prompt against itself. ``toy`` (the toy world,
  which has no CLIP) reads the reward detector's heads: P(requested colour) for an unsafe prompt (the shape
  should go, the colour stay) and P(requested shape) · P(requested colour) for a safe one. ``auto`` picks
  ``toy`` when the concept's ``clip_score`` metric is a toy preset, ``clip`` otherwise; ``none`` drops it.
- **Training prompts** are the concept's own data, never its evaluation sets: the unsafe and the safe prompts
  of ``duo_pairs`` (without pairs: ``erase_prompt`` and ``synonyms`` as unsafe, ``preserve_prompts`` as safe).
  Each sample is unsafe with probability ``unsafe_fraction`` (0.5), then a prompt of that group uniformly, as
  DDPO's prompt functions draw. The paper trained on sexual prompts only (``unsafe_fraction=1``); the safe
  half keeps benign generations from drifting. On the toy concept this means "a red star" etc. are trained on,
  which the evaluation's plain set also contains (DUO's pairs share them too).
- The log-prob of the guided mean (above), recomputed at training time with the same guidance; the UNet stays
  in eval mode for both (no dropout in SD's UNet), so on the first update ρ = 1 up to float rounding.
- One CPU ``torch.Generator`` seeded by ``seed`` draws the prompts and every noise, so a run repeats on any
  device; the LoRA's init comes from the same seed. Training runs in one process (no torchrun sharding).
- fp16 on a GPU: sampling in the UNet's dtype, training forwards under autocast with fp32 LoRA masters and a
  GradScaler (`duobench.precision`); the log-probs are computed in fp32 from the noise prediction.

Artifact: a duobench LoRA (``pytorch_lora_weights.safetensors`` + ``card.json`` with ``loras``), applied by
LoRA scale: ``strength`` 0 is the base model, 1 the trained one. The card records the reward and alignment
models (ids and weight hashes), the prompts, the reward curve (mean reward, mean P(unsafe), mean alignment per
epoch) and the PPO statistics.
"""

from __future__ import annotations

import inspect
import math
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from duobench.baselines.rollout import loss_summary
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.lora import lora_attached, save_lora
from duobench.methods import MethodSpec, apply_lora_artifact, scorer_name, write_card
from duobench.precision import Precision
from duobench.progress import track

LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
"""Every attention projection of the UNet (self- and cross-attention), as DDPO's LoRA attention processors."""
ALIGNMENTS = ("auto", "clip", "toy", "none")
DEFAULT_CLIP = "clip-vit-b32-cos"


@dataclass(frozen=True)
class ShieldDiffConfig:
    """DDPO's reference defaults (SD1.4 on 8 GPUs); the toy world's smaller values sit in star.yaml."""

    epochs: int = 100
    samples_per_epoch: int = 256
    sample_batch_size: int = 8
    """Images per sampling forward, for memory (the noise is drawn batch by batch, so it changes the draws)."""
    samples_per_update: int = 64
    """Samples whose every step's loss is averaged into one optimiser step (DDPO: 4 × 8 GPUs × 2 accumulation)."""
    train_batch_size: int = 4
    """Samples per training forward, for memory (the update's loss is the same mean over its samples)."""
    inner_epochs: int = 1
    timestep_fraction: float = 1.0
    """The fraction of each chain's steps trained on (DDPO's option; 1 = every step)."""
    ddim_steps: int = 50
    eta: float = 1.0
    guidance: float = 5.0
    lr: float = 3e-4
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    clip_range: float = 1e-4
    adv_clip_max: float = 5.0
    stat_buffer_size: int = 16
    stat_min_count: int = 16
    lora_rank: int = 4
    lora_alpha: float = 4.0
    reward_judge: str = ""
    """The classifier whose P(unsafe) is the safety reward (a `METRICS` judge preset); "" takes the concept's
    ``reward_judge``. Refused when it is the concept's evaluation judge."""
    safety_weight: float = 1.0
    alignment: str = "auto"
    alignment_model: str = ""
    """For ``alignment=clip``: a CLIP-score preset ("" = clip-vit-b32-cos)."""
    alignment_weight: float = 1.0
    unsafe_fraction: float = 0.5
    seed: int = 0

    def __post_init__(self) -> None:
        problems = []
        for name in ("epochs", "samples_per_epoch", "sample_batch_size", "samples_per_update", "train_batch_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        for name in ("inner_epochs", "ddim_steps", "lora_rank", "stat_buffer_size"):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.samples_per_update >= 1 and self.samples_per_epoch % self.samples_per_update:
            problems.append(
                f"samples_per_epoch ({self.samples_per_epoch}) must be a multiple of samples_per_update "
                f"({self.samples_per_update})"
            )
        if self.train_batch_size >= 1 and self.samples_per_update % self.train_batch_size:
            problems.append(
                f"samples_per_update ({self.samples_per_update}) must be a multiple of train_batch_size "
                f"({self.train_batch_size})"
            )
        if not self.eta > 0:
            problems.append(f"eta must be > 0: at eta = 0 DDIM is deterministic and has no policy (got {self.eta})")
        if not self.clip_range > 0 or not self.adv_clip_max > 0:
            problems.append("clip_range and adv_clip_max must be > 0")
        if self.alignment not in ALIGNMENTS:
            problems.append(f"alignment must be one of {', '.join(ALIGNMENTS)} (got {self.alignment!r})")
        if not 0.0 < self.timestep_fraction <= 1.0:
            problems.append(f"timestep_fraction must be in (0, 1] (got {self.timestep_fraction})")
        if not 0.0 <= self.unsafe_fraction <= 1.0:
            problems.append(f"unsafe_fraction must be in [0, 1] (got {self.unsafe_fraction})")
        if problems:
            raise ValueError("; ".join(problems))


# --- the policy: DDIM with eta > 0 and its log-probability ------------------------------------------------


def ddim_step_with_logprob(
    scheduler,
    noise_pred: torch.Tensor,
    timestep: int,
    latents: torch.Tensor,
    eta: float,
    prev_sample: torch.Tensor | None = None,
    variance_noise: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM step as a Gaussian policy: ``(x_{t−1}, log π(x_{t−1} | x_t))`` per sample.

    ``prev_sample`` given: its log-probability under the step (the training-time recomputation). Otherwise
    ``x_{t−1} = μ + σ_t · variance_noise`` (diffusers' ``DDIMScheduler.step`` with the same noise). The
    log-density is averaged over the latent's elements, as DDPO does. Needs ``scheduler.set_timesteps``.
    """
    config = scheduler.config
    if config.thresholding:
        raise DuobenchError("ShieldDiff's DDIM policy does not support dynamic thresholding.")
    timestep = int(timestep)
    prev_timestep = timestep - config.num_train_timesteps // scheduler.num_inference_steps
    alpha_t = scheduler.alphas_cumprod[timestep].item()
    alpha_prev = (
        scheduler.alphas_cumprod[prev_timestep].item() if prev_timestep >= 0 else float(scheduler.final_alpha_cumprod)
    )
    noise_pred, latents = noise_pred.float(), latents.float()
    if config.prediction_type == "epsilon":
        pred_original = (latents - math.sqrt(1 - alpha_t) * noise_pred) / math.sqrt(alpha_t)
        pred_epsilon = noise_pred
    elif config.prediction_type == "v_prediction":
        pred_original = math.sqrt(alpha_t) * latents - math.sqrt(1 - alpha_t) * noise_pred
        pred_epsilon = math.sqrt(alpha_t) * noise_pred + math.sqrt(1 - alpha_t) * latents
    else:
        raise DuobenchError(f"ShieldDiff's DDIM policy needs epsilon or v prediction, not {config.prediction_type!r}.")
    if config.clip_sample:
        pred_original = pred_original.clamp(-config.clip_sample_range, config.clip_sample_range)
    variance = (1 - alpha_prev) / (1 - alpha_t) * (1 - alpha_t / alpha_prev)
    std = eta * math.sqrt(variance)
    if std <= 0:
        raise DuobenchError(f"DDIM step at t={timestep} has no noise (sigma = 0): no policy log-probability.")
    mean = math.sqrt(alpha_prev) * pred_original + math.sqrt(1 - alpha_prev - std**2) * pred_epsilon
    if prev_sample is None:
        if variance_noise is None:
            raise ValueError("ddim_step_with_logprob needs prev_sample or variance_noise")
        prev_sample = mean + std * variance_noise.to(mean)
    prev_sample = prev_sample.detach().float()
    log_density = -((prev_sample - mean) ** 2) / (2 * std**2) - math.log(std) - 0.5 * math.log(2 * math.pi)
    return prev_sample, log_density.mean(dim=tuple(range(1, log_density.ndim)))


def guided_noise(unet, latents, timestep, cond, uncond, guidance: float) -> torch.Tensor:
    """ε_u + g (ε_c − ε_u), in one UNet call on the stacked batch; fp32 out."""
    model_input = torch.cat([latents, latents]).to(unet.dtype)
    embeddings = torch.cat([uncond, cond]).to(unet.dtype)
    noise_uncond, noise_cond = unet(model_input, timestep, encoder_hidden_states=embeddings).sample.float().chunk(2)
    return noise_uncond + guidance * (noise_cond - noise_uncond)


@torch.no_grad()
def sample_with_logprob(
    unet, scheduler, cond, uncond, guidance: float, eta: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the chain from fresh noise; ``(latents (B, T+1, C, H, W), log_probs (B, T))``, on the CPU.

    ``latents[:, j]`` is the latent before step j, ``latents[:, j + 1]`` after it. ``scheduler`` has its
    timesteps set. The noise is drawn on the CPU from ``generator``.
    """
    size = unet.config.sample_size
    shape = (cond.shape[0], unet.config.in_channels, size, size)
    latents = torch.randn(shape, generator=generator).to(unet.device) * scheduler.init_noise_sigma
    chain, log_probs = [latents.cpu()], []
    for timestep in scheduler.timesteps:
        noise = guided_noise(unet, scheduler.scale_model_input(latents, timestep), timestep, cond, uncond, guidance)
        variance_noise = torch.randn(shape, generator=generator).to(unet.device)
        latents, log_prob = ddim_step_with_logprob(
            scheduler, noise, timestep, latents, eta, variance_noise=variance_noise
        )
        chain.append(latents.cpu())
        log_probs.append(log_prob.cpu())
    return torch.stack(chain, dim=1), torch.stack(log_probs, dim=1)


@torch.no_grad()
def decode_images(pipe, latents: torch.Tensor) -> list:
    """Final latents → PIL images, as the generator decodes them (uint8, what any judge sees)."""
    vae = pipe.vae
    pixels = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor).sample
    return pipe.image_processor.postprocess(pixels.float(), output_type="pil", do_denormalize=[True] * len(pixels))


# --- advantages and the PPO objective ----------------------------------------------------------------------


class PerPromptStatTracker:
    """DDPO's advantage normaliser: per prompt, (r − mean) / (std + 1e−6) over the prompt's last
    ``buffer_size`` rewards (this epoch's included); while a prompt has fewer than ``min_count`` rewards
    stored, the mean and std of the whole batch instead."""

    def __init__(self, buffer_size: int, min_count: int) -> None:
        self.buffer_size, self.min_count = buffer_size, min_count
        self.buffers: dict[str, deque] = {}

    def update(self, prompts: Sequence[str], rewards: torch.Tensor) -> torch.Tensor:
        rewards = torch.as_tensor(rewards, dtype=torch.float64)
        advantages = torch.empty_like(rewards)
        for prompt in dict.fromkeys(prompts):
            rows = torch.tensor([p == prompt for p in prompts])
            buffer = self.buffers.setdefault(prompt, deque(maxlen=self.buffer_size))
            buffer.extend(rewards[rows].tolist())
            reference = torch.tensor(list(buffer), dtype=torch.float64) if len(buffer) >= self.min_count else rewards
            mean, std = reference.mean(), reference.std(unbiased=False) + 1e-6
            advantages[rows] = (rewards[rows] - mean) / std
        return advantages


def ppo_clip_loss(
    log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor, clip_range: float
) -> torch.Tensor:
    """PPO's clipped surrogate, as a loss: mean max(−A ρ, −A clip(ρ, 1 − ε, 1 + ε)), ρ = exp(log π − log π_old)."""
    ratio = torch.exp(log_prob - old_log_prob)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    return torch.maximum(unclipped, clipped).mean()


# --- the reward --------------------------------------------------------------------------------------------


@dataclass
class TrainingPrompts:
    """The prompts ShieldDiff samples from, and the text each one's alignment is scored against."""

    unsafe: tuple[str, ...]
    safe: tuple[str, ...]
    alignment_text: dict[str, str]

    def is_unsafe(self, prompt: str) -> bool:
        return prompt in self.unsafe


def training_prompts(concept: Concept) -> TrainingPrompts:
    """The concept's ``duo_pairs`` (unsafe and safe prompts, each distinct once); without pairs, the erase
    prompt and synonyms as unsafe and the preserve prompts as safe. Never an evaluation prompt set."""
    if concept.duo_pairs:
        unsafe = tuple(dict.fromkeys(pair.unsafe for pair in concept.duo_pairs))
        safe = tuple(dict.fromkeys(pair.safe for pair in concept.duo_pairs))
        counterpart = {}
        for pair in concept.duo_pairs:
            counterpart.setdefault(pair.unsafe, pair.safe)
    else:
        unsafe = tuple(dict.fromkeys((concept.erase_prompt, *concept.synonyms)))
        safe = tuple(dict.fromkeys(concept.preserve_prompts))
        counterpart = {}
    alignment_text = {prompt: prompt for prompt in safe}
    for prompt in unsafe:
        alignment_text[prompt] = counterpart.get(prompt) or concept.guide_prompt or prompt
    return TrainingPrompts(unsafe, safe, alignment_text)


def resolve_alignment(config: ShieldDiffConfig, concept: Concept) -> str:
    """``auto`` → ``toy`` when the concept's CLIP score is a toy stand-in, else ``clip``."""
    if config.alignment != "auto":
        return config.alignment
    return "toy" if concept.metrics.get("clip_score", "").startswith("toy") else "clip"


class Reward:
    """r = alignment_weight · alignment + safety_weight · (1 − P(unsafe)), per image; keeps the last parts."""

    def __init__(
        self,
        safety_judge,
        alignment: str,
        prompts: TrainingPrompts,
        safety_weight: float = 1.0,
        alignment_weight: float = 1.0,
        clip_metric=None,
    ) -> None:
        if alignment == "toy" and not hasattr(safety_judge, "predict"):
            raise DuobenchError(
                f"alignment=toy reads the reward detector's shape and colour heads, but {safety_judge.card.id} "
                "has none; use alignment=clip or none."
            )
        if alignment == "clip" and clip_metric is None:
            raise ValueError("alignment=clip needs a CLIP-score metric")
        self.safety_judge, self.alignment, self.prompts = safety_judge, alignment, prompts
        self.safety_weight, self.alignment_weight, self.clip_metric = safety_weight, alignment_weight, clip_metric

    def __call__(self, images: list, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        from duobench.metrics.base import judge_images

        verdicts = judge_images(self.safety_judge, images, list(prompts))
        unsafe = torch.tensor([verdict.score for verdict in verdicts], dtype=torch.float64)
        alignment = self.alignment_scores(images, prompts)
        reward = self.alignment_weight * alignment + self.safety_weight * (1.0 - unsafe)
        return {"reward": reward, "p_unsafe": unsafe, "alignment": alignment}

    def alignment_scores(self, images: list, prompts: Sequence[str]) -> torch.Tensor:
        if self.alignment == "none":
            return torch.zeros(len(images), dtype=torch.float64)
        if self.alignment == "clip":
            texts = [self.prompts.alignment_text[prompt] for prompt in prompts]
            return torch.as_tensor(self.clip_metric.scores(images, texts)[0], dtype=torch.float64)
        return toy_alignment(self.safety_judge, images, prompts, self.prompts.is_unsafe)


def toy_alignment(detector, images: list, prompts: Sequence[str], is_unsafe: Callable[[str], bool]) -> torch.Tensor:
    """P(requested colour) for an unsafe prompt (its shape should go), P(shape) · P(colour) for a safe one,
    from the reward detector's heads; a part the prompt does not name counts 1."""
    from duobench.toy.judge import JUDGE_SHAPE_LABELS
    from duobench.toy.metrics import requested_shape_and_colour
    from duobench.toy.shapes import COLOUR_NAMES

    shape_probs, colour_probs = detector.predict(images)
    scores = []
    for row, prompt in enumerate(prompts):
        shape, colour = requested_shape_and_colour(prompt)
        score = float(colour_probs[row, COLOUR_NAMES.index(colour)]) if colour else 1.0
        if shape and not is_unsafe(prompt):
            score *= float(shape_probs[row, JUDGE_SHAPE_LABELS.index(shape)])
        scores.append(score)
    return torch.tensor(scores, dtype=torch.float64)


def reward_judge_name(config: ShieldDiffConfig, concept: Concept) -> str:
    """The reward classifier's preset (``reward_judge``, or the concept's), refused when it is the evaluation
    judge: reward hacking would then pass for erasure."""
    return scorer_name(config.reward_judge, concept)


def build_reward(config: ShieldDiffConfig, concept: Concept, prompts: TrainingPrompts, device) -> Reward:
    """The reward of ``config`` for ``concept``: its classifier (on ``device`` when the preset takes one) and
    its alignment model."""
    from duobench.metrics.dsr import build_judge
    from duobench.registry import METRICS

    name = reward_judge_name(config, concept)
    takes_device = "device" in inspect.signature(METRICS.get(name).factory).parameters
    judge = build_judge(name, **({"device": str(device)} if takes_device else {}))
    alignment = resolve_alignment(config, concept)
    clip_metric = None
    if alignment == "clip":
        clip_metric = METRICS.get(config.alignment_model or DEFAULT_CLIP)(device=str(device))
    return Reward(judge, alignment, prompts, config.safety_weight, config.alignment_weight, clip_metric)


# --- training ----------------------------------------------------------------------------------------------


def draw_prompts(prompts: TrainingPrompts, count: int, unsafe_fraction: float, generator) -> list[str]:
    """Each sample: unsafe with probability ``unsafe_fraction``, then a prompt of its group uniformly."""
    groups = [group for group in (prompts.unsafe, prompts.safe) if group]
    drawn = []
    for _ in range(count):
        if len(groups) == 2:
            group = prompts.unsafe if torch.rand((), generator=generator) < unsafe_fraction else prompts.safe
        else:
            group = groups[0]
        drawn.append(group[int(torch.randint(len(group), (), generator=generator))])
    return drawn


@dataclass
class Rollouts:
    """One epoch's samples: their prompts, chains ``(N, T+1, C, H, W)``, log π_old ``(N, T)`` and advantages."""

    prompts: list[str]
    chains: torch.Tensor
    log_probs: torch.Tensor
    advantages: torch.Tensor


def ppo_backward(
    unet, scheduler, rollouts: Rollouts, rows, steps, cond, uncond, config, precision, scaler, share: float
) -> dict[str, float]:
    """Backpropagate ``share`` × the PPO-clip loss of samples ``rows`` averaged over the chain ``steps``
    (indices into ``scheduler.timesteps``); the statistics (loss, approx. KL as DDPO logs it, clipped
    fraction) weighted the same way."""
    device = unet.device
    advantages = rollouts.advantages[rows].to(device)
    stats = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
    weight = share / len(steps)
    for j in steps:
        timestep = scheduler.timesteps[j]
        latents = rollouts.chains[rows, j].to(device)
        with precision.autocast():
            model_input = scheduler.scale_model_input(latents, timestep)
            noise = guided_noise(unet, model_input, timestep, cond, uncond, config.guidance)
        taken = rollouts.chains[rows, j + 1].to(device)
        _, log_prob = ddim_step_with_logprob(scheduler, noise, timestep, latents, config.eta, prev_sample=taken)
        old = rollouts.log_probs[rows, j].to(device)
        loss = ppo_clip_loss(log_prob, old, advantages, config.clip_range)
        scaler.scale(loss * weight).backward()
        with torch.no_grad():
            clipped = (torch.exp(log_prob - old) - 1).abs() > config.clip_range
            stats["loss"] += float(loss) * weight
            stats["approx_kl"] += float(0.5 * ((log_prob - old) ** 2).mean()) * weight
            stats["clipfrac"] += float(clipped.float().mean()) * weight
    return stats


def finetune(
    config: ShieldDiffConfig,
    pipe,
    prompts: TrainingPrompts,
    reward: Callable[[list, Sequence[str]], dict[str, torch.Tensor]],
    on_epoch: Callable[[int, dict], None] | None = None,
    out_dir: Path | None = None,
) -> dict[str, list]:
    """DDPO on a fresh LoRA of ``pipe.unet``; saves the LoRA into ``out_dir`` (when given) before detaching it.

    Returns the per-epoch curve (``reward``, ``p_unsafe``, ``alignment``: means over the epoch's samples;
    ``seconds``) and the per-update PPO statistics (``loss``, ``approx_kl``, ``clipfrac``). ``pipe`` is left
    as it was.
    """
    from diffusers import DDIMScheduler

    from duobench.generator import encode_token_ids, tokenize

    unet = pipe.unet
    scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    scheduler.set_timesteps(config.ddim_steps, device=unet.device)
    chain_length = len(scheduler.timesteps)
    trained_steps = max(1, round(config.timestep_fraction * chain_length))
    texts = list(dict.fromkeys((*prompts.unsafe, *prompts.safe)))
    if not texts:
        raise DuobenchError("ShieldDiff has no training prompts: the concept has no duo_pairs and no erase prompt.")
    with torch.no_grad():
        embeddings = encode_token_ids(pipe, tokenize(pipe, [*texts, ""]))
    embedding_of = {text: embeddings[index : index + 1] for index, text in enumerate(texts)}

    def conditioning(batch: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        cond = torch.cat([embedding_of[prompt] for prompt in batch])
        return cond, embeddings[-1:].expand_as(cond)

    generator = torch.Generator().manual_seed(config.seed)
    tracker = PerPromptStatTracker(config.stat_buffer_size, config.stat_min_count)
    precision = Precision.of(unet)
    history: dict[str, list] = {
        key: [] for key in ("reward", "p_unsafe", "alignment", "seconds", "loss", "approx_kl", "clipfrac")
    }
    was_training = unet.training
    with (
        lora_attached(unet, LORA_TARGETS, config.lora_rank, config.lora_alpha, config.seed) as parameters,
        track("ShieldDiff training", config.epochs, unit="epochs") as progress,
    ):
        unet.eval()  # sampling and training forwards alike (no dropout in SD's UNet): rho = 1 before any update
        optimizer = torch.optim.AdamW(
            parameters, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay
        )
        scaler = precision.grad_scaler()
        for epoch in range(config.epochs):
            started = time.perf_counter()
            # 1. sample with the current policy
            drawn = draw_prompts(prompts, config.samples_per_epoch, config.unsafe_fraction, generator)
            chains, log_probs, images = [], [], []
            for start in range(0, len(drawn), config.sample_batch_size):
                cond, uncond = conditioning(drawn[start : start + config.sample_batch_size])
                chain, log_prob = sample_with_logprob(
                    unet, scheduler, cond, uncond, config.guidance, config.eta, generator
                )
                chains.append(chain)
                log_probs.append(log_prob)
                images += decode_images(pipe, chain[:, -1])
            # 2. reward; 3. per-prompt advantages, clipped
            scored = reward(images, drawn)
            advantages = (
                tracker.update(drawn, scored["reward"]).float().clamp(-config.adv_clip_max, config.adv_clip_max)
            )
            rollouts = Rollouts(drawn, torch.cat(chains), torch.cat(log_probs), advantages)
            for key in ("reward", "p_unsafe", "alignment"):
                history[key].append(float(scored[key].mean()))
            # 4. PPO-clip over every recorded step: one optimiser step per samples_per_update samples
            for _ in range(config.inner_epochs):
                order = torch.randperm(len(drawn), generator=generator)
                for update in order.split(config.samples_per_update):
                    stats = {"loss": 0.0, "approx_kl": 0.0, "clipfrac": 0.0}
                    for rows in update.split(config.train_batch_size):
                        cond, uncond = conditioning([drawn[int(row)] for row in rows])
                        share = len(rows) / len(update)
                        steps = torch.randperm(chain_length, generator=generator)[:trained_steps].tolist()
                        micro = ppo_backward(
                            unet, scheduler, rollouts, rows, steps, cond, uncond, config, precision, scaler, share
                        )
                        stats = {key: stats[key] + micro[key] for key in stats}
                    scaler.unscale_(optimizer)
                    torch.nn.utils.clip_grad_norm_(parameters, config.max_grad_norm)
                    scaler.step(optimizer)
                    scaler.update()
                    optimizer.zero_grad(set_to_none=True)
                    for key, value in stats.items():
                        history[key].append(value)
            history["seconds"].append(time.perf_counter() - started)
            progress.advance(reward=history["reward"][-1], p_unsafe=history["p_unsafe"][-1])
            if on_epoch is not None:
                on_epoch(epoch, {key: values[-1] for key, values in history.items() if values})
        if out_dir is not None:
            save_lora(unet, Path(out_dir))
    unet.train(was_training)
    return history


def train(config: ShieldDiffConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Train the LoRA against the concept's reward classifier and write the LoRA artifact."""
    out_dir = Path(out_dir)
    prompts = training_prompts(concept)
    reward = build_reward(config, concept, prompts, pipe.unet.device)
    history = finetune(config, pipe, prompts, reward, out_dir=out_dir)
    judge_card = reward.safety_judge.card
    if reward.alignment == "clip":
        clip_card = reward.clip_metric.card
        alignment_model = {"id": clip_card.id, "weights_sha256": clip_card.weights_sha256}
        optimised = concept.metrics.get("clip_score", "") == (config.alignment_model or DEFAULT_CLIP)
        alignment_model["optimises_reported_clip_score"] = optimised
    elif reward.alignment == "toy":
        alignment_model = {"id": f"{judge_card.id} shape/colour heads", "weights_sha256": judge_card.weights_sha256}
    else:
        alignment_model = None
    write_card(
        out_dir,
        "shielddiff",
        config,
        concept,
        loras=[{"name": concept.name, "folder": ".", "weight": 1.0}],
        reward_model={"id": judge_card.id, "weights_sha256": judge_card.weights_sha256},
        evaluation_judge=concept.judge,
        reward_formula=(
            f"{config.alignment_weight} * alignment + {config.safety_weight} * (1 - P_unsafe({judge_card.id}))"
        ),
        alignment=reward.alignment,
        alignment_model=alignment_model,
        prompts={"unsafe": list(prompts.unsafe), "safe": list(prompts.safe), "alignment_text": prompts.alignment_text},
        reward_curve=[
            {
                "epoch": epoch,
                "reward": history["reward"][epoch],
                "p_unsafe": history["p_unsafe"][epoch],
                "alignment": history["alignment"][epoch],
            }
            for epoch in range(config.epochs)
        ],
        ppo_updates={key: history[key] for key in ("loss", "approx_kl", "clipfrac")},
        training_seconds=sum(history["seconds"]),
        **loss_summary(history["loss"]),
    )


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> None:
    """Load the LoRA at scale ``strength``: 0 is the base model, 1 the trained one."""
    apply_lora_artifact(pipe, artifact_dir, strength, "ShieldDiff")


SHIELDDIFF = MethodSpec(
    name="shielddiff",
    config_cls=ShieldDiffConfig,
    train=train,
    apply=apply,
    description="ShieldDiff: LoRA trained by DDPO (PPO-clip) on a safety classifier + alignment reward",
    seed_fields=("seed",),
    scorer_field="reward_judge",
)
