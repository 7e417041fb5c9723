"""Stable Diffusion 3: its sampling engine (`SD3Generator`) and a tiny random SD3 pipeline for tests.

SD3 is a different model family from SD1 on every axis the generator touches:

- a transformer (MMDiT) in place of the UNet, predicting the flow-matching velocity v ≈ ε − x0;
- three text encoders: CLIP-L and CLIP-G give per-token states (their penultimate layer, concatenated and
  zero-padded to T5's width) and pooled vectors (concatenated), T5-XXL gives more per-token states; the
  transformer attends to the 77 CLIP tokens followed by the T5 tokens, and takes the pooled vector apart;
- a 16-channel VAE whose latents are ``(z − shift_factor) · scaling_factor``;
- one sampler, ``FlowMatchEulerDiscreteScheduler`` (shift 3.0 for SD3 medium): x ← x + (σ_next − σ)·v.

`SD3Generator.sample` turns `WorkItem`s into images like `duobench.generator.Generator` does for SD1:
every item's starting noise comes from its own CPU generator (so an image does not depend on the batch it
was drawn in), and the loop is step for step the one in diffusers' ``StableDiffusion3Pipeline.__call__``
(same operations in the same order), so with the same starting latents its images are bit-identical to the
pipeline's; `tests/test_sd3.py` holds it to both.

Wired into the runner through the family switch in `duobench.generator.Generator` (a generator built from
an SD3 pipeline is this one) and `duobench.models` (loading, fingerprint, sampler defaults). Where SD3
differs from what the runner assumes of a model:

- the T5 sequence length is part of the conditioning. DUO trains SD3 with 77 T5 tokens (the official
  ``--max_sequence_length`` default) while diffusers' pipeline defaults to 256; the generator uses 77 unless
  the item carries a ``max_sequence_length`` attribute (`WorkItem` has no such field yet);
- SD3 samples with the pipeline's own flow-matching Euler scheduler, which items name ``flow-euler`` (the
  SD3 default of `duobench.models.default_sampler_settings`); an item naming an SD1 sampler is refused;
- prompts come as text only. Exact token ids and saved embeddings are SD1's single-encoder forms and are
  refused with a `DuobenchError`;
- there are no sampling hooks (SD1's inference-time defenses act on a UNet's (77, D) conditioning): an edit
  that returns one is refused, naming the model family.
"""

from __future__ import annotations

import string
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from PIL import Image

from duobench.errors import DuobenchError
from duobench.generator import prompt_form
from duobench.items import WorkItem

MAX_SEQUENCE_LENGTH = 77
"""T5 tokens per prompt: the official DUO-SD3 training script's ``--max_sequence_length`` default."""

TINY_IMAGE_SIZE = 32
TINY_LATENT_SIZE = 8
"""The tiny pipeline's VAE has three levels (×4 down): 32 px images, 16×8×8 latents, 4×4 transformer patches."""


# ----------------------------------------------------------------------------------------- tiny pipeline


def tiny_t5_tokenizer():
    """A T5 tokenizer built in memory: T5's layout (Unigram model, ``▁`` word marker, ``</s>`` appended,
    ``<pad>``=0, ``</s>``=1, ``<unk>``=2) over a character vocabulary of 192 pieces, no download.

    The real SD3 tokenizer (``google/t5-v1_1-xxl``'s SentencePiece model, 32,100 pieces) ships with the
    model; this one only has to turn any ASCII prompt into distinct ids for a random-weight T5. Each
    printable ASCII character is a piece on its own and with the word marker, so words split into
    characters; anything else maps to ``<unk>``. transformers 5's `T5Tokenizer` takes such a vocabulary
    directly, as ``(piece, log-probability)`` pairs.
    """
    from transformers import T5Tokenizer

    characters = string.ascii_letters + string.digits + string.punctuation
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -2.0)]
    vocab += [("▁" + c, -2.5) for c in characters] + [(c, -3.0) for c in characters]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=512)


def clip_text_encoder(width: int, layers: int, heads: int, intermediate: int):
    """A randomly initialised ``CLIPTextModelWithProjection`` laid out as SD3's CLIP-L and CLIP-G are (SD1.4's
    49,408-token vocabulary and special tokens, 77 positions, a projection of the encoder's width), at any
    size: the tiny random SD3 pipeline's and the SD3 toy model's."""
    from transformers import CLIPTextModelWithProjection

    from duobench.small_sd1 import clip_text_config

    return CLIPTextModelWithProjection(clip_text_config(width, layers, heads, intermediate, projection_dim=width))


