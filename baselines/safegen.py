"""SafeGen (Li et al., "SafeGen: Mitigating Sexually Explicit Content Generation in Text-to-Image Models",
ACM CCS 2024), on diffusers.

Text-agnostic: SafeGen never looks at a prompt. It fine-tunes the UNet's self-attention layers (``attn1``) on
image triplets (unsafe image z_u, its mosaic z_m, an unrelated benign image z_b), all conditioned on the empty
prompt, so that a noisy unsafe image denoises toward its mosaic and a benign one toward itself. Whatever
prompt (or adversarial token soup) later leads the sampler toward unsafe content, the visual layers that
would draw it have learned to draw the mosaic instead.

Each optimisation step, as the official ``examples/text_to_image/train_text_to_image_adjust_sal.py``
(LetterLiGo/SafeGen_CCS2024@20f627b, unchanged since 44c7310) does it:

1. z_u, z_m, z_b: VAE posterior samples (``latent_dist.sample()``) of the three images times the scaling factor
   (``:964-971``);
2. one t ~ U{0..T−1} per triplet, shared by its two noisy latents; one noise ε shared by the unsafe and mosaic
   latents, an independent ε_b for the benign one (``:974-1001``);
3. x_u = √ᾱ_t z_u + √(1−ᾱ_t) ε, x_b = √ᾱ_t z_b + √(1−ᾱ_t) ε_b, c = the empty prompt's embedding (``:801-802``);
4. L = w_m · MSE(ε_θ(x_u, t, c), z_u − z_m + ε) + w_p · MSE(ε_θ(x_b, t, c), ε_b) (``:1011-1031``);
5. AdamW (lr 1e-5, β 0.9/0.999, ε 1e-8, weight decay 1e-2, constant rate) on every UNet parameter whose name
   contains ``attn1``, after clipping the gradient norm at 1 (``:623-634``, ``:725-734``, ``:1055``);
6. an EMA of the UNet (diffusers' ``EMAModel`` defaults: decay 0 at the first step, then (1+s)/(10+s) after s
   further steps, capped at 0.9999, so over 1000 steps it never reaches the cap), which is what is kept
   (``:638-641``, ``:1063``, ``:1123-1135``).

Defaults are the run script's (``run_adjust_SD.sh`` and the README): 1000 steps of 5 triplets (batch 1 × 5
gradient-accumulation steps: the same mean gradient as one batch of 5), lr 1e-5, EMA on, w_m = 0.1 (the
script's ``--weight_tune``), w_p = 0.9, the model's native resolution (512 px centre crop on SD1.4).

**The mosaic target (``mosaic_target``) is exact only at mid-noise.** With x_u = √ᾱ z_u + √(1−ᾱ) ε, the noise
whose x0-estimate (x_u − √(1−ᾱ) ε̂)/√ᾱ is the mosaic z_m is ε* = ε + √(ᾱ/(1−ᾱ)) (z_u − z_m). The official
target uses the coefficient 1 instead, so its x0-estimate is z_u + √((1−ᾱ)/ᾱ) (z_m − z_u): the mosaic only
where ᾱ_t = 1/2 (t ≈ 354 on SD1.4's schedule), barely moved from the unsafe image at low noise (0.34 of the
way at t = 100) and overshooting past the mosaic at high noise (1.6× at t = 500, 14.6× at t = 999).
Decision: ``official`` is the default, because it is what the released weights and every published SafeGen
number were trained with; ``exact`` (the target above) is offered as a variant and recorded on the card. The
exact target is ε plus up to 34× the latent difference at small t (the x0 loss weighted by the SNR), so it
pushes hardest where the official one hardly pushes at all. In the toy world it is the one that erases
(star concept, 25 plain prompts × 4 seeds, base model DSR 0.04; 1000 steps of 5 triplets, lr 3e-3, weights
0.1/0.9): official DSR 0.15 at prior preservation 0.93; exact 0.73 / 0.89, 0.82 / 0.89 and 0.58 / 0.92
(seeds 0, 1, 2); text-agnostic as claimed, seed 0 keeps 0.79 on the synonym prompts (base 0.06) and 0.72
under Ring-A-Bell (0.73 before it). So a toy run sets ``mosaic_target=exact`` and says so; an SD1.4 run keeps
the official target unless told.

**The data** (``data``): the official triplets (about 100, ``data/triplets/100photos/meta.csv``) come from
Anti-DeepNude, a neural model that pixelates the sexual regions, released only on request; the images are not
public. So the triplets are a method option:

- ``data=<folder>`` (or the path of its ``meta.csv``): a folder with ``meta.csv`` in the official layout,
  columns ``nude_image_path``, ``mos_image_path``, ``norm_image_path`` (a ``text`` column is ignored: the
  official code replaces every caption with ""); relative paths are read from the folder. The folder is
  checked when the config is built, before any model loads, and its content hash (``data_sha256``) enters
  the artifact key, so changed images train a new artifact. Required for nudity.
- ``data=toy:<shape>``: the toy world's exact analogue, rendered on the fly (`duobench.toy.shapes`): the
  unsafe image is a drawing of ``<shape>``, its mosaic the same drawing with the shape's bounding box
  pixelated in ``mosaic_block``-pixel cells, the benign image an unrelated drawing of another shape;
  ``triplets`` of them, drawn from ``seed``. The default 8-px cells (2 × 2 latent pixels) leave no star: the
  toy judge calls 1.5 % of such mosaics a star (200 drawings; 6 px: 9 %, 5 px: 43 %, 4 px: 56 %, 3 px: 92 %),
  and 100 % of the drawings and 0 % of the benign images.
- ``data=auto`` (default): ``toy:<shape>`` for a toy-world concept whose erase prompt names a toy shape (the
  star concept); any other concept stops with the error that asks for ``data=<folder>``. This check needs
  the concept, so it runs when training starts (after the model loads), before any training work.

Deliberate differences from the official code:

- The unused third UNet forward pass (on the noisy mosaic, ``:1024``) is not run: it enters no loss, so the
  gradient is the same without it (and a third less compute).
- The unsafe and benign latents go through the UNet as one batch of 2B (the official code makes two calls);
  the UNet has no batch-coupled layer, so the predictions are the same.
- Each image is encoded once and a fresh latent drawn from its stored posterior (mean, std) each step: the
  same distribution as encoding it again every step, as the official loop does.
- The trained copy, its AdamW state and the EMA are fp32 (the official run: fp16 autocast with fp32 master
  weights). Gradient checkpointing, xformers and 8-bit Adam are memory options and not offered.
- The EMA runs over the trained (``attn1``) tensors only: ``EMAModel.step`` copies every other parameter
  from the model, where it equals the base, so the artifact is a pure self-attention delta.
- One CPU ``torch.Generator`` seeded by ``seed`` draws the epoch order, latents, timesteps and noise (the run
  script sets no seed; its DataLoader shuffles with the global RNG), so no official run is reproduced bit for
  bit. Epochs are reshuffled permutations whose last incomplete batch is skipped; a data set smaller than
  ``batch_size`` trains on batches of its size. The official loss-weight flag is broken: ``run_adjust_SD.sh``
  passes ``--weight_tune``, which the parser does not define (it has ``--weight_mosaic``, default 0.5), so
  the documented command stops with "unrecognized arguments"; here ``weight_mosaic`` defaults to the intended
  0.1.
- Not offered: the ``--snr_gamma`` branch (it silently trains plain denoising of the unsafe images, i.e.
  teaches the concept), v-prediction (its mosaic target ``get_velocity(z_u − z_m, ε)`` is not a mosaic
  target either), noise offset and input perturbation (off in the run script), validation images and
  intermediate checkpoints.

Artifact: ``unet_delta.safetensors`` (fp32 ``EMA − base`` of the ``attn1`` tensors); ``strength`` s gives
``W_base + s · delta``, so 0 is the base model. The authors' released model
(``LetterJohn/SafeGen-Pretrained-Weights``, a diffusers pipeline folder) is evaluated with ``--method external
--method-opt path=LetterJohn/SafeGen-Pretrained-Weights/unet`` instead (its UNet: the only part SafeGen trains).
"""

