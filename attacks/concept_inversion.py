"""Concept Inversion (Pham, Marshall, Cohen, Mittal, Hegde; ICLR 2024): textual inversion of one new token
through the *unlearned* model, on images of the concept made by the base model; then ``"<tok> " + prompt``.

Training (the official ``concept_inversion.py`` for ESD/UCE/FMN/SA/AC, I2P protocol):

- data: the base model's images of the first ``num_train_images`` prompts of the attacked set (each with its
  row's seed), captioned ``"<tok> " + prompt``, randomly mirrored; every step draws each example's latents
  from the VAE posterior, ``(mean + std * n) * scaling_factor`` with fresh ``n`` (the official
  ``vae.encode(pixels).latent_dist.sample()``). The images and their mirror images are encoded once and the
  posterior's mean and std kept, so a step costs no VAE pass; the draws come from the attack's seeded
  generator, so a run is deterministic. ``sample_posterior=False`` trains on the posterior mean instead;
- loss: ``MSE(eps, eps_unlearned(x_t, t, E("<tok> " + prompt)))`` with ``t ~ U[0, 1000)``, through the
  unlearned UNet; only the new token's embedding (initialised from ``initializer``) is trained;
- AdamW (betas 0.9/0.999, weight decay 1e-2), constant learning rate 5e-3 scaled by batch 4 x gradient
  accumulation 4 (``--scale_lr``: 0.08 effective on one GPU), 5000 steps (``train.sh``).

The learned token is trained once per (unlearned model, prompt set, config) and kept in the attack's
``prepare`` folder as ``token-<hash>.safetensors`` in diffusers' textual-inversion format
(``{placeholder: (1, D)}``, loadable with ``pipe.load_textual_inversion``).

Evaluation form, a choice: a new token cannot be added to the tokenizer of every method's pipeline without
resizing its text encoder, so each attacked prompt is saved as its full (77, D) prompt embedding,
``E([start, <tok>, prompt..., end, pad])`` through the unlearned model's text encoder, and replayed with the
engine's ``embedding`` field. For methods that keep SD's text encoder (DUO, ESD, UCE, SPM) this is exactly
what a pipeline with the loaded token would compute. Only the epsilon-prediction loss variant is
implemented (the official NP and SLD variants target inference-time guidance defenses, not weight edits).
``Budget.steps`` overrides the training steps.

Precision (`duobench.precision`): the learned vector and its AdamW state are fp32; with a half-precision
model the text encoder and UNet run under ``torch.autocast`` to its dtype, and in fp16 the loss is scaled (a
dynamic ``GradScaler``) and a step whose accumulated gradient overflowed is skipped (its loss is still
recorded). In fp32 nothing changes, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import torch
from PIL import Image

from duobench.attacks.base import AttackLog, AttackModels, AttackResult, Budget, item_seed
from duobench.attacks.diffusion import denoising_loss, generate_rows, require_epsilon_prediction
from duobench.attacks.text_encoding import assemble_ids, encode_with_token_embeddings, prompt_ids
from duobench.cache import atomic_write_bytes
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.precision import Precision
from duobench.progress import track
from duobench.prompts import PromptRow

LOSS_CURVE_POINTS = 100


@dataclass(frozen=True)
class ConceptInversionConfig:
    steps: int = 5000
    batch_size: int = 4
    gradient_accumulation: int = 4
    learning_rate: float = 5e-3
    scale_lr: bool = True
    """Multiply the learning rate by batch size x accumulation, as the official ``--scale_lr`` does."""
    weight_decay: float = 1e-2
    num_train_images: int = 25
    initializer: str = ""
    """A single-token word the new token starts from; default: the concept's first erase word."""
    placeholder: str = "<concept-inversion>"
    mirror: bool = True
    sample_posterior: bool = True
    """Draw the training latents from the VAE posterior every step, as the official code does; False: its mean."""
    seed: int = 0


@dataclass
class InversionData:
    """Training examples: latents, their mirror images' latents, and the caption ids (token at position 1).

    ``latents`` / ``mirrored`` are the VAE posterior means and ``std`` / ``mirrored_std`` its standard
    deviations, all in scaled latent space; without the stds the latents are used as they are."""

    latents: torch.Tensor
    mirrored: torch.Tensor
    ids: torch.Tensor
    std: torch.Tensor | None = None
    mirrored_std: torch.Tensor | None = None


