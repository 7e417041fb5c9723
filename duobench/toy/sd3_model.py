"""The toy model's Stable Diffusion 3 counterpart: SD3's classes at toy size, and loading its weights.

Same components as SD3 medium (`SD3Transformer2DModel`, `FlowMatchEulerDiscreteScheduler` with shift 3.0,
two `CLIPTextModelWithProjection` and a `T5EncoderModel`, an `AutoencoderKL`), shrunk to 32x32 images, and
trained on the SD1 toy's drawn shapes and captions (`duobench.toy.sd3_build`), so DUO-SD3 can be run and
judged on a CPU. The SD1 toy is `duobench.toy.model`; the two share data, captions and the VAE's weights.

As in SD3, the per-token conditioning is the two CLIP encoders' penultimate states (widths 32 + 64),
concatenated and zero-padded to T5's width (128 = ``joint_attention_dim``), followed by T5's states; the
pooled vector is the two projections concatenated (32 + 64 = ``pooled_projection_dim``).

Where it differs from SD3 medium, and why:

- **the VAE has 4 latent channels, not 16**: it is the SD1 toy's VAE (30 dB held-out PSNR after 900 steps,
  which cost 18 of the SD1 build's 49 minutes), reused rather than retrained. SD3's pipeline reads only
  ``scaling_factor``, ``shift_factor`` and ``block_out_channels`` of its VAE, and the transformer's
  ``in_channels`` sets the latent shape, so 4 channels work unchanged. The VAE's weights are the SD1 toy's;
  its ``shift_factor`` and ``scaling_factor`` are recomputed from the training latents as SD3's were
  (latents ``(z − shift)·scale`` have mean 0 and std 1), since the SD1 toy's latents have mean −0.68;
- **T5's tokenizer is a word-and-character vocabulary** (`toy_t5_tokenizer`): every word of the toy's
  caption grammar is one piece, anything else falls back to single characters, as in duobench's
  `tiny_t5_tokenizer`. A 2-layer T5 learns words far faster than from characters;
- both CLIP encoders use SD1.4's tokenizer (duobench's offline one); SD3's CLIP-G tokenizer pads with
  ``!`` rather than ``<|endoftext|>``, which a from-scratch model cannot notice.

The folder `duobench toy build --family sd3` writes is a diffusers pipeline folder (``model_index.json``,
one ``save_pretrained`` folder per component, fp16 safetensors), so ``StableDiffusion3Pipeline
.from_pretrained`` also opens it; `load_toy_sd3_pipeline` rebuilds the tokenizers in code instead, so
loading needs nothing but the weights.
"""

from __future__ import annotations

import copy
import re
import string
from pathlib import Path

import torch

from duobench.errors import DuobenchError

