"""`duobench toy build`: train the toy world from scratch, deterministically, in four stages.

1. **judge** — the shape/colour CNN on drawn shapes with blur/noise/colour augmentation;
   then **detector**, a second CNN by the same recipe from another seed (`toy-star-2`: the classifier
   that reward and objective methods optimise against, never the evaluation judge);
2. **vae** — AutoencoderKL (32 px → 4x8x8) with MSE + L1 + a tiny KL, on drawn shapes with flips;
3. **latents** — the encoder's posterior (mean, std) of every training image, once, and the VAE
   ``scaling_factor`` = 1 / std of sampled latents (as SD did);
4. **unet** — UNet2DConditionModel and CLIPTextModel trained jointly from scratch: epsilon prediction with
   SD1's scaled-linear schedule, captions padded to 77 tokens as SD does (attacks edit positions up to
   77), 10% caption dropout for classifier-free guidance, Min-SNR-5 loss weights (faster convergence at
   equal steps), EMA weights.

Budgets are step counts, never wall-clock, so a build is reproducible: same seed and config, same weights
(up to float-reduction order across thread counts). The defaults take about 20 minutes on 2 idle CPU
cores (judge ~2, VAE ~4, latents ~1, UNet ~10); the shipped weights took 49 minutes on a shared 2-core
machine at load 4-9 (``weights/build.json``). `BuildConfig` holds every knob; tests use a tiny one.
"""

from __future__ import annotations

import copy
import json
import math
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from duobench.toy.judge import (
    DETECTOR_FOLDER,
    DETECTOR_WIDTHS,
    JUDGE_FOLDER,
    JUDGE_SHAPE_LABELS,
    JUDGE_WIDTHS,
    ShapeJudgeNet,
    save_judge_net,
)
from duobench.toy.model import (
    WEIGHTS_DIR,
    make_scheduler,
    make_text_encoder,
    make_unet,
    make_vae,
    save_toy_model,
)
from duobench.toy.shapes import ShapeData, ShapeSpec, blank_backgrounds, caption, shape_dataset

BUILD_REPORT = "build.json"
IGNORE = -100


@dataclass(frozen=True)
class BuildConfig:
    """Every knob of a build. Step budgets are for 2 idle CPU cores (seconds per step in comments)."""

    seed: int = 0
    train_images: int = 60_000
    heldout_images: int = 5_000
    judge_steps: int = 900  # bs128, ~0.15 s/step
    judge_batch: int = 128
    judge_lr: float = 2e-3
    vae_steps: int = 900  # bs64, ~0.22 s/step; held-out PSNR 30.3 dB, no colour shift (the prototype's 239: 20.9 dB)
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_l1_weight: float = 0.5
    vae_kl_weight: float = 1e-6
    unet_steps: int = 3_000  # bs64 with 77-token captions, ~0.2 s/step
    unet_batch: int = 64
    unet_lr: float = 1e-3
    caption_dropout: float = 0.1
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    warmup_steps: int = 100
    log_every: int = 100
    detector_steps: int = 900  # bs128, ~0.15 s/step
    detector_seed_offset: int = 7


StepCallback = Callable[[str], None]