@torch.no_grad()
def image_posteriors(vae, images: Sequence[Image.Image]) -> tuple[torch.Tensor, torch.Tensor]:
    """The VAE posterior of each RGB image as (mean, std), both times the scaling factor, in float32."""
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0) for image in images])
    posterior = vae.encode(pixels.permute(0, 3, 1, 2).to(device=vae.device, dtype=vae.dtype)).latent_dist
    scale = vae.config.scaling_factor
    return (posterior.mean * scale).float(), (posterior.std * scale).float()


def caption_ids(tokenizer, token_id: int, prompt: str) -> list[int]:
    """``[start, <tok>, prompt ids (truncated to fit), end, padding]``."""
    room = tokenizer.model_max_length - 3
    return assemble_ids(tokenizer, [token_id, *prompt_ids(tokenizer, prompt)[:room]])


def token_condition(text_encoder, table: torch.Tensor, ids: torch.Tensor, vector: torch.Tensor) -> torch.Tensor:
    """Prompt embeddings of ``ids`` with the embedding at position 1 replaced by ``vector``."""
    embeddings = table[ids.to(table.device)]
    inserted = vector.to(embeddings.device).expand(len(ids), 1, -1)
    return encode_with_token_embeddings(
        text_encoder, ids, torch.cat([embeddings[:, :1], inserted, embeddings[:, 2:]], 1)
    )


def invert_token(
    unet,
    text_encoder,
    alphas_cumprod: torch.Tensor,
    data: InversionData,
    initial: torch.Tensor,
    config: ConceptInversionConfig,
    steps: int,
    rng: torch.Generator,
) -> tuple[torch.Tensor, list[float]]:
    """Textual inversion of one vector through ``unet``; the learned vector and the loss of every step."""
    table = text_encoder.get_input_embeddings().weight.detach().float()
    vector = initial.detach().float().clone().requires_grad_(True)
    scale = config.batch_size * config.gradient_accumulation if config.scale_lr else 1
    optimizer = torch.optim.AdamW(
        [vector],
        lr=config.learning_rate * scale,
        betas=(0.9, 0.999),
        weight_decay=config.weight_decay,
        eps=1e-8,
    )
    device = data.latents.device
    train_timesteps = len(alphas_cumprod)
    precision = Precision.of(unet)
    scaler = precision.grad_scaler()
    losses = []
    with track("Concept Inversion training", steps, unit="steps") as progress:
        for _ in range(steps):
            total = 0.0
            for _ in range(config.gradient_accumulation):
                picks = torch.randint(0, len(data.ids), (config.batch_size,), generator=rng)
                mirror = (torch.rand(config.batch_size, generator=rng) < 0.5) & config.mirror
                flip = mirror.to(device).view(-1, 1, 1, 1)
                latents = torch.where(flip, data.mirrored[picks], data.latents[picks])
                if config.sample_posterior and data.std is not None and data.mirrored_std is not None:
                    std = torch.where(flip, data.mirrored_std[picks], data.std[picks])
                    latents = latents + std * torch.randn(latents.shape, generator=rng).to(device)
                timesteps = torch.randint(0, train_timesteps, (config.batch_size,), generator=rng)
                noise = torch.randn(latents.shape, generator=rng).to(device)
                with precision.autocast():
                    condition = token_condition(text_encoder, table, data.ids[picks], vector)
                    loss = denoising_loss(unet, alphas_cumprod, latents, condition, timesteps, noise)
                (gradient,) = torch.autograd.grad(scaler.scale(loss / config.gradient_accumulation), vector)
                vector.grad = gradient if vector.grad is None else vector.grad + gradient
                total += float(loss.detach()) / config.gradient_accumulation
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad()
            losses.append(total)
            progress.advance(loss=total)
    return vector.detach(), losses


def chunk_means(values: list[float], points: int) -> list[float]:
    """``values`` averaged over at most ``points`` equal consecutive chunks (a readable loss curve)."""
    if len(values) <= points:
        return list(values)
    chunks = torch.tensor(values).tensor_split(points)
    return [float(chunk.mean()) for chunk in chunks]


