"""Loading the model under test, whatever form it comes in.

``--model`` accepts, in this order of resolution:

1. a name in the `MODELS` registry (``toy``, ``tiny-random``, or a plugin's);
2. a local diffusers folder (it has ``model_index.json``);
3. a single CompVis-format ``.ckpt`` / ``.safetensors`` file;
4. an HF hub id such as ``CompVis/stable-diffusion-v1-4``.

Offline with no weights, loading fails with one `DuobenchError` naming the model and the ways to provide it.
Every loader returns a `StableDiffusionPipeline` with the safety checker off (judging is our job) and the
progress bar silenced (the engine has its own); or, for a Stable Diffusion 3 model, a
`StableDiffusion3Pipeline` (`pipeline_family` tells them apart). SD3 is recognised by a local folder's
``model_index.json`` (its ``_class_name``) or by a hub id with ``stable-diffusion-3`` in its name
(``stabilityai/stable-diffusion-3-medium-diffusers``); a registered name's loader returns either.

On SD3 duobench runs DUO and no attack (`SD3_SUPPORT`): every other method and attack works on SD1's UNet
and its single CLIP encoder, and `check_model_support` refuses them by name before any work.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path

import torch

from duobench.errors import DuobenchError
from duobench.registry import MODELS

DEFAULT_MODEL = "CompVis/stable-diffusion-v1-4"
SD3_MEDIUM = "stabilityai/stable-diffusion-3-medium-diffusers"

SD3_SUPPORT = {"method": ("none", "duo"), "attack": ("none",)}
"""What runs on an SD3 pipeline. The others act on SD1's UNet (ESD, UCE, SDD, SafeGen, SPM's adapters), on its
(77, D) CLIP conditioning and guidance step (SLD, SAFREE, SD-NP, PNO: sampling hooks, which `SD3Generator`
does not take), or optimise through SD1's text encoder or UNet (the white-box attacks)."""


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype(device: torch.device) -> torch.dtype:
    """fp16 on GPU (bf16 where supported is also fine, but SD1.4's reference numbers are fp16); fp32 on CPU."""
    return torch.float16 if device.type == "cuda" else torch.float32


