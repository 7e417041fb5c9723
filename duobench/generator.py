"""The generator seam: every image duobench makes goes through `Generator.sample`.

A generator turns a batch of work items into images in three steps, each one a place where an
inference-time edit can act:

1. **conditioning** (`Generator.condition`): every prompt form becomes a (77, D) embedding, text and exact
   token ids through the text encoder in one pass, a saved embedding (Concept Inversion) loaded as it is,
   plus the negative-prompt embeddings. Hooks then see and may change all of it (`SamplingHook.condition`),
   whatever form the prompt came in: a defense that edits the conditioning cannot be bypassed by replaying
   an embedding;
2. **denoising** (`Generator.denoise`): the sampler loop. One hook may replace the classifier-free guidance
   step (`SamplingHook.guide`), and that hook may add extra UNet rows per item (`SamplingHook.extra_rows`,
   e.g. SLD's safety concept) that ride along in the same UNet call. `SamplingHook.unet_call` wraps the UNet
   calls, for hooks that need to know which conditioning each UNet row carries (SPM's facilitated transport);
3. **decoding**: VAE decode and diffusers' post-processing;
4. or, instead of 1-3, one hook replaces sampling as a whole (`SamplingHook.replaces_sampling`, e.g. PNO's
   per-item optimisation over many chains): `Generator.sample` hands it the items, and it builds its
   conditioning with `Generator.condition` (so the other hooks' conditioning edits still apply) and its
   starting noise with `Generator.initial_latents`.

With no hooks the loop is step for step the one in diffusers' ``StableDiffusionPipeline.__call__`` (same
operations in the same order), so its images are bit-identical to the pipeline's and keep their cache keys;
`tests/test_generator.py` holds it to that.

Hooks come from edits (`duobench.edits`): an edit either changes weights in place or returns a hook.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from duobench.errors import DuobenchError
from duobench.items import WorkItem

SCHEDULER_CLASSES = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "lms": "LMSDiscreteScheduler",
    "euler": "EulerDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
}
PROMPT_FORMS = ("text", "token_ids", "embedding")


def use_scheduler(pipe, name: str) -> None:
    """Swap ``pipe.scheduler`` for the named sampler, keeping the model's noise schedule (its config)."""
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULER_CLASSES[name])
    if type(pipe.scheduler) is not scheduler_class:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)


def tokenize(pipe, texts: Sequence[str]) -> torch.Tensor:
    return tokenize_with(pipe.tokenizer, texts)