def tiny_random_sd3_pipeline(seed: int = 0, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """A tiny randomly initialised SD3-architecture pipeline, built from configs: no download, no network.

    Same classes as SD3 medium, shrunk: a 2-block ``SD3Transformer2DModel`` (4 heads of 8, patch 2), a
    16-channel ``AutoencoderKL`` with SD3's scaling (1.5305) and shift (0.0609) factors and no quant convs,
    ``FlowMatchEulerDiscreteScheduler`` with shift 3.0, two ``CLIPTextModelWithProjection`` (width 16,
    projection 16, SD1.4's vocabulary) and a 2-layer ``T5EncoderModel`` of width 32. As in SD3, the CLIP
    states (16 + 16) fill T5's width (32 = ``joint_attention_dim``) and the pooled vectors (16 + 16) make
    ``pooled_projection_dim``. Both CLIP encoders use duobench's offline CLIP tokenizer (`sd_clip_tokenizer`;
    SD3's real second tokenizer may pad with another token, which a random model cannot notice); T5 uses
    `tiny_t5_tokenizer`. 32 px images.
    """
    from diffusers import (
        AutoencoderKL,
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    from duobench.tokenizer import sd_clip_tokenizer

    clip_width, t5_width = 16, 32
    t5_tokenizer = tiny_t5_tokenizer()

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        text_encoder, text_encoder_2 = (clip_text_encoder(clip_width, 2, 2, 2 * clip_width) for _ in range(2))
        text_encoder_3 = T5EncoderModel(
            T5Config(
                vocab_size=len(t5_tokenizer),
                d_model=t5_width,
                d_kv=8,
                d_ff=2 * t5_width,
                num_layers=2,
                num_heads=4,
                pad_token_id=0,
                eos_token_id=1,
                decoder_start_token_id=0,
            )
        )
        transformer = SD3Transformer2DModel(
            sample_size=TINY_LATENT_SIZE,
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=2,
            attention_head_dim=8,
            num_attention_heads=4,
            joint_attention_dim=t5_width,
            caption_projection_dim=32,
            pooled_projection_dim=2 * clip_width,
            pos_embed_max_size=TINY_LATENT_SIZE,
        )
        vae = AutoencoderKL(
            in_channels=3,
            out_channels=3,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(16, 32, 32),
            layers_per_block=1,
            latent_channels=16,
            norm_num_groups=8,
            sample_size=TINY_IMAGE_SIZE,
            scaling_factor=1.5305,
            shift_factor=0.0609,
            use_quant_conv=False,
            use_post_quant_conv=False,
        )
    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=sd_clip_tokenizer(),
        text_encoder_2=text_encoder_2,
        tokenizer_2=sd_clip_tokenizer(),
        text_encoder_3=text_encoder_3,
        tokenizer_3=t5_tokenizer,
    )
    for component in (transformer, vae, text_encoder, text_encoder_2, text_encoder_3):
        component.eval()  # built from a config, a model is in training mode: T5's dropout would be on
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device=device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


# --------------------------------------------------------------------------------------------- generator


@dataclass
class SD3Conditioning:
    """What the transformer is conditioned on for one batch: per-token states (B, 77 + T5 length, D) and
    pooled vectors (B, D_pooled), for the prompts and the negative prompts (None without guidance)."""

    items: list[WorkItem]
    prompt_embeds: torch.Tensor
    pooled_embeds: torch.Tensor
    negative_embeds: torch.Tensor | None
    negative_pooled_embeds: torch.Tensor | None


SCHEDULER = "flow-euler"
"""The one sampler SD3 items may name: the pipeline's ``FlowMatchEulerDiscreteScheduler``."""


class SD3Generator:
    """Samples work items with a diffusers ``StableDiffusion3Pipeline``: condition, denoise, decode.

    It answers the calls the engine and the runner make of `duobench.generator.Generator` (``pipe``,
    ``device``, ``sample``, ``hooks``, ``uncovered_forms``); ``hooks`` is always empty.
    """

    def __init__(
        self,
        pipe,
        hooks: Sequence = (),
        decode_chunk: int | None = None,
        max_sequence_length: int = MAX_SEQUENCE_LENGTH,
    ) -> None:
        from duobench.generator import GPU_DECODE_CHUNK

        self.pipe = pipe
        self.max_sequence_length = max_sequence_length
        self.decode_chunk = decode_chunk or (GPU_DECODE_CHUNK if self.device.type == "cuda" else None)
        """Latents per VAE decoder call; None decodes the whole batch at once."""
        self.hooks: list = []
        for hook in hooks:
            self.add_hook(hook)

    def add_hook(self, hook) -> None:
        """Refused: SD1's inference-time edits act on a UNet's (77, D) CLIP conditioning and guidance step."""
        raise DuobenchError(
            f"The edit {getattr(hook, 'name', type(hook).__name__)!r} acts at inference on SD1's UNet and CLIP "
            "conditioning, but this model is a Stable Diffusion 3 pipeline (model family sd3), whose generator "
            "takes no sampling hooks. On SD3 duobench runs weight edits only (DUO's LoRA)."
        )

    def uncovered_forms(self) -> dict[str, list[str]]:
        return {}

    @property
    def device(self) -> torch.device:
        return self.pipe.transformer.device

    def sequence_length(self, items: Sequence[WorkItem]) -> int:
        """The T5 length for a batch: the items' own ``max_sequence_length`` if they carry one, else ours."""
        lengths = {getattr(item, "max_sequence_length", None) or self.max_sequence_length for item in items}
        if len(lengths) > 1:
            raise ValueError(f"SD3Generator.sample needs items with one T5 sequence length, got {sorted(lengths)}")
        return lengths.pop()

    def condition(self, items: Sequence[WorkItem], guidance: float) -> SD3Conditioning:
        """The three encoders' embeddings of the prompts and (with guidance) the negative prompts, as
        ``StableDiffusion3Pipeline.encode_prompt`` makes them."""
        refused = sorted({prompt_form(item) for item in items} - {"text"})
        if refused:
            raise DuobenchError(
                f"SD3 takes prompts as text only; these items give theirs as {', '.join(refused)}, forms made "
                "for SD1's single CLIP encoder."
            )
        prompts = [item.prompt for item in items]
        embeds, negative_embeds, pooled, negative_pooled = self.pipe.encode_prompt(
            prompt=prompts,
            prompt_2=None,
            prompt_3=None,
            negative_prompt=[item.negative_prompt for item in items],
            do_classifier_free_guidance=guidance > 1,
            device=self.device,
            max_sequence_length=self.sequence_length(items),
        )
        return SD3Conditioning(list(items), embeds, pooled, negative_embeds, negative_pooled)

    def initial_latents(self, items: Sequence[WorkItem]) -> torch.Tensor:
        from duobench.generator import seeded_latents

        return seeded_latents(items, self.pipe.transformer.config.in_channels, self.pipe.vae_scale_factor)

    @torch.no_grad()
    def sample(self, items: Sequence[WorkItem]) -> list[Image.Image]:
        """Images for items that share sampler settings (`WorkItem.batch_signature`)."""
        first = items[0]
        if any(item.batch_signature() != first.batch_signature() for item in items):
            raise ValueError("SD3Generator.sample needs items with identical sampler settings")
        if first.scheduler != SCHEDULER:
            raise DuobenchError(
                f"SD3 samples with its flow-matching Euler scheduler ({SCHEDULER!r}); these items ask for "
                f"{first.scheduler!r}, an SD1 sampler. Leave the scheduler out of the concept's generation "
                "settings to use the model's own."
            )
        guidance = float(first.guidance)
        conditioning = self.condition(items, guidance)
        # The pipeline's `prepare_latents` casts given latents to the prompt embeddings' dtype.
        latents = self.initial_latents(items).to(device=self.device, dtype=conditioning.prompt_embeds.dtype)
        latents = self.denoise(conditioning, latents, guidance, first.steps)
        return self.decode(latents)

    def denoise(
        self, conditioning: SD3Conditioning, latents: torch.Tensor, guidance: float, steps: int
    ) -> torch.Tensor:
        """The sampler loop of ``StableDiffusion3Pipeline.__call__``: flow-matching Euler with CFG."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        cfg = guidance > 1
        rows, pooled = conditioning.prompt_embeds, conditioning.pooled_embeds
        if cfg:
            rows = torch.cat([conditioning.negative_embeds, rows])
            pooled = torch.cat([conditioning.negative_pooled_embeds, pooled])
        scheduler.set_timesteps(steps, device=self.device, **self._shift_kwargs(latents))
        for t in scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if cfg else latents
            velocity = pipe.transformer(
                hidden_states=model_input,
                timestep=t.expand(model_input.shape[0]),
                encoder_hidden_states=rows,
                pooled_projections=pooled,
                joint_attention_kwargs=None,
                return_dict=False,
            )[0]
            if cfg:
                uncond, text = velocity.chunk(2)
                velocity = uncond + guidance * (text - uncond)
            latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
        return latents

    def _shift_kwargs(self, latents: torch.Tensor) -> dict[str, float]:
        """The resolution-dependent shift ``mu`` for schedulers that use it (SD3.5-style configs; SD3 medium
        has a fixed shift), computed as the pipeline does."""
        config = self.pipe.scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift

        patch = self.pipe.transformer.config.patch_size
        sequence = (latents.shape[2] // patch) * (latents.shape[3] // patch)
        return {
            "mu": calculate_shift(
                sequence,
                config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096),
                config.get("base_shift", 0.5),
                config.get("max_shift", 1.16),
            )
        }

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Undo SD3's latent normalisation, VAE-decode, and post-process as the pipeline does."""
        vae = self.pipe.vae
        latents = (latents / vae.config.scaling_factor) + vae.config.shift_factor
        chunks = latents.split(self.decode_chunk or len(latents))
        image = torch.cat([vae.decode(chunk, return_dict=False)[0] for chunk in chunks])
        return [image.convert("RGB") for image in self.pipe.image_processor.postprocess(image, output_type="pil")]