class ConceptInversion:
    """Concept Inversion: a token learned through the unlearned model by textual inversion, then prepended."""

    name: ClassVar[str] = "concept-inversion"
    access: ClassVar[str] = "white-box"
    config_cls: ClassVar[type] = ConceptInversionConfig
    shares_work_across_prompts: ClassVar[bool] = True
    """Every prompt reuses one learned token, so a torchrun job runs this attack on one rank."""

    def __init__(self, config: ConceptInversionConfig) -> None:
        self.config = config

    def prepare(self, concept: Concept, models: AttackModels, rows: Sequence[PromptRow]) -> None:
        require_epsilon_prediction(models.target_pipe)
        self.models = models
        self.train_rows = list(rows[: self.config.num_train_images])
        word = self.config.initializer or (concept.erase_words[0] if concept.erase_words else concept.erase_prompt)
        ids = prompt_ids(models.tokenizer, word)
        if len(ids) != 1:
            raise DuobenchError(
                f"Concept Inversion's initializer {word!r} is {len(ids)} tokens; it must be one token. "
                "Pass options initializer=<a single-token word> (e.g. the concept's main noun)."
            )
        self.initializer_id = ids[0]

    def attack(self, rows: Sequence[PromptRow], budget: Budget) -> Iterator[AttackResult]:
        started = time.perf_counter()
        vector, token_path, curve = self._learned_token(budget.steps or self.config.steps)
        training_seconds = time.perf_counter() - started
        pipe = self.models.target_pipe
        table = pipe.text_encoder.get_input_embeddings().weight.detach().float()
        for row in rows:
            started = time.perf_counter()
            ids = torch.tensor([caption_ids(self.models.tokenizer, self.initializer_id, row.prompt)])
            with torch.no_grad():
                embedding = token_condition(pipe.text_encoder, table, ids, vector)[0]
            log = AttackLog(
                losses=curve,
                seconds=time.perf_counter() - started,
                extra={"learned_token": str(token_path), "training_seconds": training_seconds},
            )
            text = f"{self.config.placeholder} {row.prompt}"
            yield AttackResult.from_row(self.name, row, text=text, replay="embedding", embedding=embedding, log=log)

    def _learned_token(self, steps: int) -> tuple[torch.Tensor, Path, list[float]]:
        """Train the token, or load it if this model, prompt set and config already trained it."""
        from safetensors.torch import load_file, save

        config, models = self.config, self.models
        identity = {
            "config": asdict(config),
            "steps": steps,
            "rows": [(row.prompt, row.seed, row.guidance) for row in self.train_rows],
        }
        key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
        path = models.workdir / f"token-{key}.safetensors"
        card = path.with_suffix(".json")
        if path.exists() and card.exists():
            return load_file(path)[config.placeholder][0], path, json.loads(card.read_text())["loss_curve"]
        pipe = models.target_pipe
        images = generate_rows(models.base_pipe, self.train_rows, models.settings)
        latents, std = image_posteriors(pipe.vae, images)
        mirrored, mirrored_std = image_posteriors(
            pipe.vae, [image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for image in images]
        )
        ids = torch.tensor([caption_ids(models.tokenizer, self.initializer_id, r.prompt) for r in self.train_rows])
        data = InversionData(latents, mirrored, ids, std, mirrored_std)
        initial = pipe.text_encoder.get_input_embeddings().weight[self.initializer_id].detach()[None]
        seed = item_seed(self.train_rows[0], config.seed) if self.train_rows else config.seed
        rng = torch.Generator().manual_seed(seed)
        vector, losses = invert_token(
            pipe.unet, pipe.text_encoder, pipe.scheduler.alphas_cumprod, data, initial, config, steps, rng
        )
        curve = chunk_means(losses, LOSS_CURVE_POINTS)
        atomic_write_bytes(path, save({config.placeholder: vector.cpu().contiguous()}))
        atomic_write_bytes(card, json.dumps({**identity, "loss_curve": curve}, default=str).encode())
        return vector[0], path, curve