def tokenize_with(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    """SD1 tokenisation: start token, prompt, end token, end-token padding to 77 ids, truncated."""
    return tokenizer(
        list(texts),
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


@torch.no_grad()
def encode_token_ids(pipe, token_ids: torch.Tensor) -> torch.Tensor:
    """SD1's prompt embedding: the text encoder's last hidden state over all 77 positions (no mask)."""
    device = pipe.text_encoder.device
    return pipe.text_encoder(token_ids.to(device))[0]


def load_embedding(path: str) -> torch.Tensor:
    from safetensors.torch import load_file

    tensors = load_file(path)
    if "prompt_embeds" not in tensors:
        raise DuobenchError(f"Prompt embedding file {path} has no 'prompt_embeds' tensor.")
    embedding = tensors["prompt_embeds"]
    return embedding[0] if embedding.dim() == 3 else embedding


def prompt_form(item: WorkItem) -> str:
    """How the item gives its prompt: ``embedding`` > ``token_ids`` > ``text`` (`WorkItem` precedence)."""
    if item.embedding is not None:
        return "embedding"
    return "token_ids" if item.token_ids is not None else "text"


@dataclass
class Conditioning:
    """What the UNet is conditioned on for one batch; hooks may replace any field.

    ``token_ids`` holds each row's 77 ids where they are known (text and token-id items) and ``None`` for a
    replayed embedding. ``negative_prompts`` is the text the negative embeddings were encoded from.
    """

    items: list[WorkItem]
    prompt_embeds: torch.Tensor
    negative_embeds: torch.Tensor
    token_ids: list[torch.Tensor | None]
    negative_prompts: list[str]


@dataclass
class GuidanceStep:
    """One denoising step's UNet predictions, handed to a hook that replaces the guidance formula.

    ``extra`` is the prediction for the guiding hook's own extra rows (None if it asked for none). ``state``
    persists across the steps of one batch (SLD's momentum).
    """

    index: int
    timestep: torch.Tensor
    guidance: float
    uncond: torch.Tensor
    text: torch.Tensor
    extra: torch.Tensor | None
    state: dict[str, Any] = field(default_factory=dict)


class SamplingHook:
    """An inference-time edit's entry points into the generator; each default leaves sampling as it is.

    ``name`` and ``identity()`` describe the hook in run summaries; the cache identity of the edit that made
    the hook is the edit's (`duobench.edits.Edit.identity`). ``forms`` lists the prompt forms the hook can
    defend; for the others the run summary reports that the defense does not apply.
    """

    name: str = "hook"
    forms: tuple[str, ...] = PROMPT_FORMS
    replaces_guidance: bool = False
    replaces_sampling: bool = False

    def condition(self, generator: Generator, conditioning: Conditioning) -> Conditioning:
        return conditioning

    def extra_rows(self, generator: Generator, conditioning: Conditioning) -> torch.Tensor | None:
        """Extra (N, 77, D) conditioning rows for the UNet, e.g. a safety concept; None for none. Asked only of
        the hook that replaces the guidance step, the one hook that can use their predictions."""
        return None

    def guide(self, step: GuidanceStep) -> torch.Tensor:
        raise NotImplementedError

    def sample(self, generator: Generator, items: Sequence[WorkItem]) -> list[Image.Image]:
        """The images for ``items`` (one batch signature, scheduler already set), made by the hook itself;
        asked only of the one hook that replaces sampling."""
        raise NotImplementedError

    @contextlib.contextmanager
    def unet_call(self, rows: torch.Tensor, conditioning: Conditioning) -> Iterator[None]:
        """Around each UNet call with ``rows`` the (B, 77, D) embeddings of its batch rows."""
        yield

    def remove(self) -> None:
        """Undo anything the hook attached to the model (module hooks)."""


def seeded_latents(items: Sequence[WorkItem], channels: int, factor: int) -> torch.Tensor:
    """Each item's starting noise from its own CPU generator: independent of batch, order and device (both
    model families' generators start from it)."""
    latents = []
    for item in items:
        generator = torch.Generator("cpu").manual_seed(int(item.seed))
        shape = (1, channels, item.height // factor, item.width // factor)
        latents.append(torch.randn(shape, generator=generator, dtype=torch.float32))
    return torch.cat(latents)


def classifier_free_guidance(step: GuidanceStep) -> torch.Tensor:
    return step.uncond + step.guidance * (step.text - step.uncond)


GPU_DECODE_CHUNK = 8
"""On a GPU the VAE decoder's activations at 512 px, not the UNet's, bound the batch size: decoding 8 latents
per call lets generation batches of 64 share a 24 GB card with the models (diffusers' VAE slicing decodes
one at a time). Not measured here: no GPU."""


class Generator:
    """Samples work items with a diffusers SD1-style pipeline, through the hooks of the edits applied to it.

    The pipeline's own weights carry the weight edits; ``hooks`` carry the inference-time ones, in chain
    order.
    """

    def __init__(self, pipe, hooks: Sequence[SamplingHook] = (), decode_chunk: int | None = None) -> None:
        self.pipe = pipe
        self.decode_chunk = decode_chunk or (GPU_DECODE_CHUNK if self.device.type == "cuda" else None)
        """Latents per VAE decoder call; None decodes the whole batch at once."""
        self.hooks: list[SamplingHook] = []
        for hook in hooks:
            self.add_hook(hook)

    def add_hook(self, hook: SamplingHook) -> None:
        if hook.replaces_guidance and any(h.replaces_guidance for h in self.hooks):
            taken = next(h.name for h in self.hooks if h.replaces_guidance)
            raise DuobenchError(
                f"Edits {taken!r} and {hook.name!r} both replace the guidance step; a model can have only one."
            )
        if hook.replaces_sampling and any(h.replaces_sampling for h in self.hooks):
            taken = next(h.name for h in self.hooks if h.replaces_sampling)
            raise DuobenchError(f"Edits {taken!r} and {hook.name!r} both replace sampling; a model can have only one.")
        self.hooks.append(hook)

    @property
    def device(self) -> torch.device:
        return self.pipe.unet.device

    def uncovered_forms(self) -> dict[str, list[str]]:
        """``{hook name: prompt forms it does not defend}`` for the hooks that cannot cover every form."""
        return {
            h.name: [f for f in PROMPT_FORMS if f not in h.forms]
            for h in self.hooks
            if set(h.forms) < set(PROMPT_FORMS)
        }

    def encode_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return encode_token_ids(self.pipe, tokenize(self.pipe, texts))

    def condition(self, items: Sequence[WorkItem]) -> Conditioning:
        """Prompt and negative-prompt embeddings for a batch (text and token ids in one encoder pass), then
        every hook's changes."""
        pipe = self.pipe
        max_length = pipe.tokenizer.model_max_length
        ids: list[torch.Tensor | None] = []
        for item in items:
            if item.token_ids is not None and len(item.token_ids) != max_length:
                raise DuobenchError(
                    f"An item's token_ids has {len(item.token_ids)} ids; the text encoder takes exactly "
                    f"{max_length} (start token, prompt, end token, padding)."
                )
            ids.append(torch.tensor(item.token_ids) if item.token_ids is not None else None)
        text_positions = [i for i, item in enumerate(items) if prompt_form(item) == "text"]
        if text_positions:
            tokenized = tokenize(pipe, [items[i].prompt for i in text_positions])
            for row, position in enumerate(text_positions):
                ids[position] = tokenized[row]
        needs_encoder = [i for i, item in enumerate(items) if item.embedding is None]
        embeddings: list[torch.Tensor | None] = [None] * len(items)
        if needs_encoder:
            encoded = encode_token_ids(pipe, torch.stack([ids[i] for i in needs_encoder]))
            for row, position in enumerate(needs_encoder):
                embeddings[position] = encoded[row]
        dtype, device = pipe.text_encoder.dtype, pipe.text_encoder.device
        for i, item in enumerate(items):
            if item.embedding is not None:
                embeddings[i] = load_embedding(item.embedding).to(device=device, dtype=dtype)
                ids[i] = None
        negative_prompts = [item.negative_prompt for item in items]
        conditioning = Conditioning(
            items=list(items),
            prompt_embeds=torch.stack(embeddings),
            negative_embeds=self.encode_texts(negative_prompts),
            token_ids=ids,
            negative_prompts=negative_prompts,
        )
        for hook in self.hooks:
            conditioning = hook.condition(self, conditioning)
        return conditioning

    def initial_latents(self, items: Sequence[WorkItem]) -> torch.Tensor:
        return seeded_latents(items, self.pipe.unet.config.in_channels, self.pipe.vae_scale_factor)

    @torch.no_grad()
    def sample(self, items: Sequence[WorkItem]) -> list[Image.Image]:
        """Images for items that share sampler settings (`WorkItem.batch_signature`)."""
        first = items[0]
        if any(item.batch_signature() != first.batch_signature() for item in items):
            raise ValueError("Generator.sample needs items with identical sampler settings")
        use_scheduler(self.pipe, first.scheduler)
        sampler = next((h for h in self.hooks if h.replaces_sampling), None)
        if sampler is not None:
            return sampler.sample(self, items)
        conditioning = self.condition(items)
        latents = self.initial_latents(items).to(device=self.device, dtype=self.pipe.unet.dtype)
        latents = self.denoise(conditioning, latents, float(first.guidance), first.steps)
        return self.decode(latents)

    def denoise(self, conditioning: Conditioning, latents: torch.Tensor, guidance: float, steps: int) -> torch.Tensor:
        """The sampler loop of ``StableDiffusionPipeline.__call__``, with the hooks' extra rows and guidance."""
        pipe, scheduler = self.pipe, self.pipe.scheduler
        dtype = pipe.text_encoder.dtype
        cfg = guidance > 1 and pipe.unet.config.time_cond_proj_dim is None
        rows = conditioning.prompt_embeds.to(device=self.device, dtype=dtype)
        guider = next((h for h in self.hooks if h.replaces_guidance), None)
        extra = guider.extra_rows(self, conditioning) if cfg and guider is not None else None
        if cfg:
            negatives = conditioning.negative_embeds.to(device=self.device, dtype=dtype)
            rows = torch.cat(
                [negatives, rows] + ([extra.to(device=self.device, dtype=dtype)] if extra is not None else [])
            )
        copies = rows.shape[0] // latents.shape[0]
        guide = guider.guide if guider is not None else classifier_free_guidance
        scheduler.set_timesteps(steps, device=self.device)
        latents = latents * scheduler.init_noise_sigma
        step_kwargs = _step_kwargs(scheduler)
        state: dict[str, Any] = {}
        with contextlib.ExitStack() as stack:
            for hook in self.hooks:
                stack.enter_context(hook.unet_call(rows, conditioning))
            for index, t in enumerate(scheduler.timesteps):
                model_input = torch.cat([latents] * copies) if cfg else latents
                if hasattr(scheduler, "scale_model_input"):
                    model_input = scheduler.scale_model_input(model_input, t)
                noise = pipe.unet(
                    model_input,
                    t,
                    encoder_hidden_states=rows,
                    timestep_cond=None,
                    cross_attention_kwargs=None,
                    added_cond_kwargs=None,
                    return_dict=False,
                )[0]
                if cfg:
                    chunks = noise.chunk(copies)
                    extra_noise = chunks[2] if copies > 2 else None
                    noise = guide(GuidanceStep(index, t, guidance, chunks[0], chunks[1], extra_noise, state))
                latents = scheduler.step(noise, t, latents, **step_kwargs, return_dict=False)[0]
        return latents

    def decode(self, latents: torch.Tensor) -> list[Image.Image]:
        """Latents to images, ``decode_chunk`` latents per VAE call: each image is decoded on its own, so
        chunking changes memory, not the images (tested on a CPU)."""
        pipe = self.pipe
        chunks = latents.split(self.decode_chunk or len(latents))
        scale = pipe.vae.config.scaling_factor
        image = torch.cat([pipe.vae.decode(chunk / scale, return_dict=False, generator=None)[0] for chunk in chunks])
        images = pipe.image_processor.postprocess(image, output_type="pil", do_denormalize=[True] * image.shape[0])
        return [image.convert("RGB") for image in images]


def _step_kwargs(scheduler) -> dict[str, Any]:
    """diffusers' ``prepare_extra_step_kwargs`` with eta 0 and no generator."""
    parameters = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in parameters:
        kwargs["eta"] = 0.0
    if "generator" in parameters:
        kwargs["generator"] = None
    return kwargs


def generator_for(pipe, hooks: Sequence[SamplingHook] = ()):
    """The generator of the pipeline's model family: `Generator` for SD1-style pipelines, SD3's
    `duobench.sd3.SD3Generator` (same calls) for Stable Diffusion 3."""
    from duobench.models import pipeline_family

    if pipeline_family(pipe) == "sd3":
        from duobench.sd3 import SD3Generator

        return SD3Generator(pipe, hooks)
    return Generator(pipe, hooks)


def as_generator(model):
    """A generator as it is (a `Generator`, or SD3's `duobench.sd3.SD3Generator`), or the plain generator of a
    diffusers pipeline's family (`generator_for`)."""
    from duobench.sd3 import SD3Generator

    return model if isinstance(model, Generator | SD3Generator) else generator_for(model)
