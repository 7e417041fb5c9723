"""Stable Diffusion v1's components, built from configs at a small size: 32 px images, 8x8x4 latents.

The toy model (`duobench.toy.model`, trained) and the tiny-random test pipeline (`duobench.models`, random
weights) are both SD1.4 shrunk, and differ only in widths. Building both here keeps them on SD1's layout,
which is what lets every method and attack written for SD1.4 run on them unchanged: cross-attention at
every UNet level but the deepest, a CLIP text encoder with SD1.4's vocabulary and 77 positions, and
SD1.4's real tokenizer.
"""

from __future__ import annotations

IMAGE_SIZE = 32
LATENT_SIZE = 8
"""Three VAE levels downsample by 4: 32 px images, 8x8 latents."""


def small_unet(block_out_channels: tuple[int, ...], text_width: int, attention_head_dim: int):
    """UNet2DConditionModel, one layer per level, cross-attending to text of width ``text_width``."""
    from diffusers import UNet2DConditionModel

    levels = len(block_out_channels)
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=block_out_channels,
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=text_width,
        attention_head_dim=attention_head_dim,
        norm_num_groups=8,
    )


def small_vae(block_out_channels: tuple[int, int, int], layers_per_block: int):
    """AutoencoderKL with three levels, 32 px → 4x8x8."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=block_out_channels,
        layers_per_block=layers_per_block,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=IMAGE_SIZE,
    )


def small_text_encoder(width: int, intermediate_size: int):
    """CLIPTextModel with SD1.4's vocabulary (49,408 tokens), special tokens and 77 positions; 2 layers."""
    from transformers import CLIPTextModel

    return CLIPTextModel(clip_text_config(width, layers=2, heads=4, intermediate=intermediate_size))


def clip_text_config(width: int, layers: int, heads: int, intermediate: int, **extra):
    """A CLIPTextConfig with SD1.4's vocabulary, special tokens and 77 positions, at any size (``extra``:
    e.g. SD3's ``projection_dim``)."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=49408,
        hidden_size=width,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
        **extra,
    )


def sd1_pipeline(unet, vae, text_encoder, scheduler):
    """A `StableDiffusionPipeline` from these components, SD1.4's tokenizer and no safety checker."""
    from diffusers import StableDiffusionPipeline

    from duobench.tokenizer import sd_clip_tokenizer

    return StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=sd_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