@contextmanager
def stage_progress(console: Console, title: str, total: int, log_every: int) -> Iterator[StepCallback]:
    """A rich progress bar for one stage; the yielded callback advances it and logs every ``log_every``
    steps (so a non-interactive log file also shows progress)."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}"),
    )
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(title, total=total, status="")
        done = 0

        def advance(status: str) -> None:
            nonlocal done
            done += 1
            progress.update(task, advance=1, status=status)
            if done % log_every == 0 or done == total:
                console.log(f"{title} {done}/{total} {status}")

        yield advance


def warmup_cosine(total: int, warmup: int, floor: float = 0.05) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warm-up, then cosine decay to ``floor``."""

    def multiplier(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return multiplier


def augment_for_judge(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Colour gain, contrast, brightness, Gaussian blur and pixel noise on [0, 1] images, per sample.

    The ranges mimic what the toy VAE does to a drawing (softer edges, a few percent of colour shift,
    speckle) without crossing from one colour class to the next.
    """
    from torchvision.transforms.functional import gaussian_blur

    n = len(images)
    gain = 1.0 + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.16
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.3
    shift = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.12
    images = (images * gain - 0.5) * contrast + 0.5 + shift
    blur_level = torch.randint(0, 4, (n,), generator=generator)
    for level, sigma in ((1, 0.5), (2, 0.8), (3, 1.2)):
        chosen = blur_level == level
        if chosen.any():
            images[chosen] = gaussian_blur(images[chosen], kernel_size=5, sigma=sigma)
    noise_std = torch.rand(n, 1, 1, 1, generator=generator) * 0.05
    return (images + torch.randn(images.shape, generator=generator) * noise_std).clamp(0.0, 1.0)


def train_judge(
    data: ShapeData,
    config: BuildConfig,
    console: Console,
    seed: int | None = None,
    widths: tuple[int, ...] = JUDGE_WIDTHS,
    steps: int | None = None,
    title: str = "judge",
) -> ShapeJudgeNet:
    """Shape (+ "none") and colour cross-entropy on augmented drawings and blank backgrounds.

    The defaults train the evaluation judge; `train_detector` trains the second detector with another seed,
    width and step count."""
    seed = config.seed if seed is None else seed
    steps = config.judge_steps if steps is None else steps
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    blanks = blank_backgrounds(len(data.images) // 10, seed + 11)
    images = torch.cat([data.images, blanks])
    shape_labels = torch.cat([data.shapes, torch.full((len(blanks),), JUDGE_SHAPE_LABELS.index("none"))])
    colour_labels = torch.cat([data.colours, torch.full((len(blanks),), IGNORE)])
    net = ShapeJudgeNet(widths)
    optimizer = torch.optim.AdamW(net.parameters(), lr=config.judge_lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(steps, config.warmup_steps))
    net.train()
    with stage_progress(console, title, steps, config.log_every) as advance:
        for _ in range(steps):
            index = torch.randint(len(images), (config.judge_batch,), generator=generator)
            batch = augment_for_judge(images[index].float() / 255.0, generator)
            shape_logits, colour_logits = net(batch)
            loss = F.cross_entropy(shape_logits, shape_labels[index]) + F.cross_entropy(
                colour_logits, colour_labels[index], ignore_index=IGNORE
            )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
            advance(f"loss {loss.item():.4f}")
    return net.eval()


@torch.no_grad()
def judge_accuracy(net: ShapeJudgeNet, images: torch.Tensor, shapes: torch.Tensor, colours: torch.Tensor) -> dict:
    """Shape and colour accuracy of ``net`` on uint8 or [0, 1] images."""
    tensor = images.float() / 255.0 if images.dtype == torch.uint8 else images
    shape_logits, colour_logits = zip(*(net(tensor[s : s + 512]) for s in range(0, len(tensor), 512)), strict=True)
    return {
        "shape_accuracy": (torch.cat(shape_logits).argmax(-1) == shapes).float().mean().item(),
        "colour_accuracy": (torch.cat(colour_logits).argmax(-1) == colours).float().mean().item(),
    }


def train_detector(data: ShapeData, config: BuildConfig, console: Console) -> ShapeJudgeNet:
    """The second detector: the judge's recipe from another seed."""
    return train_judge(
        data,
        config,
        console,
        seed=config.seed + config.detector_seed_offset,
        widths=DETECTOR_WIDTHS,
        steps=config.detector_steps,
        title="detector",
    )


def classifier_report(net: ShapeJudgeNet, heldout: ShapeData, seed: int) -> dict:
    """Held-out shape and colour accuracy, and the "none" accuracy on 500 blank backgrounds."""
    blanks = blank_backgrounds(500, seed)
    none_label = torch.full((500,), JUDGE_SHAPE_LABELS.index("none"))
    return {
        **judge_accuracy(net, heldout.images, heldout.shapes, heldout.colours),
        "none_accuracy": judge_accuracy(net, blanks, none_label, torch.zeros(500, dtype=torch.long))["shape_accuracy"],
    }


def build_detector(
    out_dir: Path | None = None, config: BuildConfig | None = None, console: Console | None = None
) -> dict:
    """Train only the second detector into ``out_dir``/detector, on the build's own training data (the same
    seed draws the same images), and write its report there; `build_toy_world` trains it as one stage."""
    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    config = config or BuildConfig()
    console = console or Console()
    started = time.perf_counter()
    data = shape_dataset(config.train_images, config.seed)
    heldout = shape_dataset(config.heldout_images, config.seed + 1_000_003)
    detector = train_detector(data, config, console)
    save_judge_net(detector, out_dir / DETECTOR_FOLDER)
    report = {
        "config": asdict(config),
        "seconds": time.perf_counter() - started,
        "held_out": classifier_report(detector, heldout, config.seed + 1_000_004),
        "threads": torch.get_num_threads(),
    }
    (out_dir / DETECTOR_FOLDER / BUILD_REPORT).write_text(json.dumps(report, indent=2))
    console.log(f"detector held-out: {report['held_out']}")
    return report


def to_vae_range(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 127.5 - 1.0


def random_flips(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Per-sample horizontal and vertical flips: the VAE must reconstruct any orientation."""
    n = len(images)
    horizontal = (torch.rand(n, generator=generator) < 0.5)[:, None, None, None]
    vertical = (torch.rand(n, generator=generator) < 0.5)[:, None, None, None]
    images = torch.where(horizontal, images.flip(-1), images)
    return torch.where(vertical, images.flip(-2), images)


def train_vae(images: torch.Tensor, config: BuildConfig, console: Console):
    """AutoencoderKL with MSE + 0.5 L1 + 1e-6 KL on flipped drawings."""
    torch.manual_seed(config.seed + 1)
    generator = torch.Generator().manual_seed(config.seed + 1)
    vae = make_vae().train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.vae_steps, config.warmup_steps))
    with stage_progress(console, "vae", config.vae_steps, config.log_every) as advance:
        for _ in range(config.vae_steps):
            index = torch.randint(len(images), (config.vae_batch,), generator=generator)
            batch = random_flips(to_vae_range(images[index]), generator)
            posterior = vae.encode(batch).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=generator)).sample
            mse = F.mse_loss(reconstruction, batch)
            loss = mse + config.vae_l1_weight * F.l1_loss(reconstruction, batch)
            loss = loss + config.vae_kl_weight * posterior.kl().mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            advance(f"mse {mse.item():.5f}")
    return vae.eval()


@torch.no_grad()
def reconstruct(vae, images: torch.Tensor) -> torch.Tensor:
    """Decode the posterior mean of uint8 ``images``; returns [0, 1] floats."""
    outputs = []
    for start in range(0, len(images), 256):
        batch = to_vae_range(images[start : start + 256])
        outputs.append(vae.decode(vae.encode(batch).latent_dist.mean).sample)
    return ((torch.cat(outputs) + 1.0) / 2.0).clamp(0.0, 1.0)


def vae_report(vae, judge: ShapeJudgeNet, heldout: ShapeData) -> dict:
    """Held-out PSNR, per-colour mean RGB shift (0-255 units) and the judge's accuracy on reconstructions."""
    original = heldout.images.float() / 255.0
    reconstruction = reconstruct(vae, heldout.images)
    mse = (reconstruction - original).pow(2).mean(dim=(1, 2, 3))
    colour_shift = {}
    for colour in sorted({spec.colour for spec in heldout.specs}):
        chosen = torch.tensor([spec.colour == colour for spec in heldout.specs])
        shift = (reconstruction[chosen] - original[chosen]).mean(dim=(0, 2, 3)) * 255.0
        colour_shift[colour] = [round(v, 2) for v in shift.tolist()]
    return {
        "psnr_db": (10.0 * torch.log10(1.0 / mse.clamp_min(1e-10))).mean().item(),
        "mean_rgb_shift": colour_shift,
        **{f"judge_{k}": v for k, v in judge_accuracy(judge, reconstruction, heldout.shapes, heldout.colours).items()},
    }


@torch.no_grad()
def encode_latents(vae, images: torch.Tensor, console: Console, log_every: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The posterior mean and std of every image (sampled afresh at each UNet step)."""
    means, stds = [], []
    chunks = range(0, len(images), 500)
    with stage_progress(console, "latents", len(chunks), max(1, log_every // 10)) as advance:
        for start in chunks:
            posterior = vae.encode(to_vae_range(images[start : start + 500])).latent_dist
            means.append(posterior.mean)
            stds.append(posterior.std)
            advance("")
    return torch.cat(means), torch.cat(stds)


def latent_scaling_factor(means: torch.Tensor, stds: torch.Tensor, seed: int) -> float:
    """1 / std of sampled latents, so the UNet sees unit-variance latents, as SD1's 0.18215 does."""
    generator = torch.Generator().manual_seed(seed)
    return float(1.0 / (means + stds * torch.randn(means.shape, generator=generator)).std())


class CaptionTokens:
    """Caption → 77 SD token ids (or ``max_length``, default the tokenizer's), memoised (the caption grammar
    has only a few thousand sentences)."""

    def __init__(self, tokenizer, max_length: int | None = None) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length or tokenizer.model_max_length
        self._ids: dict[str, torch.Tensor] = {}

    def __call__(self, captions: list[str]) -> torch.Tensor:
        for text in captions:
            if text not in self._ids:
                self._ids[text] = self.tokenizer(
                    text,
                    padding="max_length",
                    max_length=self.max_length,
                    truncation=True,
                    return_tensors="pt",
                ).input_ids[0]
        return torch.stack([self._ids[text] for text in captions])


@torch.no_grad()
def update_ema(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for ema_parameter, parameter in zip(ema_model.parameters(), model.parameters(), strict=True):
        ema_parameter.lerp_(parameter, 1.0 - decay)


def train_unet_and_text_encoder(
    latent_means: torch.Tensor,
    latent_stds: torch.Tensor,
    specs: tuple[ShapeSpec, ...],
    scaling_factor: float,
    config: BuildConfig,
    console: Console,
):
    """Joint epsilon-prediction training of the UNet and the text encoder; returns their EMA copies."""
    from diffusers import DDPMScheduler

    from duobench.tokenizer import sd_clip_tokenizer

    torch.manual_seed(config.seed + 3)
    generator = torch.Generator().manual_seed(config.seed + 3)
    rng = np.random.default_rng(config.seed + 3)
    unet, text_encoder = make_unet().train(), make_text_encoder().train()
    ema_unet, ema_text_encoder = copy.deepcopy(unet).eval(), copy.deepcopy(text_encoder).eval()
    parameters = [*unet.parameters(), *text_encoder.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=config.unet_lr, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(config.unet_steps, config.warmup_steps))
    alphas_cumprod = DDPMScheduler.from_config(make_scheduler().config).alphas_cumprod
    tokens = CaptionTokens(sd_clip_tokenizer())
    losses: list[float] = []
    with stage_progress(console, "unet+text", config.unet_steps, config.log_every) as advance:
        for step in range(config.unet_steps):
            index = torch.randint(len(latent_means), (config.unet_batch,), generator=generator)
            noise_for_latents = torch.randn(latent_means[index].shape, generator=generator)
            clean = (latent_means[index] + latent_stds[index] * noise_for_latents) * scaling_factor
            captions = ["" if rng.random() < config.caption_dropout else caption(specs[i], rng) for i in index.tolist()]
            timesteps = torch.randint(0, len(alphas_cumprod), (config.unet_batch,), generator=generator)
            noise = torch.randn(clean.shape, generator=generator)
            alpha_bar = alphas_cumprod[timesteps][:, None, None, None]
            noisy = alpha_bar.sqrt() * clean + (1.0 - alpha_bar).sqrt() * noise
            text_states = text_encoder(tokens(captions))[0]
            prediction = unet(noisy, timesteps, encoder_hidden_states=text_states).sample
            snr = alphas_cumprod[timesteps] / (1.0 - alphas_cumprod[timesteps])
            weights = snr.clamp(max=config.min_snr_gamma) / snr
            loss = (weights * (prediction - noise).pow(2).mean(dim=(1, 2, 3))).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(parameters, 1.0)
            optimizer.step()
            schedule.step()
            decay = min(config.ema_decay, (1.0 + step) / (10.0 + step))
            update_ema(ema_unet, unet, decay)
            update_ema(ema_text_encoder, text_encoder, decay)
            losses.append(loss.item())
            advance(f"loss {np.mean(losses[-100:]):.4f}")
    return ema_unet, ema_text_encoder, float(np.mean(losses[-200:]))


def build_toy_world(
    out_dir: Path | None = None, config: BuildConfig | None = None, console: Console | None = None
) -> dict:
    """Train judge, VAE and UNet + text encoder from scratch into ``out_dir``; return the build report.

    Each stage writes its weights as soon as it finishes; ``build.json`` (config, seconds per stage,
    quality numbers, library versions) is written last.
    """

    out_dir = Path(out_dir) if out_dir is not None else WEIGHTS_DIR
    config = config or BuildConfig()
    console = console or Console()
    out_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    report: dict = {"config": asdict(config), "seconds": seconds}

    started = time.perf_counter()
    data = shape_dataset(config.train_images, config.seed)
    heldout = shape_dataset(config.heldout_images, config.seed + 1_000_003)
    seconds["data"] = time.perf_counter() - started
    console.log(f"drew {len(data.images)} training and {len(heldout.images)} held-out images")

    started = time.perf_counter()
    judge = train_judge(data, config, console)
    save_judge_net(judge, out_dir / JUDGE_FOLDER)
    seconds["judge"] = time.perf_counter() - started
    report["judge"] = classifier_report(judge, heldout, config.seed + 1_000_004)
    console.log(f"judge held-out: {report['judge']}")

    started = time.perf_counter()
    detector = train_detector(data, config, console)
    save_judge_net(detector, out_dir / DETECTOR_FOLDER)
    seconds["detector"] = time.perf_counter() - started
    report["detector"] = classifier_report(detector, heldout, config.seed + 1_000_004)
    console.log(f"detector held-out: {report['detector']}")

    started = time.perf_counter()
    vae = train_vae(data.images, config, console)
    seconds["vae"] = time.perf_counter() - started
    report["vae"] = vae_report(vae, judge, heldout)
    console.log(f"vae held-out: {report['vae']}")

    started = time.perf_counter()
    means, stds = encode_latents(vae, data.images, console, config.log_every)
    scaling_factor = latent_scaling_factor(means, stds, config.seed + 2)
    vae.register_to_config(scaling_factor=scaling_factor)
    seconds["latents"] = time.perf_counter() - started
    report["vae"]["scaling_factor"] = scaling_factor
    console.log(f"latent scaling factor {scaling_factor:.4f}")

    started = time.perf_counter()
    unet, text_encoder, final_loss = train_unet_and_text_encoder(
        means, stds, data.specs, scaling_factor, config, console
    )
    seconds["unet"] = time.perf_counter() - started
    report["unet"] = {"final_loss": final_loss}
    scheduler = make_scheduler()
    save_toy_model(unet, vae, text_encoder, scheduler, out_dir)

    return finish_build_report(report, out_dir, console, "toy world")


def finish_build_report(report: dict, out_dir: Path, console: Console, what: str) -> dict:
    """Total the stages' seconds, add the library versions and thread count, write ``build.json`` into
    ``out_dir`` last (its presence marks a finished build) and return the report."""
    import diffusers
    import transformers

    seconds = report["seconds"]
    seconds["total"] = sum(seconds.values())
    report["versions"] = {
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    (out_dir / BUILD_REPORT).write_text(json.dumps(report, indent=2))
    console.log(f"{what} written to {out_dir} in {seconds['total'] / 60:.1f} min")
    return report
