"""PNO: Prompt-Noise Optimization (Peng et al., "Safeguarding Text-to-Image Generation via Inference-Time
Prompt-Noise Optimization", arXiv 2412.03876), as a sampling-replacing hook on duobench's generator.

PNO changes no weight. It samples every item itself, with a DDIM chain whose every random input is explicit:
the trajectory ``z = (x_T, z_1 … z_T)`` (start noise and one noise per step, weighted by η·σ_t), and a
differentiable toxicity classifier (the *guard objective*, never the evaluation judge) scores the decoded
image: ``toxic = 5 − 5·p_unsafe``, ``loss = −toxic`` (the reference's Q16 loss, ``pno_main.py:31-57``). Per
item (``pno_main.py:268-472``):

1. **random search**: sample up to ``random_trials`` fresh trajectories; stop as soon as the best reward
   exceeds ``threshold`` (2.5, i.e. p_unsafe < 0.5);
2. otherwise **optimise** the best trajectory and the prompt embeddings jointly (both CFG halves: the
   unconditional row is a variable too, as in the reference) with AdamW (lr 0.07), at most ``opt_steps``
   iterations; each iteration re-samples the whole chain with gradient checkpointing per UNet call,
   decodes, scores, keeps the best sample, stops once it is safe, else backpropagates through the objective,
   the VAE decoder and the chain, and takes a step on

       γ · loss + reg(z)

3. the **noise regulariser** reg(z) (`noise_regularizer`, ``pno_main.py:387-466``): the flattened noise
   (all of z when η > 0, x_T alone when η = 0) is cut into n blocks of d = 4^subsample numbers, read as n
   draws of a d-dimensional standard normal. Two concentration bounds give log-probabilities that the draws'
   mean and covariance are as far from 0 and I as they are:

       log P_mean = min(−n·‖m‖² / (2d), −log 2)
       log P_cov  = min(−n·max(0, √(1 + ‖Σ − I‖₂) − 1 − √(d/n))² / 2, −log 2)

   with m the block mean and Σ = XᵀX/n; reg = −(log P_mean + log P_cov) on the sequential split plus the
   same averaged over ``shuffles`` random permutations of the numbers. Inside the likely region both terms
   sit at the clamp (reg = 4·log 2, no gradient): it only pushes back noise that stopped looking Gaussian.

The best sample over all chains is the item's image.

Hyper-parameters (defaults = the reference's, except η): ``random_trials`` 5 (hard-coded there),
``opt_steps`` 5, ``lr`` 0.07, ``threshold`` 2.5, ``gamma`` 1.0, ``no_reg`` False, ``subsample`` 1,
``shuffles`` 100 (hard-coded there), ``variables`` "both" (``--opt_variable``: both / noise / prompt),
``max_grad_norm`` 1.0 (hard-coded there), ``gradient_checkpointing`` True (as there; False trades memory for S
fewer UNet evaluations per update), ``eta`` **1.0** (see below); duobench's own: ``max_unet_evaluations``
None (the trial and step caps alone bound the cost) and ``seed`` 0 (salts the noise drawn beyond the item's
own x_T; a leaderboard's training seeds set it). The CFG scale and the number of steps
are the item's (the reference's defaults, CFG 10 and 50 steps, are its protocol, not the method's).

The objective. ``objective`` names a judge preset with a differentiable ``unsafe_probability(images)``
(images in [0, 1], gradient to the pixels); "" = the concept's ``reward_judge`` (toy: a second,
independently trained star detector; nudity/violence: ``q16-vit-b32``, the reference's only objective:
open_clip ViT-B/32 with its ``Q16_prompts.p``). It may not be the concept's evaluation judge: the
reference reports "Best Q16" with the very head it optimised (judge leakage), which any classifier-guided
search wins by construction. The run refuses that before any work (``MethodSpec.scorer_field``).

Cost. One *UNet evaluation* is one UNet call for one item (its CFG pair of rows). A random trial costs S
(the item's steps); an optimisation iteration S for the forward, plus S recomputations in the backward
(checkpointing). Worst case per item: (random_trials + 2·opt_steps − 1)·S = 700 at 50 steps; an item already
safe at its first sample costs S. ``max_unet_evaluations`` caps it per item: no chain is started (and no
update taken whose result could not be sampled) beyond it. The hook keeps per item (`PNOHook.stats`, keyed
by the `WorkItem`) the evaluations, trials, iterations, updates, p_unsafe of the first and the best sample and
why it stopped; each image carries them (`duobench.cache.SAMPLING_INFO`), cached with it, into DSR's audit
rows (``sampling``).

Deliberate differences from the reference code:

- ``eta`` defaults to **1.0**, the reference's to 0.0. At η = 0 the per-step noise weight η·σ_t is zero, so
  z_1 … z_T get no gradient and only x_T (and the prompt) are optimised, not the "noise trajectory" of the
  paper's problem (x_0 = DDIM(c, x_T, z_1 … z_T)). ``eta=0`` gives the reference's behaviour.
- ``clip_grad_norm_`` is applied **before** ``optimizer.step()`` (the reference clips after the step, which
  does nothing). Each of the two variables is clipped to ``max_grad_norm`` on its own, as there. Adam's step
  hardly depends on the gradient's scale, so the fix matters little; it is the code the reference meant.
- Per-item determinism. Trial 0 starts from the item's own noise (`Generator.initial_latents`: the base
  model's x_T); the per-step noises, the later trials' trajectories and the permutations of the regulariser
  come from CPU generators seeded by (``seed``, the item's seed, trial or iteration). The reference draws
  them all from one global stream, so an image there depends on the prompts before it. Items are processed
  one at a time, so an image does not depend on its batch either (the reference also does one prompt at a
  time; batching the random search across items would change float results with the batch).
- The final iteration takes no backward step: its update could never be sampled (the reference computes
  and discards it). Same images, S fewer UNet evaluations.
- The chain is diffusers' ``DDIMScheduler.step`` written out with the noise as an input (same formula as
  the reference's ``SequentialDDIM``, with the scheduler's previous-timestep rule and x̂_0 clipping when the
  scheduler's config asks for it; SD1's does not). As in the reference, the last step adds no noise.
  Other samplers are refused: set ``scheduler: ddim`` in the run's sampler settings.
- fp32 variables and gradients whatever the model's dtype (the reference runs under fp16 autocast); the
  UNet and VAE run in their own dtype. Gradients are taken with respect to the variables only
  (``torch.autograd.grad``): the model's ``requires_grad`` flags and ``.grad`` are left alone.
- ``strength`` (duobench's knob, not the paper's) scales the stopping threshold: an item counts as safe
  once ``toxic > strength · threshold``, i.e. p_unsafe < 1 − strength/2. At strength 1 that is the reference's
  rule; lower strengths search and optimise only the more clearly unsafe samples. Strength 0 hands sampling
  back to the generator, so images are bit-identical to the base model's. Any strength > 0 samples with
  PNO's stochastic DDIM (η > 0), which differs from the base sampler even where nothing is optimised.
- At CFG scale ≤ 1 (or on a model without CFG) the chain uses the prompt row alone, as the generator
  does; the reference always uses CFG.
- ``opt_time`` (optimise only the last k steps, reference default: all) is not exposed: all steps are
  optimised. The trajectory keeps the reference's layout (T + 1 noises, the last step's unused), and the
  regulariser sees all of it, as there. A flattened noise whose length is not a multiple of the block size
  is cut to one (the reference would fail).
- Nothing is written to disk per prompt (the reference saves images, trajectories and CLIP scores, keyed by
  the prompt's first 10 characters, so prompts sharing them overwrite each other) and no CLIP score is
  computed: duobench measures with its own judges. The reference's other slips (``cuda`` hard-coded in the
  loss, a final summary that calls ``.mean()`` on a list) have no counterpart here.
- The other hooks: their conditioning edits apply (`Generator.condition`); a hook that replaces the
  guidance step cannot be combined with PNO (refused); ``unet_call`` contexts are not entered, since the
  optimised rows change every iteration: hooks see each UNet call as white-box attacks' calls are seen.

Artifact: ``card.json`` only (PNO trains nothing), holding the config and the resolved objective.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.utils.checkpoint
from PIL import Image

from duobench.cache import SAMPLING_INFO
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import Generator, SamplingHook
from duobench.items import WorkItem
from duobench.methods import MethodSpec, read_card, scorer_name, write_card

VARIABLES = ("both", "noise", "prompt")


@dataclass(frozen=True)
class PNOConfig:
    """PNO's hyper-parameters (the reference's defaults but η) and the guard objective ("" = the concept's
    ``reward_judge``)."""

    objective: str = ""
    eta: float = 1.0
    random_trials: int = 5
    opt_steps: int = 5
    lr: float = 0.07
    threshold: float = 2.5
    gamma: float = 1.0
    no_reg: bool = False
    subsample: int = 1
    shuffles: int = 100
    variables: str = "both"
    max_grad_norm: float = 1.0
    max_unet_evaluations: int | None = None
    gradient_checkpointing: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variables not in VARIABLES:
            raise ValueError(f"variables must be one of {', '.join(VARIABLES)}, got {self.variables!r}")
        if self.eta < 0:
            raise ValueError(f"eta must be >= 0, got {self.eta}")
        if self.random_trials < 1:
            raise ValueError(f"random_trials must be >= 1 (an item needs one sample), got {self.random_trials}")
        if self.opt_steps < 0 or self.shuffles < 0 or self.subsample < 0:
            raise ValueError("opt_steps, shuffles and subsample must be >= 0")
        if self.max_unet_evaluations is not None and self.max_unet_evaluations < 1:
            raise ValueError(f"max_unet_evaluations must be >= 1 or None, got {self.max_unet_evaluations}")


# --- the noise regulariser ---------------------------------------------------------------------------------


def block_log_probs(flat: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """log P_mean and log P_cov of ``flat`` read as n draws of a ``block``-dimensional standard normal."""
    n = flat.numel() // block
    draws = flat[: n * block].view(n, block)
    mean = draws.mean(dim=0)
    scaled = draws / math.sqrt(n)
    covariance = scaled.T @ scaled
    mean_norm = torch.norm(mean)
    identity = torch.eye(block, device=flat.device, dtype=flat.dtype)
    cov_norm = torch.linalg.matrix_norm(covariance - identity, ord=2)
    mean_log_prob = torch.clamp(-(n * mean_norm**2) / 2 / block, max=-math.log(2))
    cov_diff = torch.clamp(torch.sqrt(1 + cov_norm) - 1 - math.sqrt(block / n), min=0)
    cov_log_prob = torch.clamp(-n * cov_diff**2 / 2, max=-math.log(2))
    return mean_log_prob, cov_log_prob


def noise_regularizer(flat: torch.Tensor, subsample: int, permutations: Sequence[torch.Tensor]) -> torch.Tensor:
    """reg = −(log P_mean + log P_cov) of the sequential split, plus their mean over the permuted splits."""
    block = 4**subsample
    mean_lp, cov_lp = block_log_probs(flat, block)
    reg = -(mean_lp + cov_lp)
    if permutations:
        shuffled = [sum(block_log_probs(flat[p], block)) for p in permutations]
        reg = reg - sum(shuffled) / len(permutations)
    return reg


# --- the DDIM chain with explicit noise --------------------------------------------------------------------


class DDIMChain:
    """``DDIMScheduler.step`` for one item's S steps, with η·σ_t·z_t added from a given noise z_t.

    The trajectory tensor has the reference's layout, (S + 1, C, h, w): ``[S]`` is x_T and ``[S − 1 − i]`` the
    noise of step i (so ``[0]``, the last step's, is unused: the last step adds no noise).
    """

    def __init__(self, scheduler, steps: int, eta: float) -> None:
        config = scheduler.config
        if config.get("prediction_type", "epsilon") != "epsilon" or config.get("thresholding", False):
            raise DuobenchError("PNO's DDIM chain supports epsilon prediction without thresholding only.")
        scheduler.set_timesteps(steps)
        self.timesteps = scheduler.timesteps.tolist()
        self.init_noise_sigma = float(scheduler.init_noise_sigma)
        self.clip = float(config.clip_sample_range) if config.get("clip_sample", False) else None
        gap = config.num_train_timesteps // scheduler.num_inference_steps
        alphas = scheduler.alphas_cumprod
        self.alpha, self.alpha_prev, self.sigma = [], [], []
        for i, t in enumerate(self.timesteps):
            prev = t - gap
            alpha = alphas[t]
            alpha_prev = alphas[prev] if prev >= 0 else scheduler.final_alpha_cumprod
            variance = (1 - alpha_prev) / (1 - alpha) * (1 - alpha / alpha_prev)
            last = i == len(self.timesteps) - 1
            self.alpha.append(alpha)
            self.alpha_prev.append(alpha_prev)
            self.sigma.append(0.0 if last else eta * float(variance) ** 0.5)

    def __len__(self) -> int:
        return len(self.timesteps)

    def step(self, index: int, noise_prediction: torch.Tensor, sample: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        alpha, alpha_prev, sigma = self.alpha[index], self.alpha_prev[index], self.sigma[index]
        original = (sample - (1 - alpha) ** 0.5 * noise_prediction) / alpha**0.5
        if self.clip is not None:
            original = original.clamp(-self.clip, self.clip)
        direction = (1 - alpha_prev - sigma**2) ** 0.5 * noise_prediction
        previous = alpha_prev**0.5 * original + direction
        if sigma > 0:
            previous = previous + sigma * z
        return previous


def _seed(*parts: Any) -> int:
    digest = hashlib.sha256(json.dumps(["pno", *parts]).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


# --- the hook ----------------------------------------------------------------------------------------------


class PNOHook(SamplingHook):
    """Samples every item by PNO's random search and prompt-noise optimisation against the guard objective."""

    name = "pno"

    def __init__(self, config: PNOConfig, objective: str, strength: float = 1.0, scorer=None) -> None:
        if not 0.0 <= strength <= 1.0:
            raise DuobenchError(f"PNO strength must be in [0, 1], got {strength}.")
        self.config = config
        self.objective = objective
        self.strength = float(strength)
        self.scorer = scorer
        """The guard objective (``unsafe_probability``); loaded from the judge preset on first use."""
        self.stats: dict[WorkItem, dict[str, Any]] = {}
        """Per item: UNet evaluations, trials, iterations, updates, p_unsafe first/best, why it stopped."""

    @property
    def replaces_sampling(self) -> bool:  # strength 0: the generator samples as without PNO
        return self.strength > 0

    def identity(self) -> dict[str, Any]:
        return {"objective": self.objective, "strength": self.strength}

    def sample(self, generator: Generator, items: Sequence[WorkItem]) -> list[Image.Image]:
        from diffusers import DDIMScheduler

        guider = next((h.name for h in generator.hooks if h.replaces_guidance), None)
        if guider is not None:
            raise DuobenchError(f"PNO samples with plain CFG and cannot be combined with {guider!r}'s guidance step.")
        if not isinstance(generator.pipe.scheduler, DDIMScheduler):
            raise DuobenchError(
                f"PNO samples with DDIM (its noise trajectory is DDIM's); these items ask for the "
                f"{items[0].scheduler!r} sampler. Set scheduler: ddim in the run's sampler settings."
            )
        images = [self.sample_item(generator, item) for item in items]
        images = generator.pipe.image_processor.postprocess(
            torch.cat(images), output_type="pil", do_denormalize=[True] * len(images)
        )
        images = [image.convert("RGB") for image in images]
        for item, image in zip(items, images, strict=True):
            image.info[SAMPLING_INFO] = json.dumps({"sampler": "pno", **self.stats[item]}, sort_keys=True)
        return images

    def objective_model(self, device: torch.device):
        if self.scorer is None:
            from duobench.registry import METRICS

            self.scorer = METRICS.get(self.objective)(device=device)
        return self.scorer

    def sample_item(self, generator: Generator, item: WorkItem) -> torch.Tensor:
        """One item's best decoded image, (1, 3, H, W) in [−1, 1]."""
        config, pipe = self.config, generator.pipe
        scorer = self.objective_model(generator.device)
        chain = DDIMChain(pipe.scheduler, item.steps, config.eta)
        steps = len(chain)
        budget = config.max_unet_evaluations or math.inf
        if budget < steps:
            raise DuobenchError(f"PNO's max_unet_evaluations {budget} cannot pay for one {steps}-step sample.")
        threshold = self.strength * config.threshold
        stats = {"unet_evaluations": 0, "trials": 0, "iterations": 0, "updates": 0, "stopped": "trials"}

        conditioning = generator.condition([item])
        cfg = item.guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        rows = conditioning.prompt_embeds
        if cfg:
            rows = torch.cat([conditioning.negative_embeds, rows])
        rows = rows.to(device=generator.device, dtype=torch.float32)

        def reward_of(image: torch.Tensor) -> tuple[torch.Tensor, float]:
            p_unsafe = scorer.unsafe_probability(((image / 2) + 0.5).clamp(0, 1))[0]
            return 5 - 5 * p_unsafe, float(p_unsafe)

        best_reward, best_image, best_trajectory = -math.inf, None, None
        with torch.no_grad():
            for trial in range(config.random_trials):
                if stats["unet_evaluations"] + steps > budget:
                    stats["stopped"] = "budget"
                    break
                trajectory = self.trajectory(generator, item, trial, steps)
                image = self.run(generator, chain, rows, trajectory, float(item.guidance), cfg, False, stats)
                reward, p_unsafe = reward_of(image)
                stats["trials"] += 1
                stats.setdefault("p_unsafe_first", p_unsafe)
                if float(reward) > best_reward:
                    best_reward, best_image, best_trajectory = float(reward), image, trajectory
                    stats["p_unsafe_best"] = p_unsafe
                if best_reward > threshold:
                    stats["stopped"] = "safe"
                    break

        if best_reward <= threshold and config.opt_steps > 0 and stats["stopped"] != "budget":
            best_image = self.optimise(
                generator, item, chain, rows, best_trajectory, best_image, best_reward, threshold, budget, stats
            )
        self.stats[item] = stats
        return best_image

    def optimise(self, generator, item, chain, rows, trajectory, best_image, best_reward, threshold, budget, stats):
        """Stage 2: AdamW on (trajectory, prompt rows); returns the best image over all chains."""
        config, steps = self.config, len(chain)
        noise = trajectory.detach().clone().requires_grad_(config.variables in ("both", "noise"))
        embeds = rows.detach().clone().requires_grad_(config.variables in ("both", "prompt"))
        variables = [v for v in (noise, embeds) if v.requires_grad]
        optimizer = torch.optim.AdamW(variables, lr=config.lr)
        backward_cost = steps if config.gradient_checkpointing else 0
        cfg = rows.shape[0] == 2
        stats["stopped"] = "opt_steps"
        for iteration in range(config.opt_steps):
            if stats["unet_evaluations"] + steps > budget:
                stats["stopped"] = "budget"
                break
            optimizer.zero_grad()
            with torch.enable_grad():
                image = self.run(generator, chain, embeds, noise, float(item.guidance), cfg, True, stats)
                p_unsafe = self.objective_model(generator.device).unsafe_probability(((image / 2) + 0.5).clamp(0, 1))[0]
                reward = 5 - 5 * p_unsafe
            stats["iterations"] += 1
            if float(reward) > best_reward:
                best_reward, best_image = float(reward), image.detach()
                stats["p_unsafe_best"] = float(p_unsafe)
            if best_reward > threshold:
                stats["stopped"] = "safe"
                break
            if iteration == config.opt_steps - 1:
                break  # an update here could never be sampled
            if stats["unet_evaluations"] + backward_cost + steps > budget:
                stats["stopped"] = "budget"
                break
            with torch.enable_grad():
                loss = -reward
                if not config.no_reg:
                    flat = noise.flatten() if config.eta > 0 else noise[-1].flatten()
                    permutations = self.permutations(item, iteration, flat.numel(), flat.device)
                    loss = config.gamma * loss + noise_regularizer(flat, config.subsample, permutations)
                gradients = torch.autograd.grad(loss, variables)
            for variable, gradient in zip(variables, gradients, strict=True):
                variable.grad = gradient
                torch.nn.utils.clip_grad_norm_([variable], config.max_grad_norm)  # before the step (fix)
            optimizer.step()
            stats["updates"] += 1
        return best_image

    def trajectory(self, generator: Generator, item: WorkItem, trial: int, steps: int) -> torch.Tensor:
        """Trial ``trial``'s (S + 1, C, h, w) noise: trial 0 starts from the item's own x_T."""
        channels = generator.pipe.unet.config.in_channels
        factor = generator.pipe.vae_scale_factor
        shape = (steps + 1, channels, item.height // factor, item.width // factor)
        rng = torch.Generator("cpu").manual_seed(_seed(self.config.seed, int(item.seed), "trajectory", trial))
        trajectory = torch.randn(shape, generator=rng, dtype=torch.float32)
        if trial == 0:
            trajectory[-1] = generator.initial_latents([item])[0]
        return trajectory.to(generator.device)

    def permutations(self, item: WorkItem, iteration: int, size: int, device: torch.device) -> list[torch.Tensor]:
        rng = torch.Generator("cpu").manual_seed(_seed(self.config.seed, int(item.seed), "permutations", iteration))
        return [torch.randperm(size, generator=rng).to(device) for _ in range(self.config.shuffles)]

    def run(self, generator, chain, rows, trajectory, guidance, cfg, differentiable, stats) -> torch.Tensor:
        """The chain from ``trajectory`` and decoding: one (1, 3, H, W) image in [−1, 1], fp32."""
        pipe = generator.pipe
        unet, vae = pipe.unet, pipe.vae
        steps = len(chain)

        def predict(model_input: torch.Tensor, embeddings: torch.Tensor, timestep: int) -> torch.Tensor:
            stats["unet_evaluations"] += 1  # inside the checkpointed function: recomputations count too
            output = unet(
                model_input.to(unet.dtype), timestep, encoder_hidden_states=embeddings.to(unet.dtype), return_dict=False
            )[0]
            return output.float()

        checkpointed = differentiable and self.config.gradient_checkpointing
        latents = trajectory[steps].unsqueeze(0) * chain.init_noise_sigma
        for index, t in enumerate(chain.timesteps):
            model_input = torch.cat([latents] * 2) if cfg else latents
            model_input = pipe.scheduler.scale_model_input(model_input, t)
            if checkpointed:
                noise = torch.utils.checkpoint.checkpoint(predict, model_input, rows, t, use_reentrant=False)
            else:
                noise = predict(model_input, rows, t)
            if cfg:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance * (text - uncond)
            latents = chain.step(index, noise, latents, trajectory[steps - 1 - index].unsqueeze(0))
        scale = vae.config.scaling_factor
        return vae.decode((latents / scale).to(vae.dtype), return_dict=False)[0].float()


def train(config: PNOConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Nothing to train: the card records the config and the resolved objective (refusing judge leakage)."""
    write_card(out_dir, "pno", config, concept, objective=scorer_name(config.objective, concept))


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> PNOHook:
    """The PNO hook for the card's configuration; ``pipe`` is left as it is."""
    card = read_card(Path(artifact_dir))
    if card.get("method") != "pno" or "objective" not in card:
        raise DuobenchError(f"{artifact_dir} is not a PNO artifact (its card.json has no objective).")
    known = {f.name for f in fields(PNOConfig)}
    config = PNOConfig(**{k: v for k, v in card["config"].items() if k in known})
    return PNOHook(config, card["objective"], strength)


PNO = MethodSpec(
    name="pno",
    config_cls=PNOConfig,
    train=train,
    apply=apply,
    description="PNO: per-item random search and prompt-noise optimisation against a guard classifier",
    touches=("guidance",),
    seed_fields=("seed",),
    scorer_field="objective",
)
