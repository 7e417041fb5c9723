"""Benign fine-tuning (Kim, Choi, Shin, Lee: "Safety Alignment Backfires", arXiv 2412.00357): fine-tune the
*unlearned* model on data that does not contain the concept, and see whether the concept comes back.

The paper's threat: a downstream user adapts a safety-aligned model to a new domain (its benign sets are
Pokémon, Naruto and Danbooru captions) with ordinary fine-tuning, full or LoRA, and the suppressed concept
re-emerges although no training image shows it. Its "sequential" setting, the one attacked here, trains
the fine-tuning weights on the aligned model: ``W* = W0 + ΔW_safe + ΔW_ft``, with ``ΔW_ft`` learned through
``W0 + ΔW_safe`` (``deployment = "direct"``, the default). Its Modular-LoRA deployment recipe instead trains
``ΔW_ft`` on the original weights ``W0`` and composes the two at inference (``deployment = "modular"``): the
task adapters never see the safety edit, so they cannot learn to undo it. The attack returns ``ΔW_ft`` as an
edit (``produces = "edit"``); either way the runner samples the attack phase from the unlearned system plus
this edit, which for ``modular`` is the composition. (The option is not called ``mode``: that one chooses
LoRA or dense adapters.)

Recipe, read top to bottom:

1. Data (``prepare``): by default the concept's benign prompts (``concept.benign_prompts``, ``images``
   rows spread evenly over the set, each with its seed) rendered by the *base* model with the run's sampler
   settings, each captioned with its prompt: benign images from the original distribution, so the fine-tune
   teaches nothing the base model did not already do on benign prompts. Or ``data`` = a folder of image +
   caption pairs (format in `read_caption_folder`), center-cropped and resized to the run's image size.
2. Adapters: one per attention projection of the UNet (``attn1`` and ``attn2``: ``to_q``, ``to_k``, ``to_v``,
   ``to_out.0``), added through forward hooks, ``y = W x (+ b) + scale · Δ(x)``, so the unlearned model's
   own weights (whatever form its edit takes: a peft LoRA, a weight delta, SPM's hooks) stay untouched.
   ``mode = "lora"``: ``Δ(x) = up(down(x))`` of rank ``rank`` (``down`` kaiming-uniform, ``up`` zero, alpha
   = rank, i.e. scale 1; peft's initialisation). ``mode = "full"``: a dense ``ΔW`` (+ ``Δb`` where the layer
   has a bias) starting at zero, which is exactly fine-tuning those layers' weights.
3. Objective: the standard denoising loss. Latents = VAE posterior mean × scaling factor, ``t ~ U[0, T)``,
   ``x_t`` = ``DDPMScheduler.add_noise`` with the model's training schedule, ``MSE(eps_theta(x_t, t, c), eps)``
   for epsilon-prediction models only; ``c`` is the caption through the trained-on model's text encoder
   (frozen): the unlearned model's for ``direct``, the original's for ``modular``.
4. Optimiser: AdamW (betas 0.9/0.999, weight decay 1e-2, eps 1e-8) on the adapters only, fp32, constant
   learning rate, gradient norm clipped at 1, minibatches drawn from a fresh permutation each epoch;
   ``steps`` optimiser steps (``Budget.steps`` overrides). On a GPU the UNet runs in the pipe's dtype under
   ``torch.autocast`` (with a gradient scaler for fp16); on a CPU a given seed gives the same adapters.

Defaults, where the paper is silent (the dossier could not read its recipe): diffusers' text-to-image LoRA
example, the usual way an SD1.4 user fine-tunes for a new domain (its Pokémon recipe: rank 4 on the
attention q/k/v/out projections, lr 1e-4, constant schedule, gradient clipping 1, effective batch 4), with
1000 steps instead of its 15,000: 40 epochs of the default 100 images, where the Pokémon run makes about
70 of its 833. ``full`` mode should be run with diffusers' full fine-tune learning rate, 1e-5. The toy
world's settings, and what they do, are in ``duobench/concepts/star.yaml``.

Deliberate differences from diffusers' example: the VAE posterior mean instead of a sample (the shared
`images_to_latents`; the VAE's variance is negligible at SD's scale), no random flips, no EMA, and the
text encoder's embeddings computed once (it is frozen). Artifact: ``finetune.safetensors``
(``deltas.<layer>.down.weight`` / ``.up.weight``, or ``.weight`` [+ ``.bias``], per adapted layer, the layer
path with ``.`` → ``__``; metadata ``mode`` and ``rank``) and ``card.json`` (config, steps, data, loss
summary and curve).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image, ImageOps
from torch import nn

from duobench.attacks.base import AttackModels, Budget
from duobench.attacks.diffusion import images_to_latents, require_epsilon_prediction
from duobench.cache import atomic_write_bytes
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import SamplingHook, encode_token_ids, tokenize
from duobench.progress import track
from duobench.prompts import PromptRow

ADAPTER_FILE = "finetune.safetensors"
CARD_FILE = "card.json"
MODES = ("lora", "full")
DEPLOYMENTS = ("direct", "modular")
PROJECTIONS = ("to_q", "to_k", "to_v", "to_out.0")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LOSS_CURVE_POINTS = 100


@dataclass(frozen=True)
class FinetuneConfig:
    mode: str = "lora"
    """``lora`` (rank-``rank`` adapters) or ``full`` (a dense ΔW per adapted layer)."""
    rank: int = 4
    steps: int = 1000
    lr: float = 1e-4
    batch_size: int = 4
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    images: int = 100
    """How many training images: N benign rows spread over the set, or the first N pairs of ``data`` by name."""
    data: str = ""
    """A folder of image + caption pairs; empty: the concept's benign prompts rendered by the base model. The
    attack's cache key holds this path, not the folder's contents: give changed data a new folder."""
    seed: int = 0
    deployment: str = "direct"
    """``direct``: train through the unlearned model (the paper's sequential setting); ``modular``: train on the
    original model and compose with the unlearned one at inference (the paper's Modular-LoRA recipe)."""

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.deployment not in DEPLOYMENTS:
            raise ValueError(f"deployment must be one of {DEPLOYMENTS}, got {self.deployment!r}")
        for name in ("rank", "steps", "batch_size", "images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.data:
            read_caption_folder(Path(self.data))  # a missing or malformed folder fails before any model loads


# Data -----------------------------------------------------------------------------------------------------


@dataclass
class TrainingData:
    """What the fine-tune sees: latents (N, 4, h, w) and caption embeddings (N, 77, D), plus a description."""

    latents: torch.Tensor
    embeddings: torch.Tensor
    description: dict[str, Any]


def read_caption_folder(folder: Path) -> list[tuple[Path, str]]:
    """``(image, caption)`` pairs of a folder, sorted by file name.

    Format: each image ``<name>.png`` (or .jpg, .jpeg, .webp, .bmp) has a caption file ``<name>.txt`` beside
    it holding its caption as UTF-8 text (surrounding whitespace stripped). Subfolders and other files are
    ignored. An image without a caption, an empty caption, or a folder without images is an error: a
    fine-tune silently trained on fewer (or uncaptioned) images would be another attack.
    """
    if not folder.is_dir():
        raise DuobenchError(
            f"Fine-tuning data folder {folder} does not exist. Pass data=<folder of image + caption pairs> "
            "(x.png + x.txt), or leave data empty to use the concept's benign prompts."
        )
    images = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise DuobenchError(
            f"Fine-tuning data folder {folder} holds no images ({', '.join(IMAGE_SUFFIXES)}), each with a "
            "caption file of the same name (x.png + x.txt)."
        )
    missing = [p.name for p in images if not p.with_suffix(".txt").is_file()]
    if missing:
        raise DuobenchError(
            f"{len(missing)} image(s) in {folder} have no caption file (e.g. {missing[0]} needs "
            f"{Path(missing[0]).stem}.txt beside it)."
        )
    pairs = [(p, p.with_suffix(".txt").read_text(encoding="utf-8").strip()) for p in images]
    empty = [p.name for p, caption in pairs if not caption]
    if empty:
        raise DuobenchError(f"{len(empty)} caption file(s) in {folder} are empty (e.g. the one for {empty[0]}).")
    return pairs


def load_folder_images(pairs: Sequence[tuple[Path, str]], height: int, width: int) -> list[Image.Image]:
    """The pairs' images as RGB at the run's size (center crop to its aspect ratio, then resize)."""
    images = []
    for path, _ in pairs:
        try:
            with Image.open(path) as image:
                images.append(ImageOps.fit(image.convert("RGB"), (width, height), Image.Resampling.BICUBIC))
        except OSError as error:
            raise DuobenchError(f"Fine-tuning image {path} cannot be read: {error}") from error
    return images


def spread(rows: Sequence[PromptRow], count: int) -> list[PromptRow]:
    """``count`` rows evenly spaced over ``rows`` (all when there are fewer): a prompt set lists each prompt's
    seeds together, so its first N rows would be a few prompts only."""
    if count >= len(rows):
        return list(rows)
    return [rows[i * len(rows) // count] for i in range(count)]


def render_benign(concept: Concept, models: AttackModels, count: int) -> tuple[list[Image.Image], list[str]]:
    """The base model's images of ``count`` benign rows (`spread`) (each with its seed), and their prompts."""
    from duobench.engine import generate
    from duobench.prompts import load_prompt_set, to_work_items

    rows = spread(load_prompt_set(concept.benign_prompts, name="benign").rows, count)
    items = to_work_items(rows, models.settings)
    images = [image for _, batch in generate(models.base_pipe, items) for image in batch]
    return images, [row.prompt for row in rows]


@torch.no_grad()
def caption_embeddings(pipe, captions: Sequence[str], batch: int = 64) -> torch.Tensor:
    """SD1 prompt embeddings of ``captions`` through ``pipe``'s (frozen) text encoder, in float32."""
    chunks = [captions[i : i + batch] for i in range(0, len(captions), batch)]
    return torch.cat([encode_token_ids(pipe, tokenize(pipe, chunk)).float() for chunk in chunks])


# Adapters -------------------------------------------------------------------------------------------------


def adapted_layers(unet) -> dict[str, nn.Module]:
    """``{path: layer}`` for q/k/v/out of every attention module of the UNet (self- and cross-attention).

    Found through diffusers' ``Attention`` class, so a projection wrapped by a method's peft LoRA is the
    wrapper (its output includes the method's change) under the same path as on the plain model.
    """
    from diffusers.models.attention_processor import Attention

    layers = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention):
            for projection in PROJECTIONS:
                layers[f"{name}.{projection}"] = module.get_submodule(projection)
    if not layers:
        raise DuobenchError("The fine-tuning attack found no attention modules in this UNet; it is not SD-style.")
    return layers


def layer_key(path: str) -> str:
    """A module-name-safe key for a layer path (torch forbids dots in submodule names)."""
    return path.replace(".", "__")


class LowRankDelta(nn.Module):
    """``up(down(x))``, rank r; ``up`` starts at zero, so training starts from the unlearned model."""

    def __init__(self, in_features: int, out_features: int, rank: int, generator: torch.Generator) -> None:
        super().__init__()
        self.down = nn.Linear(in_features, rank, bias=False)
        self.up = nn.Linear(rank, out_features, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))


class DenseDelta(nn.Module):
    """A dense ``ΔW x (+ Δb)`` starting at zero: training it is training the layer's weights themselves."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


def layer_shape(layer: nn.Module) -> tuple[int, int, bool]:
    """(in, out, has bias) of a Linear, or of the Linear a peft wrapper holds as ``base_layer``."""
    linear = getattr(layer, "base_layer", layer)
    if not isinstance(linear, nn.Linear):
        raise DuobenchError(f"The fine-tuning attack adapts Linear projections; found {type(linear).__name__}.")
    return linear.in_features, linear.out_features, linear.bias is not None


class Adapters(nn.Module):
    """Every adapted layer's Δ, hooked onto a UNet's forward with a scale.

    Never registered as a submodule of the UNet: its state dict (the pipeline fingerprint) stays the
    unlearned model's, and `remove` leaves the UNet exactly as it was.
    """

    def __init__(self, layers: dict[str, nn.Module], mode: str, rank: int, seed: int = 0) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        deltas = {}
        for path, layer in layers.items():
            in_features, out_features, bias = layer_shape(layer)
            if mode == "lora":
                deltas[layer_key(path)] = LowRankDelta(in_features, out_features, rank, generator)
            else:
                deltas[layer_key(path)] = DenseDelta(in_features, out_features, bias)
        self.deltas = nn.ModuleDict(deltas)
        self.mode, self.rank, self.scale = mode, rank, 1.0
        self._handles: list = []

    def attach(self, layers: dict[str, nn.Module], scale: float = 1.0) -> None:
        """Hook each Δ onto its layer (once; a second call only changes the scale)."""
        self.scale = float(scale)
        if self._handles:
            return
        for path, layer in layers.items():
            self._handles.append(layer.register_forward_hook(self._hook(self.deltas[layer_key(path)])))

    def _hook(self, delta: nn.Module):
        def hook(module, inputs, output):
            if self.scale == 0.0:
                return None  # exactly the model without the edit
            change = delta(inputs[0].to(torch.float32))
            return output + (self.scale * change).to(output.dtype)

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


# Training -------------------------------------------------------------------------------------------------


def epoch_batches(count: int, batch_size: int, rng: torch.Generator) -> Iterator[torch.Tensor]:
    """Index batches from a fresh permutation per epoch (a shuffling data loader), forever."""
    while True:
        order = torch.randperm(count, generator=rng)
        for start in range(0, count, batch_size):
            yield order[start : start + batch_size]


def train_adapters(
    unet, scheduler_config: dict, adapters: Adapters, data: TrainingData, config: FinetuneConfig, steps: int
) -> list[float]:
    """Fit the (attached) adapters by the denoising loss through ``unet``; the loss of every step.

    Gradients go to the adapters only (``backward(inputs=...)``): the UNet's own parameters get no
    ``.grad``, whatever their ``requires_grad``.
    """
    from diffusers import DDPMScheduler

    noise_scheduler = DDPMScheduler.from_config(scheduler_config)
    device = unet.device
    params = list(adapters.parameters())
    optimizer = torch.optim.AdamW(params, lr=config.lr, betas=(0.9, 0.999), weight_decay=config.weight_decay, eps=1e-8)
    autocast = device.type == "cuda" and unet.dtype != torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=autocast and unet.dtype == torch.float16)
    rng = torch.Generator().manual_seed(config.seed)
    batches = epoch_batches(len(data.latents), config.batch_size, rng)
    losses = []
    with track("finetune attack training", steps, unit="steps") as progress:
        for _ in range(steps):
            picks = next(batches)
            latents = data.latents[picks].to(device)
            noise = torch.randn(latents.shape, generator=rng).to(device)
            timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(picks),), generator=rng)
            noisy = noise_scheduler.add_noise(latents, noise, timesteps).to(device)
            condition = data.embeddings[picks].to(device)
            with torch.autocast(device.type, dtype=unet.dtype, enabled=autocast):
                prediction = unet(
                    noisy.to(unet.dtype), timesteps.to(device), encoder_hidden_states=condition.to(unet.dtype)
                )
            loss = F.mse_loss(prediction.sample.float(), noise)
            scaler.scale(loss).backward(inputs=params)
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            progress.advance(loss=losses[-1])
    return losses


def chunk_means(values: list[float], points: int) -> list[float]:
    """``values`` averaged over at most ``points`` equal consecutive chunks (a readable loss curve)."""
    if len(values) <= points:
        return list(values)
    return [float(chunk.mean()) for chunk in torch.tensor(values).tensor_split(points)]


def loss_card(losses: list[float]) -> dict[str, Any]:
    """Final loss, the mean of the first and last tenth (single losses are noisy: t is random), and a curve."""
    window = max(1, len(losses) // 10)
    return {
        "final_loss": losses[-1],
        "loss_first": sum(losses[:window]) / window,
        "loss_last": sum(losses[-window:]) / window,
        "loss_curve": chunk_means(losses, LOSS_CURVE_POINTS),
    }


# Applying the edit ----------------------------------------------------------------------------------------


class FinetuneHook(SamplingHook):
    """The fine-tune as an edit on a pipeline: its adapters hooked onto the UNet; `remove` unhooks them."""

    name = "finetune"

    def __init__(self, adapters: Adapters) -> None:
        self.adapters = adapters

    def remove(self) -> None:
        self.adapters.remove()


def load_adapters(unet, artifact_dir: Path) -> tuple[Adapters, dict[str, nn.Module]]:
    """The saved adapters, built for ``unet``'s layers and checked to fit them."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    path = Path(artifact_dir) / ADAPTER_FILE
    if not path.exists():
        raise DuobenchError(f"{artifact_dir} holds no {ADAPTER_FILE}; it is not a fine-tuning attack's edit.")
    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata() or {}
    layers = adapted_layers(unet)
    adapters = Adapters(layers, metadata.get("mode", "lora"), int(metadata.get("rank", "4")))
    weights = load_file(str(path))
    expected = set(adapters.state_dict())
    if set(weights) != expected:
        raise DuobenchError(
            f"The adapters in {path} do not fit this UNet ({len(set(weights) ^ expected)} keys differ); "
            "they were trained on a different base architecture."
        )
    adapters.load_state_dict(weights)
    adapters.requires_grad_(False)
    return adapters.to(unet.device), layers


class Finetune:
    """Benign fine-tuning of the unlearned model; returns the fine-tune as an edit."""

    name: ClassVar[str] = "finetune"
    access: ClassVar[str] = "white-box"
    config_cls: ClassVar[type] = FinetuneConfig
    produces: ClassVar[str] = "edit"
    touches: ClassVar[tuple[str, ...]] = ("unet",)

    def __init__(self, config: FinetuneConfig) -> None:
        self.config = config

    def prepare(self, concept: Concept, models: AttackModels, rows: Sequence[PromptRow]) -> None:
        """Collect the benign data (the attacked ``rows`` are never trained on) and encode it."""
        require_epsilon_prediction(models.target_pipe)
        self.models = models
        images, captions, source = self._images_and_captions(concept, models)
        pipe = self._trained_on()
        self.data = TrainingData(
            latents=images_to_latents(pipe.vae, images).cpu(),
            embeddings=caption_embeddings(pipe, captions).cpu(),
            description={"source": source, "images": len(images), "captions": sorted(set(captions))[:50]},
        )

    def _images_and_captions(self, concept: Concept, models: AttackModels) -> tuple[list, list[str], str]:
        settings = models.settings
        if self.config.data:
            pairs = read_caption_folder(Path(self.config.data))[: self.config.images]
            images = load_folder_images(pairs, settings.height, settings.width)
            return images, [caption for _, caption in pairs], str(Path(self.config.data).resolve())
        images, captions = render_benign(concept, models, self.config.images)
        source = f"benign prompts of {concept.name}, rendered by the base model ({settings.steps} steps)"
        return images, captions, source

    def _trained_on(self):
        """The pipeline the adapters train through: the unlearned model, or the original for ``modular``."""
        return self.models.base_pipe if self.config.deployment == "modular" else self.models.target_pipe

    def make_edit(self, out_dir: Path, budget: Budget) -> None:
        """Train the adapters (through the unlearned UNet, or the original's for ``modular``), unhook them,
        and write them with their card."""
        from safetensors.torch import save

        steps = budget.steps or self.config.steps
        unet = self._trained_on().unet
        layers = adapted_layers(unet)
        adapters = Adapters(layers, self.config.mode, self.config.rank, self.config.seed).to(unet.device)
        started = time.perf_counter()
        adapters.attach(layers)
        try:
            losses = train_adapters(unet, self._trained_on().scheduler.config, adapters, self.data, self.config, steps)
        finally:
            adapters.remove()
        weights = {name: value.detach().cpu().contiguous() for name, value in adapters.state_dict().items()}
        metadata = {"mode": self.config.mode, "rank": str(self.config.rank)}
        atomic_write_bytes(Path(out_dir) / ADAPTER_FILE, save(weights, metadata=metadata))
        card = {
            "attack": self.name,
            "config": asdict(self.config),
            "steps": steps,
            "data": self.data.description,
            "adapted_layers": len(layers),
            "adapter_parameters": sum(p.numel() for p in adapters.parameters()),
            "seconds": round(time.perf_counter() - started, 3),
            **loss_card(losses),
        }
        atomic_write_bytes(Path(out_dir) / CARD_FILE, json.dumps(card, indent=2, default=str).encode())

    @staticmethod
    def apply(pipe, artifact_dir: Path, strength: float) -> FinetuneHook:
        """Hook the saved adapters onto ``pipe.unet`` at scale ``strength`` (0: the model without the edit)."""
        adapters, layers = load_adapters(pipe.unet, artifact_dir)
        adapters.attach(layers, strength)
        return FinetuneHook(adapters)