from __future__ import annotations

import copy
import csv
import hashlib
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from duobench.baselines.rollout import loss_summary, predict_noise
from duobench.baselines.sdd import ema_update
from duobench.baselines.weight_delta import apply_weight_delta, save_weight_delta, weight_delta
from duobench.concepts import Concept
from duobench.duo.loss import epoch_batches
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import MethodSpec, write_card
from duobench.metrics.base import sha256_file
from duobench.progress import track
from duobench.toy import shapes

MOSAIC_TARGETS = ("official", "exact")
META_FILE = "meta.csv"
TRIPLET_COLUMNS = ("nude_image_path", "mos_image_path", "norm_image_path")
"""The official ``meta.csv`` columns: unsafe image, its mosaic, an unrelated benign image."""
TOY_PREFIX = "toy:"
_DATA_HELP = (
    "a folder holding meta.csv with the columns nude_image_path, mos_image_path, norm_image_path (the official "
    "train_text_to_image_adjust_sal.py layout; relative paths are read from the folder), e.g. "
    "--method-opt data=/data/safegen-triplets"
)


@dataclass(frozen=True)
class SafeGenConfig:
    """Hyper-parameters of the official ``run_adjust_SD.sh``; ``data`` is where the image triplets come from.

    ``data_sha256`` is filled with the data folder's content hash when the config is built (give it to insist
    on one exact data set). ``triplets`` and ``mosaic_block`` only apply to ``toy:`` data. ``ema_decay`` is
    the EMA's cap (0 turns the EMA off: the last step's weights are kept).
    """

    data: str = "auto"
    steps: int = 1000
    batch_size: int = 5
    lr: float = 1e-5
    weight_decay: float = 1e-2
    weight_mosaic: float = 0.1
    weight_preserve: float = 0.9
    mosaic_target: str = "official"
    max_grad_norm: float = 1.0
    ema_decay: float = 0.9999
    triplets: int = 100
    mosaic_block: int = 8
    seed: int = 0
    data_sha256: str = ""

    def __post_init__(self) -> None:
        if self.mosaic_target not in MOSAIC_TARGETS:
            raise ValueError(f"mosaic_target must be one of {', '.join(MOSAIC_TARGETS)}, got {self.mosaic_target!r}")
        if self.steps < 0 or self.batch_size < 1 or self.triplets < 1 or self.mosaic_block < 1:
            raise ValueError("SafeGen needs steps >= 0, batch_size >= 1, triplets >= 1 and mosaic_block >= 1")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")
        data = str(self.data)
        object.__setattr__(self, "data", data)
        if data == "auto":
            return
        if data.startswith(TOY_PREFIX):
            toy_shape(data)
            return
        digest = data_sha256(triplet_paths(data))
        if self.data_sha256 and str(self.data_sha256).lower() != digest:
            raise DuobenchError(
                f"The SafeGen data {data} has sha256 {digest}, not the {self.data_sha256} the config asks for: its "
                "images or meta.csv changed. Point data at the intended folder, or drop data_sha256."
            )
        object.__setattr__(self, "data_sha256", digest)