def load_pipeline(model: str, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
    """Load ``model`` as a ready-to-sample `StableDiffusionPipeline` on ``device``."""
    device = torch.device(device) if device is not None else default_device()
    dtype = dtype or default_dtype(device)
    if model in MODELS or _looks_like_registered_name(model):
        pipe = MODELS.get(model)(device=device, dtype=dtype)
    else:
        pipe = _load_external(model, dtype)
    return prepare_pipeline(pipe, device, dtype)


def pipeline_family(pipe) -> str:
    """``sd3`` for a Stable Diffusion 3 pipeline (an MMDiT transformer and a third, T5 text encoder among its
    components), ``sd1`` for everything else: the SD1-style UNet pipelines (SD1.x, SD2.x, the toy model)."""
    components = getattr(pipe, "components", None)
    if isinstance(components, dict) and "transformer" in components and "text_encoder_3" in components:
        return "sd3"
    return "sd1"


def denoiser(pipe):
    """The network that denoises: SD3's transformer, or the UNet."""
    return pipe.transformer if pipeline_family(pipe) == "sd3" else pipe.unet


def check_model_support(pipe, method: str = "none", attack: str = "none") -> None:
    """Refuse a method or attack that cannot run on ``pipe``'s model family, naming the family; call it as
    soon as the base model is loaded, before anything trains or generates."""
    if pipeline_family(pipe) != "sd3":
        return
    refused = [
        f"{kind} {name!r}" for kind, name in (("method", method), ("attack", attack)) if name not in SD3_SUPPORT[kind]
    ]
    if refused:
        raise DuobenchError(
            f"The {' and '.join(refused)} cannot run on this model: it is a Stable Diffusion 3 pipeline (model "
            "family sd3: an MMDiT transformer, CLIP-L + CLIP-G + T5 text encoders, flow-matching sampler), and "
            f"{'they act' if len(refused) > 1 else 'it acts'} on SD1's UNet, CLIP conditioning or guidance step. "
            f"On SD3 duobench runs the methods {' and '.join(SD3_SUPPORT['method'])}, and the attack "
            f"{' and '.join(SD3_SUPPORT['attack'])}."
        )


def prepare_pipeline(pipe, device: torch.device, dtype: torch.dtype):
    """Move to ``device``, drop the safety checker, silence the per-call progress bar; on a GPU use SDPA and
    allow TF32. SD3 has no safety checker and its transformer uses SDPA already."""
    if pipeline_family(pipe) == "sd3":
        pipe.set_progress_bar_config(disable=True)
        if pipe.transformer.dtype != dtype:
            pipe.to(dtype=dtype)
        pipe.to(device=device)
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        return pipe
    pipe.safety_checker = None
    pipe.requires_safety_checker = False
    if hasattr(pipe, "feature_extractor") and pipe.safety_checker is None:
        pipe.register_to_config(requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if pipe.unet.dtype != dtype:
        pipe.to(dtype=dtype)
    pipe.to(device=device)
    if device.type == "cuda":
        from diffusers.models.attention_processor import AttnProcessor2_0

        # TF32 tensor cores for the fp32 work on a GPU (LoRA and adapter masters, metrics); recorded in each
        # summary's environment, since it moves float results.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

        pipe.unet.set_attn_processor(AttnProcessor2_0())
    return pipe


def _looks_like_registered_name(model: str) -> bool:
    """No slash, no file suffix, not on disk: meant as a registry name (so a typo gets a did-you-mean)."""
    return "/" not in model and not Path(model).suffix and not Path(model).exists()


def _load_external(model: str, dtype: torch.dtype):
    from diffusers import StableDiffusionPipeline

    path = Path(model).expanduser()
    if _names_sd3(model, path):
        return _load_sd3(model, path, dtype)
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise DuobenchError(
                f"Model folder {path} has no model_index.json, so it is not a diffusers pipeline folder. "
                "Point --model at a folder written by `save_pretrained`, at a single .ckpt/.safetensors "
                "file, or at an HF hub id."
            )
        return StableDiffusionPipeline.from_pretrained(path, torch_dtype=dtype, safety_checker=None)
    if path.suffix in {".ckpt", ".safetensors"}:
        if not path.exists():
            raise DuobenchError(f"Model file {path} does not exist.")
        try:
            return StableDiffusionPipeline.from_single_file(str(path), torch_dtype=dtype, safety_checker=None)
        except (*unreachable_errors(), *unreadable_checkpoint_errors()) as error:  # no config, or not SD1.x
            raise DuobenchError(
                f"Could not load the single-file checkpoint {path}: {error}. Single-file loading needs the "
                "CompVis SD1.x layout, and its config may have to be downloaded once (run with internet, or "
                "convert it to a diffusers folder with diffusers' convert script)."
            ) from error
    if model.count("/") == 1 and not path.exists():
        try:
            return StableDiffusionPipeline.from_pretrained(model, torch_dtype=dtype, safety_checker=None)
        except unreachable_errors() as error:  # offline, gated, or the id is wrong
            raise DuobenchError(_unreachable_message(model, error)) from error
    raise DuobenchError(_unreachable_message(model, None))


def _names_sd3(model: str, path: Path) -> bool:
    """A diffusers folder whose ``model_index.json`` names an SD3 pipeline, or a hub id that says SD3."""
    if path.is_dir():
        try:
            index = json.loads((path / "model_index.json").read_text())
        except (OSError, ValueError):
            return False
        return str(index.get("_class_name", "")).startswith("StableDiffusion3")
    return model.count("/") == 1 and not path.exists() and "stable-diffusion-3" in model.lower()


def _load_sd3(model: str, path: Path, dtype: torch.dtype):
    from diffusers import StableDiffusion3Pipeline

    try:
        return StableDiffusion3Pipeline.from_pretrained(path if path.is_dir() else model, torch_dtype=dtype)
    except unreachable_errors() as error:  # offline, gated (SD3 medium needs its licence accepted), wrong id
        raise DuobenchError(_unreachable_message(model, error)) from error


def load_sd3_medium(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
    """Stable Diffusion 3 medium from the HF hub (gated: accept its licence once, then log in), the base
    model of DUO's SD3 results; a registry loader, prepared by `load_pipeline`."""
    return _load_sd3(SD3_MEDIUM, Path(SD3_MEDIUM), dtype)


def unreachable_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "cannot get it from here": offline, a network failure, a missing, gated
    or misspelt hub id or file.

    ``OSError`` covers most: the hub's HTTP, offline and not-found errors, requests' ``ConnectionError``,
    ``datasets``' not-found errors and the "cannot find" errors of diffusers and transformers. The hub's id
    validation and an httpx client's transport errors are not OSErrors, so they are named. Anything else (an
    API break between library versions, a corrupt cache file) is another problem and must surface as itself,
    not as "provide it another way". Call it in the ``except`` clause: the HTTP clients the failed call used
    are imported by then.
    """
    errors: list[type[BaseException]] = [OSError]
    named = [("huggingface_hub.errors", "EntryNotFoundError"), ("huggingface_hub.errors", "HFValidationError")]
    named += [(client, "TransportError") for client in ("httpx", "httpx2")]
    for module_name, name in named:
        error_type = getattr(sys.modules.get(module_name), name, None)
        if isinstance(error_type, type) and issubclass(error_type, BaseException):
            errors.append(error_type)
    return tuple(errors)


def unreadable_checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What a local checkpoint of the wrong layout, or a truncated or corrupt one, raises: the shape and key
    checks of diffusers and transformers, torch's zip reader, pickle (weights_only refusing code),
    safetensors. A TypeError, AttributeError or ImportError means a library incompatibility instead and is
    raised as it is."""
    import pickle

    from safetensors import SafetensorError

    return (ValueError, KeyError, RuntimeError, EOFError, pickle.UnpicklingError, SafetensorError)


def _unreachable_message(model: str, error: Exception | None) -> str:
    reason = f" ({type(error).__name__}: {str(error).splitlines()[0][:200]})" if error else ""
    return (
        f"Cannot load model {model!r}{reason}. Provide it in one of these ways: an HF hub id reachable from "
        "this machine (needs internet once, then the HF cache works offline), a local diffusers folder "
        "(`StableDiffusionPipeline.save_pretrained`), a single CompVis .ckpt/.safetensors file, or a "
        f"registered model name ({', '.join(MODELS.names())}; `--model toy` runs fully offline)."
    )


FINGERPRINTED_COMPONENTS = ("unet", "text_encoder", "vae", "transformer", "text_encoder_2", "text_encoder_3")
"""SD1's three, then SD3's other networks. An SD1 pipeline has none of the last three, so its fingerprint is
what it was before SD3 existed, and the cached images keep their keys."""


def pipeline_fingerprint(pipe) -> str:
    """A short hash of the weights and configs of a pipeline's networks: UNet (or SD3's transformer), text
    encoder(s) and VAE.

    Keys the image cache, so that an image is reused only for the exact same weights. Hashing every tensor
    of SD1.4 takes a few seconds on CPU; for the cache key we hash shapes plus a strided sample of values,
    which changes whenever a method edits the weights. The sampler is part of each item, not of the model.
    """
    digest = hashlib.sha256()
    for component_name in FINGERPRINTED_COMPONENTS:
        component = getattr(pipe, component_name, None)
        if component is None:
            continue
        digest.update(component_name.encode())
        config = component.config.to_dict() if hasattr(component.config, "to_dict") else dict(component.config)
        # Private keys (diffusers' `_use_default_values`, `_name_or_path`, versions) vary run to run.
        config = {
            key: value for key, value in config.items() if not key.startswith("_") and key != "transformers_version"
        }
        digest.update(json.dumps(config, sort_keys=True, default=str).encode())
        for name, tensor in component.state_dict().items():
            flat = tensor.detach().reshape(-1)
            step = max(1, flat.numel() // 4096)
            sample = flat[::step].float().cpu().numpy().tobytes()
            digest.update(name.encode())
            digest.update(str(tuple(tensor.shape)).encode())
            digest.update(sample)
    return digest.hexdigest()[:16]


def tiny_random_pipeline(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, seed: int = 0):
    """A tiny randomly initialised SD1-architecture pipeline with SD1.4's real tokenizer.

    Same classes as SD1.4 (UNet2DConditionModel, AutoencoderKL, CLIPTextModel, CLIPTokenizer, PNDM), 32 px
    images, 8x8 latents; built from configs, so it needs no download.
    """
    from diffusers import PNDMScheduler

    from duobench.small_sd1 import sd1_pipeline, small_text_encoder, small_unet, small_vae

    torch.manual_seed(seed)
    unet = small_unet(block_out_channels=(32, 64), text_width=32, attention_head_dim=8)
    vae = small_vae(block_out_channels=(16, 32, 32), layers_per_block=1)
    text_encoder = small_text_encoder(width=32, intermediate_size=64)
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        skip_prk_steps=True,
        steps_offset=1,
        set_alpha_to_one=False,
    )
    pipe = sd1_pipeline(unet, vae, text_encoder, scheduler)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device=device)
    return pipe if dtype == torch.float32 else pipe.to(dtype=dtype)


SD3_SAMPLER_DEFAULTS = {"steps": 28, "guidance": 7.0, "scheduler": "flow-euler"}
"""``StableDiffusion3Pipeline``'s own defaults, which the official DUO-SD3 data script uses (its T5 length,
256, is not one: duobench encodes 77 T5 tokens, `duobench.sd3.MAX_SEQUENCE_LENGTH`)."""


def default_sampler_settings(pipe, concept=None):
    """The model's own sampling defaults: native resolution, plus any ``duobench_sampler_defaults`` a model
    loader attached (the toy world samples with DDIM in few steps); otherwise SD1.4's PNDM 50 steps, CFG 7.5,
    or on SD3 its pipeline's flow-matching Euler 28 steps, CFG 7.0 (`SD3_SAMPLER_DEFAULTS`). A concept's
    ``generation`` block (its protocol's sampler) overrides them."""
    from duobench.items import SamplerSettings

    if pipeline_family(pipe) == "sd3":
        native = pipe.transformer.config.sample_size * pipe.vae_scale_factor
        values = {"height": native, "width": native, **SD3_SAMPLER_DEFAULTS}
        values.update(getattr(pipe, "duobench_sampler_defaults", {}))
    else:
        native = pipe.unet.config.sample_size * pipe.vae_scale_factor
        values = {"height": native, "width": native, **getattr(pipe, "duobench_sampler_defaults", {})}
    if concept is None:
        return SamplerSettings.from_dict(values)
    try:
        settings = SamplerSettings.from_dict({**values, **concept.generation})
    except ValueError as error:
        raise DuobenchError(f"Concept {concept.name!r} has bad generation settings: {error}") from error
    if pipeline_family(pipe) == "sd3" and settings.scheduler != SD3_SAMPLER_DEFAULTS["scheduler"]:
        raise DuobenchError(
            f"Concept {concept.name!r} samples with {settings.scheduler!r} (its generation settings), an SD1 "
            "sampler, but this model is a Stable Diffusion 3 pipeline (model family sd3), which samples with "
            "flow-matching Euler ('flow-euler'). Use a concept whose generation settings are made for SD3, or "
            "leave the scheduler out of them."
        )
    return settings
