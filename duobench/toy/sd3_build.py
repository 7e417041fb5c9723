"""`duobench toy build --family sd3`: train the SD3 toy model from scratch, deterministically.

Stages (the SD1 build's data, captions, VAE and latent encoding, then SD3's own training):

1. **data** — the same drawn shapes as the SD1 build (same seed, same images; `shape_dataset`);
2. **vae** — the SD1 toy's VAE weights, copied (default), or a VAE trained by the SD1 recipe
   (``vae="train"``: `duobench.toy.build.train_vae`);
3. **latents** — the posterior (mean, std) of every training image, and SD3's latent normalisation
   ``(z − shift_factor)·scaling_factor`` with shift = mean and scale = 1 / std of sampled latents (as SD3's
   0.0609 and 1.5305 were set);
4. **denoiser** — SD3Transformer2DModel and the three text encoders trained jointly from scratch by
   rectified flow as SD3 trains: x_σ = (1 − σ)·x0 + σ·ε, velocity target ε − x0, σ from a logit-normal
   u ~ σ(N(0, 1)) mapped through the scheduler's shifted schedule (diffusers' SD3 recipe), unit loss
   weights; captions padded to 77 CLIP and 77 T5 tokens (what `SD3Generator` samples with); 10% of
   captions empty for classifier-free guidance; EMA weights.

Budgets are step counts, never wall-clock: same seed and config, same weights. `SD3BuildConfig` holds
every knob; tests use a tiny one.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console

from duobench.toy.build import (
    BuildConfig,
    CaptionTokens,
    encode_latents,
    finish_build_report,
    stage_progress,
    train_vae,
    update_ema,
    warmup_cosine,
)
from duobench.toy.model import WEIGHTS_DIR as SD1_WEIGHTS_DIR
from duobench.toy.sd3_model import (
    CLIP_G_WIDTH,
    CLIP_L_WIDTH,
    WEIGHTS_DIR,
    make_clip_encoder,
    make_scheduler,
    make_t5_encoder,
    make_transformer,
    save_toy_sd3_model,
    toy_t5_tokenizer,
)
from duobench.toy.shapes import ShapeSpec, caption, shape_dataset

T5_LENGTH = 77
"""T5 tokens per caption: `duobench.sd3.MAX_SEQUENCE_LENGTH`, which the generator and DUO-SD3 use. SD3 does
not mask padding, so training at the sampling length keeps the padding states the model sees the same."""


@dataclass(frozen=True)
class SD3BuildConfig:
    """Every knob of an SD3 toy build. Seconds per step in comments are for 2 idle CPU cores: 20-step runs on
    a loaded machine (1 thread) put an SD3 toy step at 1.85x an SD1 toy UNet step (0.80 vs 0.43 s), and the
    SD1 step takes ~0.2 s on 2 idle cores. The defaults then take ~38 minutes (data 7 s, VAE copy 1 s,
    latents ~30 s, transformer + text encoders ~37 min)."""

    seed: int = 0
    train_images: int = 60_000  # the SD1 build's; drawing them takes ~7 s
    vae: str = "sd1-toy"  # "sd1-toy": copy duobench/toy/weights/vae; "train": the SD1 recipe; or a VAE folder
    vae_steps: int = 900  # only with vae="train": bs64, ~0.22 s/step (as the SD1 build)
    vae_batch: int = 64
    vae_lr: float = 1e-3
    denoiser_steps: int = 6_000  # bs64, 77 + 77 text tokens, ~0.37 s/step; twice the SD1 UNet's 3,000 steps
    denoiser_batch: int = 64
    denoiser_lr: float = 5e-4  # stable from step 0 with 100 warm-up steps (loss 2.15 → 0.94 in 250 steps)
    weight_decay: float = 1e-2
    logit_mean: float = 0.0  # SD3's logit-normal timestep sampling, u = sigmoid(N(mean, std))
    logit_std: float = 1.0
    caption_dropout: float = 0.1
    ema_decay: float = 0.999
    warmup_steps: int = 100
    log_every: int = 100


def build_vae(images: torch.Tensor, config: SD3BuildConfig, console: Console):
    """The SD1 toy's VAE (fp32), or one trained by the SD1 recipe, or one from a folder."""
    from diffusers import AutoencoderKL

    if config.vae == "train":
        sd1_config = BuildConfig(
            seed=config.seed,
            vae_steps=config.vae_steps,
            vae_batch=config.vae_batch,
            vae_lr=config.vae_lr,
            warmup_steps=config.warmup_steps,
            log_every=config.log_every,
        )
        return train_vae(images, sd1_config, console)
    folder = SD1_WEIGHTS_DIR / "vae" if config.vae == "sd1-toy" else Path(config.vae)
    return AutoencoderKL.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()