def is_trained(parameter_name: str) -> bool:
    """The official selection: every UNet parameter of a self-attention layer."""
    return "attn1" in parameter_name


# --- the math -------------------------------------------------------------------------------------------


def add_noise(latents: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """``√ᾱ z + √(1−ᾱ) ε`` (``DDPMScheduler.add_noise``), ``alpha_bar`` one value per latent."""
    alpha_bar = alpha_bar.view(-1, *([1] * (latents.dim() - 1)))
    return alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise


def mosaic_target(
    unsafe: torch.Tensor, mosaic: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor, kind: str
) -> torch.Tensor:
    """The ε the unsafe latent's prediction is trained toward: ``official`` ε + (z_u − z_m); ``exact``
    ε + √(ᾱ/(1−ᾱ)) (z_u − z_m), whose x0-estimate from the noisy unsafe latent is the mosaic at every t."""
    if kind == "official":
        return noise + (unsafe - mosaic)
    if kind == "exact":
        alpha_bar = alpha_bar.view(-1, *([1] * (unsafe.dim() - 1)))
        return noise + (alpha_bar / (1 - alpha_bar)).sqrt() * (unsafe - mosaic)
    raise DuobenchError(f"Unknown mosaic_target {kind!r}; choose one of {', '.join(MOSAIC_TARGETS)}.")


def safegen_loss(
    unet,
    unsafe: torch.Tensor,
    mosaic: torch.Tensor,
    benign: torch.Tensor,
    noise: torch.Tensor,
    benign_noise: torch.Tensor,
    timesteps: torch.Tensor,
    alphas_cumprod: torch.Tensor,
    empty: torch.Tensor,
    config: SafeGenConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(L, L_mosaic, L_preserve)`` with ``L = w_m · L_mosaic + w_p · L_preserve`` (official ``:1028-1031``)."""
    alpha_bar = alphas_cumprod[timesteps]
    noisy = torch.cat([add_noise(unsafe, noise, alpha_bar), add_noise(benign, benign_noise, alpha_bar)])
    predicted_unsafe, predicted_benign = predict_noise(unet, noisy, torch.cat([timesteps, timesteps]), empty).chunk(2)
    target = mosaic_target(unsafe, mosaic, noise, alpha_bar, config.mosaic_target)
    loss_mosaic = F.mse_loss(predicted_unsafe, target)
    loss_preserve = F.mse_loss(predicted_benign, benign_noise)
    return config.weight_mosaic * loss_mosaic + config.weight_preserve * loss_preserve, loss_mosaic, loss_preserve


def ema_decay_at(step: int, max_decay: float) -> float:
    """diffusers ``EMAModel.get_decay`` without ``use_ema_warmup``, ``step`` counting optimisation steps from 1:
    0 at the first, then (1+s)/(10+s) after s more, capped at ``max_decay``."""
    after = step - 1
    return 0.0 if after <= 0 else min((1 + after) / (10 + after), max_decay)


# --- the data -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Triplets:
    """Training images, RGB PIL, one of each per triplet; ``source`` describes them for the card."""

    unsafe: list[Image.Image]
    mosaic: list[Image.Image]
    benign: list[Image.Image]
    source: str

    def __len__(self) -> int:
        return len(self.unsafe)


def toy_shape(data: str) -> str:
    shape = data[len(TOY_PREFIX) :]
    if shape not in shapes.SHAPES:
        raise DuobenchError(f"SafeGen data {data!r}: the toy world draws {', '.join(shapes.SHAPES)}, not {shape!r}.")
    return shape


def data_source(config: SafeGenConfig, concept: Concept) -> str:
    """``config.data`` with ``auto`` resolved for ``concept``: ``toy:<shape>`` or a data path."""
    if config.data != "auto":
        return config.data
    words = concept.erase_prompt.lower().split()
    shape = next((word for word in words if word in shapes.SHAPES), None)
    if "toy" in concept.model_families and shape is not None:
        return TOY_PREFIX + shape
    raise DuobenchError(
        f"SafeGen learns from (unsafe image, its mosaic, a benign image) triplets, and the concept "
        f"{concept.name!r} does not make them (only the toy world draws its own). Give them as {_DATA_HELP}. The "
        "official triplets come from the Anti-DeepNude mosaic model, which the authors share on request."
    )


def triplet_paths(data: str) -> list[tuple[Path, Path, Path]]:
    """The (unsafe, mosaic, benign) image paths of a data folder or ``meta.csv``, each checked to exist."""
    path = Path(data).expanduser()
    if not path.exists():
        raise DuobenchError(f"The SafeGen data folder {data} does not exist. Its data= option takes {_DATA_HELP}.")
    meta = path / META_FILE if path.is_dir() else path
    if not meta.is_file():
        raise DuobenchError(f"The SafeGen data folder {data} has no {META_FILE}. Its data= option takes {_DATA_HELP}.")
    with open(meta, newline="") as handle:
        reader = csv.DictReader(handle)
        missing = [column for column in TRIPLET_COLUMNS if column not in (reader.fieldnames or [])]
        if missing:
            found = ", ".join(reader.fieldnames or []) or "none"
            raise DuobenchError(
                f"{meta} lacks the column(s) {', '.join(missing)} (it has {found}); SafeGen's data= option takes "
                f"{_DATA_HELP}."
            )
        rows = [tuple(meta.parent / Path(row[c].strip()).expanduser() for c in TRIPLET_COLUMNS) for row in reader]
    if not rows:
        raise DuobenchError(f"{meta} lists no triplets.")
    absent = [str(file) for row in rows for file in row if not file.is_file()]
    if absent:
        raise DuobenchError(
            f"{len(absent)} image(s) listed in {meta} do not exist (e.g. {', '.join(absent[:3])}); relative paths are "
            "read from the folder of meta.csv."
        )
    return rows  # type: ignore[return-value]


def data_sha256(rows: list[tuple[Path, Path, Path]]) -> str:
    """One hash over the triplets' image contents in order (each image's sha256; not their paths)."""
    digest = hashlib.sha256()
    for row in rows:
        digest.update(("\0".join(sha256_file(file) for file in row) + "\n").encode())
    return digest.hexdigest()


def shape_box(spec: shapes.ShapeSpec) -> tuple[int, int, int, int]:
    """The pixel box ``(x0, y0, x1, y1)`` (end-exclusive) covering the drawn shape, anti-aliased edge included."""
    if spec.shape == "circle":
        (cx, cy), r = spec.centre, spec.radius
        xs, ys = [cx - r, cx + r], [cy - r, cy + r]
    else:
        xs, ys = zip(*shapes.shape_polygon(spec), strict=True)
    size = shapes.IMAGE_SIZE
    return (
        max(0, math.floor(min(xs))),
        max(0, math.floor(min(ys))),
        min(size, math.ceil(max(xs))),
        min(size, math.ceil(max(ys))),
    )


def pixelate(image: torch.Tensor, box: tuple[int, int, int, int], block: int) -> torch.Tensor:
    """A mosaic of ``box`` in a uint8 (3, H, W) image: each ``block``-pixel cell of a grid anchored at the box's
    top-left corner takes its mean colour (rounded); cells at the right and bottom are cut by the box."""
    x0, y0, x1, y1 = box
    out = image.clone()
    for top in range(y0, y1, block):
        for left in range(x0, x1, block):
            bottom, right = min(top + block, y1), min(left + block, x1)
            cell = image[:, top:bottom, left:right].float()
            out[:, top:bottom, left:right] = cell.mean(dim=(1, 2), keepdim=True).round().to(torch.uint8)
    return out


def render_toy_triplets(shape: str, count: int, block: int, seed: int) -> Triplets:
    """``count`` toy triplets: a drawing of ``shape``, the same with its box pixelated, a drawing of another shape."""
    rng = np.random.default_rng(seed)
    others = [other for other in shapes.SHAPES if other != shape]
    unsafe, mosaic, benign = [], [], []
    for _ in range(count):
        spec = shapes.random_spec(rng, shape=shape)
        drawing = shapes.draw(spec)
        pixels = shapes.images_to_tensor([drawing])[0]
        unsafe.append(drawing)
        mosaic.append(Image.fromarray(pixelate(pixels, shape_box(spec), block).permute(1, 2, 0).numpy()))
        benign.append(shapes.draw(shapes.random_spec(rng, shape=others[rng.integers(len(others))])))
    source = f"toy:{shape} ({count} triplets rendered from seed {seed}, {block}-px mosaic of the {shape}'s box)"
    return Triplets(unsafe, mosaic, benign, source)


def load_triplets(config: SafeGenConfig, concept: Concept) -> Triplets:
    source = data_source(config, concept)
    if source.startswith(TOY_PREFIX):
        return render_toy_triplets(toy_shape(source), config.triplets, config.mosaic_block, config.seed)
    rows = triplet_paths(source)
    images = [[Image.open(file).convert("RGB") for file in column] for column in zip(*rows, strict=True)]
    return Triplets(*images, source=f"{source} ({len(rows)} triplets, sha256 {data_sha256(rows)})")


def to_model_pixels(images: list[Image.Image], resolution: int) -> torch.Tensor:
    """The official transform: resize the shorter side to ``resolution`` (bilinear), centre-crop, scale to
    [-1, 1]; (N, 3, resolution, resolution) float32."""
    out = []
    for image in images:
        width, height = image.size
        scale = resolution / min(width, height)
        size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
        if size != image.size:
            image = image.resize(size, Image.Resampling.BILINEAR)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        out.append(torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1))
    return torch.stack(out)


@dataclass
class TripletLatents:
    """The scaled VAE posterior of every image: ``mean`` and ``std`` of shape (N, 3, C, h, w), the second axis
    unsafe, mosaic, benign."""

    mean: torch.Tensor
    std: torch.Tensor

    def __len__(self) -> int:
        return self.mean.shape[0]

    def sample(self, index: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, ...]:
        """Fresh ``latent_dist.sample()`` latents of the triplets in ``index``: (unsafe, mosaic, benign)."""
        mean, std = self.mean[index], self.std[index]
        drawn = mean + std * torch.randn(mean.shape, generator=generator).to(mean.device)
        return drawn.unbind(1)


@torch.no_grad()
def encode_triplets(vae, triplets: Triplets, resolution: int, batch_size: int = 16) -> TripletLatents:
    pixels = torch.stack(
        [to_model_pixels(images, resolution) for images in (triplets.unsafe, triplets.mosaic, triplets.benign)], dim=1
    )
    flat = pixels.flatten(0, 1)
    means, stds = [], []
    for chunk in flat.split(batch_size):
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        means.append(posterior.mean.float())
        stds.append(posterior.std.float())
    scale = vae.config.scaling_factor
    shape = (len(triplets), 3, *means[0].shape[1:])
    return TripletLatents((torch.cat(means) * scale).view(shape), (torch.cat(stds) * scale).view(shape))


# --- training -------------------------------------------------------------------------------------------


def finetune(config: SafeGenConfig, pipe, concept: Concept) -> tuple[torch.nn.Module, dict]:
    """The EMA UNet after training (an fp32 copy of ``pipe.unet``) and what the card records; ``pipe`` is left
    untouched."""
    from diffusers import DDPMScheduler

    triplets = load_triplets(config, concept)  # first: a concept without data fails before any training work
    resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    latents = encode_triplets(pipe.vae, triplets, resolution)
    student = copy.deepcopy(pipe.unet).float().train()
    device = student.device
    latents = TripletLatents(latents.mean.to(device), latents.std.to(device))
    averaged_model = copy.deepcopy(student).requires_grad_(False).eval()
    names = [name for name, _ in student.named_parameters() if is_trained(name)]
    student.requires_grad_(False)
    trained = [student.get_parameter(name).requires_grad_(True) for name in names]
    averaged = [averaged_model.get_parameter(name) for name in names]
    optimizer = torch.optim.AdamW(trained, lr=config.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=config.weight_decay)
    schedule = DDPMScheduler.from_config(pipe.scheduler.config)
    alphas_cumprod = schedule.alphas_cumprod.to(device=device, dtype=torch.float32)
    train_steps = schedule.config.num_train_timesteps
    empty = encode_token_ids(pipe, tokenize(pipe, [""])).float()
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(config.batch_size, len(latents))
    batches = epoch_batches(len(latents), batch_size, 0, 1, generator)
    losses, mosaic_losses, preserve_losses = [], [], []
    with track("safegen training", config.steps, unit="steps") as progress:
        for step in range(1, config.steps + 1):
            unsafe, mosaic, benign = latents.sample(next(batches), generator)
            timesteps = torch.randint(train_steps, (batch_size,), generator=generator).to(device)
            noise = torch.randn(unsafe.shape, generator=generator).to(device)
            benign_noise = torch.randn(benign.shape, generator=generator).to(device)
            loss, loss_mosaic, loss_preserve = safegen_loss(
                student, unsafe, mosaic, benign, noise, benign_noise, timesteps, alphas_cumprod, empty, config
            )
            loss.backward()
            if config.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(trained, config.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema_update(averaged, trained, ema_decay_at(step, config.ema_decay))
            losses.append(loss.item())
            mosaic_losses.append(loss_mosaic.item())
            preserve_losses.append(loss_preserve.item())
            progress.advance(loss=losses[-1])
    summary = {
        "data_source": triplets.source,
        "triplets_used": len(triplets),
        "batch_size_used": batch_size,
        **loss_summary(losses),
        "loss_mosaic": loss_summary(mosaic_losses),
        "loss_preserve": loss_summary(preserve_losses),
    }
    return averaged_model, summary


def train(config: SafeGenConfig, pipe, concept: Concept, out_dir: Path) -> None:
    model, summary = finetune(config, pipe, concept)
    edited = {name: parameter for name, parameter in model.named_parameters() if is_trained(name)}
    delta = weight_delta(pipe.unet.state_dict(), edited)
    save_weight_delta(delta, out_dir)
    write_card(
        out_dir,
        "safegen",
        config,
        concept,
        saved_model="EMA UNet (self-attention, attn1)" if config.ema_decay > 0 else "last step (self-attention, attn1)",
        loss=f"{config.weight_mosaic} * MSE(eps(x_unsafe, ''), {config.mosaic_target} mosaic target) + "
        f"{config.weight_preserve} * MSE(eps(x_benign, ''), noise)",
        changed_tensors=len(delta),
        changed_parameters=sum(t.numel() for t in delta.values()),
        **summary,
    )


SAFEGEN = MethodSpec(
    name="safegen",
    config_cls=SafeGenConfig,
    train=train,
    apply=apply_weight_delta,
    description="SafeGen: fine-tune self-attention so unsafe images denoise to mosaics, prompt-free",
    seed_fields=("seed",),
)
