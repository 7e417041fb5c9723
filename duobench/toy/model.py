"""The toy model: Stable Diffusion v1's classes at toy size, and loading the shipped weights.

Same components as SD1.4 (AutoencoderKL, UNet2DConditionModel with cross-attention, CLIPTextModel with
SD1.4's real CLIP tokenizer and 77 positions, SD's scaled-linear noise schedule), shrunk to 32x32 images
and 8x8x4 latents, so every unlearning method and attack that works on SD1.4 runs on it unchanged.

The weights ship in ``duobench/toy/weights/`` as fp16 safetensors, one ``save_pretrained`` folder per
component; `duobench toy build` rewrites them from scratch.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

from duobench.errors import DuobenchError
from duobench.small_sd1 import sd1_pipeline, small_text_encoder, small_unet, small_vae

WEIGHTS_DIR = Path(__file__).parent / "weights"
COMPONENT_CONFIGS = {
    "unet": "config.json",
    "text_encoder": "config.json",
    "vae": "config.json",
    "scheduler": "scheduler_config.json",
}
SAMPLER_DEFAULTS = {"steps": 20, "guidance": 7.5, "scheduler": "ddim"}
"""How the toy model samples unless told otherwise (attached to the pipeline as
``duobench_sampler_defaults``; the star concept's ``generation`` block says the same)."""
TEXT_WIDTH = 64


def make_vae():
    """AutoencoderKL, 32 px → 4x8x8 (f = 4). A narrow first stage (16 channels at 32 px) makes each
    training step ~2x cheaper than the prototype's (32, 64, 64), which buys ~10x more steps."""
    return small_vae(block_out_channels=(16, 32, 64), layers_per_block=2)


def make_unet():
    """UNet2DConditionModel (32, 64, 64), cross-attention at 8x8 and 4x4, ~1.5M parameters."""
    return small_unet(block_out_channels=(32, 64, 64), text_width=TEXT_WIDTH, attention_head_dim=4)


def make_text_encoder():
    """CLIPTextModel: SD1.4's vocabulary (49,408 tokens) and 77 positions, 2 layers of width 64."""
    return small_text_encoder(width=TEXT_WIDTH, intermediate_size=4 * TEXT_WIDTH)


def make_scheduler():
    """DDIM with SD1.4's noise schedule (scaled_linear 0.00085-0.012, 1000 steps); PNDM/LMS/Euler/DPM++
    load from the same config."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def save_toy_model(unet, vae, text_encoder, scheduler, out_dir: Path) -> None:
    """Write each component with ``save_pretrained`` as fp16 safetensors (about 12 MB in all)."""
    for name, component in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
        copy.deepcopy(component).half().save_pretrained(out_dir / name, safe_serialization=True)
    scheduler.save_pretrained(out_dir / "scheduler")


def missing_components(weights_dir: Path) -> list[str]:
    return [name for name, config in COMPONENT_CONFIGS.items() if not (weights_dir / name / config).exists()]


def load_toy_pipeline(
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    weights_dir: Path | str | None = None,
):
    """The toy model as a `StableDiffusionPipeline`, offline, from the shipped weights or ``weights_dir``."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    missing = missing_components(folder)
    if missing:
        raise DuobenchError(
            f"The toy model weights in {folder} are missing ({', '.join(missing)}). Run `duobench toy build` "
            "to train the toy world from scratch (about 20 minutes on 2 idle CPU cores), or pass the folder a "
            "previous `duobench toy build --out` wrote."
        )
    pipe = sd1_pipeline(
        unet=UNet2DConditionModel.from_pretrained(folder / "unet", dtype=dtype, local_files_only=True),
        vae=AutoencoderKL.from_pretrained(folder / "vae", dtype=dtype, local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(folder / "text_encoder", dtype=dtype, local_files_only=True),
        scheduler=DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
    )
    pipe.duobench_sampler_defaults = dict(SAMPLER_DEFAULTS)
    return pipe.to(torch.device(device))