def sd3_latent_normalisation(means: torch.Tensor, stds: torch.Tensor, seed: int) -> tuple[float, float]:
    """SD3's (shift_factor, scaling_factor): the mean and 1 / std of sampled latents, so that the
    transformer sees ``(z − shift)·scale`` with mean 0 and std 1."""
    generator = torch.Generator().manual_seed(seed)
    sampled = means + stds * torch.randn(means.shape, generator=generator)
    return float(sampled.mean()), float(1.0 / sampled.std())


def sample_timesteps(scheduler, count: int, config: SD3BuildConfig, generator: torch.Generator):
    """(timesteps, sigmas) as diffusers' SD3 training recipe draws them: u = sigmoid(n), n ~ N(mean, std),
    index ``int(u·1000)`` into the scheduler's training schedule (descending, shifted), its timestep and σ."""
    normal = torch.randn(count, generator=generator) * config.logit_std + config.logit_mean
    steps = scheduler.config.num_train_timesteps
    index = (torch.sigmoid(normal) * steps).long().clamp(0, steps - 1)
    return scheduler.timesteps[index].float(), scheduler.sigmas[index].float()


def flow_matching_loss(transformer, clean, noise, sigmas, timesteps, prompt_embeds, pooled_embeds) -> torch.Tensor:
    """SD3's rectified-flow loss: the transformer's velocity at x_σ = (1 − σ)·x0 + σ·ε against ε − x0,
    squared error averaged over every element (the logit-normal scheme's weights are all 1)."""
    sigma = sigmas.reshape(-1, 1, 1, 1)
    noisy = (1.0 - sigma) * clean + sigma * noise
    velocity = transformer(
        hidden_states=noisy,
        timestep=timesteps,
        encoder_hidden_states=prompt_embeds,
        pooled_projections=pooled_embeds,
        return_dict=False,
    )[0]
    return F.mse_loss(velocity.float(), (noise - clean).float())


def encode_captions(text_encoder, text_encoder_2, text_encoder_3, clip_ids, t5_ids):
    """The conditioning `StableDiffusion3Pipeline.encode_prompt` makes, with gradients: both CLIP encoders'
    penultimate states side by side, zero-padded to T5's width, then T5's states; the pooled projections
    side by side. Both CLIP encoders share one tokenizer, so one ``clip_ids`` serves both."""
    first = text_encoder(clip_ids, output_hidden_states=True)
    second = text_encoder_2(clip_ids, output_hidden_states=True)
    t5_states = text_encoder_3(t5_ids)[0]
    clip_states = torch.cat([first.hidden_states[-2], second.hidden_states[-2]], dim=-1)
    clip_states = F.pad(clip_states, (0, t5_states.shape[-1] - clip_states.shape[-1]))
    return torch.cat([clip_states, t5_states], dim=-2), torch.cat([first.text_embeds, second.text_embeds], dim=-1)


def make_text_encoders(t5_vocab_size: int):
    return make_clip_encoder(CLIP_L_WIDTH), make_clip_encoder(CLIP_G_WIDTH), make_t5_encoder(t5_vocab_size)