WEIGHTS_DIR = Path(__file__).parent / "weights_sd3"
NETWORKS = ("transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
COMPONENT_CONFIGS = {**{name: "config.json" for name in NETWORKS}, "scheduler": "scheduler_config.json"}

SAMPLER_DEFAULTS = {"steps": 20, "guidance": 7.5, "scheduler": "flow-euler"}
"""How the SD3 toy samples unless told otherwise (attached as ``duobench_sampler_defaults``): flow-matching
Euler in 20 steps, CFG 7.5, as the SD1 toy's DDIM 20 / 7.5."""

LATENT_SIZE = 8
LATENT_CHANNELS = 4
CLIP_L_WIDTH = 32
CLIP_G_WIDTH = 64
T5_WIDTH = 128
TRANSFORMER_WIDTH = 64
TRANSFORMER_LAYERS = 4
SCHEDULER_SHIFT = 3.0
"""SD3 medium's fixed shift: σ = 3s / (1 + 2s). Kept, so DUO-SD3's official t ∈ [1, 750) means σ > 0.5
here as it does on SD3 medium."""


def make_transformer():
    """SD3Transformer2DModel: 4 joint (MMDiT) blocks of width 64 (2 heads of 32), patch 2 on 4x8x8 latents
    (16 image tokens), attending jointly with the 77 CLIP + 77 T5 tokens."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=2,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        num_layers=TRANSFORMER_LAYERS,
        attention_head_dim=32,
        num_attention_heads=TRANSFORMER_WIDTH // 32,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=TRANSFORMER_WIDTH,
        pooled_projection_dim=CLIP_L_WIDTH + CLIP_G_WIDTH,
        pos_embed_max_size=LATENT_SIZE,
    )


def make_clip_encoder(width: int):
    """CLIPTextModelWithProjection with SD1.4's vocabulary and 77 positions, 3 layers (SD3 reads the
    penultimate layer's states, so the per-token conditioning passes through 2), heads of 16."""
    from duobench.sd3 import clip_text_encoder

    return clip_text_encoder(width, layers=3, heads=width // 16, intermediate=4 * width)


def make_t5_encoder(vocab_size: int):
    """T5EncoderModel: 2 layers of width 128, 4 heads of 32."""
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(
        T5Config(
            vocab_size=vocab_size,
            d_model=T5_WIDTH,
            d_kv=T5_WIDTH // 4,
            d_ff=2 * T5_WIDTH,
            num_layers=2,
            num_heads=4,
            dropout_rate=0.0,
            pad_token_id=0,
            eos_token_id=1,
            decoder_start_token_id=0,
        )
    )


def make_scheduler():
    """FlowMatchEulerDiscreteScheduler as SD3 medium's: 1000 training steps, shift 3.0."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=SCHEDULER_SHIFT)


def caption_words() -> list[str]:
    """Every whitespace-separated word the toy captions and evaluation prompts use, sorted."""
    from duobench.toy import shapes

    texts = [
        *shapes.CAPTION_TEMPLATES,
        *shapes.SHAPE_ONLY_TEMPLATES,
        *shapes.COLOUR_ONLY_TEMPLATES,
        *shapes.GENERIC_SHAPE_WORDS,
        *shapes.SIZE_WORDS,
        *(word for words in shapes.SHAPE_SYNONYMS.values() for word in words),
        *(word for words in shapes.COLOUR_SYNONYMS.values() for word in words),
        "an",
    ]
    words = {word for text in texts for word in re.sub(r"\{\w+\}|[,]", " ", text).split()}
    return sorted(words)


def toy_t5_tokenizer():
    """A T5 tokenizer built in memory: `duobench.sd3.tiny_t5_tokenizer`'s layout and character pieces, plus
    one piece per caption word (``▁star``, ``▁five-pointed``, ...). The Unigram model prefers a whole word
    (log-probability −2) to its characters (−2.5 or −3 each), so captions become one id per word and any
    other prompt still tokenizes. Deterministic: the same vocabulary on every machine, no download."""
    from transformers import T5Tokenizer

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters]
    pieces = {piece for piece, _ in vocab}
    vocab += [("▁" + word, -2.0) for word in caption_words() if "▁" + word not in pieces]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def toy_sd3_pipeline(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, scheduler):
    """A `StableDiffusion3Pipeline` from these components and the offline tokenizers."""
    from diffusers import StableDiffusion3Pipeline

    from duobench.tokenizer import sd_clip_tokenizer

    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=scheduler,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=sd_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=sd_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=toy_t5_tokenizer(),
    )


def save_toy_sd3_model(transformer, vae, text_encoder, text_encoder_2, text_encoder_3, scheduler, out_dir: Path):
    """Write a diffusers pipeline folder with every network as fp16 safetensors (about 13 MB)."""
    networks = [copy.deepcopy(n).half() for n in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3)]
    toy_sd3_pipeline(*networks, scheduler).save_pretrained(out_dir, safe_serialization=True)


def missing_components(weights_dir: Path) -> list[str]:
    return [name for name, config in COMPONENT_CONFIGS.items() if not (weights_dir / name / config).exists()]


def load_toy_sd3_pipeline(
    weights_dir: Path | str | None = None,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """The SD3 toy model as a `StableDiffusion3Pipeline`, offline, from ``duobench/toy/weights_sd3/`` or
    ``weights_dir``; tokenizers are rebuilt in code."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextModelWithProjection, T5EncoderModel

    folder = Path(weights_dir) if weights_dir is not None else WEIGHTS_DIR
    missing = missing_components(folder)
    if missing:
        raise DuobenchError(
            f"The SD3 toy model weights in {folder} are missing ({', '.join(missing)}). Run `duobench toy build "
            "--family sd3` to train it from scratch (it reuses the SD1 toy's VAE), or pass the folder a previous "
            "`duobench toy build --family sd3 --out` wrote."
        )
    pretrained = {"dtype": dtype, "local_files_only": True}
    pipe = toy_sd3_pipeline(
        transformer=SD3Transformer2DModel.from_pretrained(folder / "transformer", **pretrained),
        vae=AutoencoderKL.from_pretrained(folder / "vae", **pretrained),
        text_encoder=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder", **pretrained),
        text_encoder_2=CLIPTextModelWithProjection.from_pretrained(folder / "text_encoder_2", **pretrained),
        text_encoder_3=T5EncoderModel.from_pretrained(folder / "text_encoder_3", **pretrained),
        scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(folder / "scheduler", local_files_only=True),
    )
    for network in NETWORKS:
        getattr(pipe, network).eval()
    pipe.set_progress_bar_config(disable=True)
    pipe.duobench_sampler_defaults = dict(SAMPLER_DEFAULTS)
    return pipe.to(torch.device(device))