def train_denoiser(
    latent_means: torch.Tensor,
    latent_stds: torch.Tensor,
    specs: tuple[ShapeSpec, ...],
    shift_factor: float,
    scaling_factor: float,
    config: SD3BuildConfig,
    console: Console,
):
    """Joint flow-matching training of the transformer and the three text encoders; returns their EMA
    copies (transformer, CLIP-L, CLIP-G, T5) and the mean loss of the last 200 steps."""
    from duobench.tokenizer import sd_clip_tokenizer

    torch.manual_seed(config.seed + 3)
    generator = torch.Generator().manual_seed(config.seed + 3)
    rng = np.random.default_rng(config.seed + 3)
    t5_tokenizer = toy_t5_tokenizer()
    transformer = make_transformer().train()
    encoders = [encoder.train() for encoder in make_text_encoders(len(t5_tokenizer))]
    networks = [transformer, *encoders]
    ema_networks = [copy.deepcopy(network).eval() for network in networks]
    parameters = [p for network in networks for p in network.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.denoiser_lr, weight_decay=config.weight_decay)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.denoiser_steps, config.warmup_steps))
    scheduler = make_scheduler()
    clip_tokens, t5_tokens = CaptionTokens(sd_clip_tokenizer()), CaptionTokens(t5_tokenizer, T5_LENGTH)
    losses: list[float] = []
    with stage_progress(console, "transformer+text", config.denoiser_steps, config.log_every) as advance:
        for step in range(config.denoiser_steps):
            index = torch.randint(len(latent_means), (config.denoiser_batch,), generator=generator)
            noise_for_latents = torch.randn(latent_means[index].shape, generator=generator)
            latents = latent_means[index] + latent_stds[index] * noise_for_latents
            clean = (latents - shift_factor) * scaling_factor
            captions = ["" if rng.random() < config.caption_dropout else caption(specs[i], rng) for i in index.tolist()]
            timesteps, sigmas = sample_timesteps(scheduler, config.denoiser_batch, config, generator)
            noise = torch.randn(clean.shape, generator=generator)
            prompt_embeds, pooled_embeds = encode_captions(*encoders, clip_tokens(captions), t5_tokens(captions))
            loss = flow_matching_loss(transformer, clean, noise, sigmas, timesteps, prompt_embeds, pooled_embeds)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
            for ema_network, network in zip(ema_networks, networks, strict=True):
                update_ema(ema_network, network, decay)
            losses.append(loss.item())
            advance(f"loss {np.mean(losses[-100:]):.4f}")
    return ema_networks, float(np.mean(losses[-200:]))


def parameter_counts(networks: dict[str, torch.nn.Module]) -> dict[str, int]:
    return {name: sum(p.numel() for p in network.parameters()) for name, network in networks.items()}


def build_toy_sd3(
    out_dir: Path | None = None, config: SD3BuildConfig | None = None, console: Console | None = None
) -> dict:
    """Train the SD3 toy model into ``out_dir`` (default ``duobench/toy/weights_sd3/``); return the build
    report, which is also written there as ``build.json`` (config, seconds per stage, latent normalisation,
    final loss, parameter counts, library versions)."""

    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    config = config or SD3BuildConfig()
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    report: dict = {"family": "sd3", "config": asdict(config), "seconds": seconds}

    started = time.perf_counter()
    data = shape_dataset(config.train_images, config.seed)
    seconds["data"] = time.perf_counter() - started
    console.log(f"drew {len(data.images)} training images")

    started = time.perf_counter()
    vae = build_vae(data.images, config, console)
    seconds["vae"] = time.perf_counter() - started

    started = time.perf_counter()
    means, stds = encode_latents(vae, data.images, console, config.log_every)
    shift_factor, scaling_factor = sd3_latent_normalisation(means, stds, config.seed + 2)
    vae.register_to_config(shift_factor=shift_factor, scaling_factor=scaling_factor)
    seconds["latents"] = time.perf_counter() - started
    report["vae"] = {"source": config.vae, "shift_factor": shift_factor, "scaling_factor": scaling_factor}
    console.log(f"latent shift factor {shift_factor:.4f}, scaling factor {scaling_factor:.4f}")

    started = time.perf_counter()
    (transformer, *encoders), final_loss = train_denoiser(
        means, stds, data.specs, shift_factor, scaling_factor, config, console
    )
    seconds["denoiser"] = time.perf_counter() - started
    report["denoiser"] = {"final_loss": final_loss}
    names = ("transformer", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")
    report["parameters"] = parameter_counts(dict(zip(names, (transformer, *encoders, vae), strict=True)))
    save_toy_sd3_model(transformer, vae, *encoders, make_scheduler(), out_dir)

    return finish_build_report(report, out_dir, console, "SD3 toy model")
