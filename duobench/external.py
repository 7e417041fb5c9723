"""``external``: evaluate an already-unlearned model made elsewhere (a released ESD, UCE, DUO, SPM, … checkpoint).

Nothing is trained. ``train`` imports the checkpoint into duobench's own artifact formats, so that ``apply``
interpolates from the base model (strength 0) to the checkpoint (strength 1) like every other method, and the
strength sweep and curves work unchanged:

- full weights (a state dict, a diffusers UNet folder, a diffusers pipeline folder) become weight deltas
  ``checkpoint − base``, one file per changed component (`duobench.baselines.weight_delta`); every tensor
  must name a tensor of the base model with the same shape. A partial state dict (the UCE and ESD releases
  that keep only the edited projections) is accepted: the tensors it omits keep their base values;
- a LoRA is copied as is and applied with diffusers' ``load_lora_weights`` at scale ``strength``, through
  DUO's `apply` (the same mechanism as a LoRA duobench trained itself).

The artifact is keyed like any other (`duobench.methods.config_key`), and ``ExternalConfig.sha256`` is filled
with the checkpoint's content hash when the config is built, so a changed file gets a new artifact.

Strength 1 gives the checkpoint's weights bit for bit wherever ``base + (checkpoint − base)`` rounds back to
the checkpoint's value in fp32; that holds for fine-tuning-sized edits, and an edit that moves a weight
to a much smaller magnitude can be off by one rounding. The card counts those elements
(``inexact_elements``) instead of hiding them.

Formats (``kind``; ``auto`` detects them):

- ``state-dict``: one ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` file of diffusers-named UNet weights
  (ESD's ``diffusers-nudity-ESDu1-UNET.pt``, UCE's ``.pt`` / ``.safetensors``), also wrapped as
  ``{"state_dict": …}`` or with every key prefixed by its component (``unet.``, ``text_encoder.``, ``vae.``).
  Torch files load with ``weights_only=True``: a pickle of Python objects is refused, not executed.
  CompVis-named checkpoints (``model.diffusion_model.*``) are refused with the command that converts them;
- ``unet-folder``: a diffusers ``UNet2DConditionModel`` folder (``config.json`` + weights);
- ``pipeline-folder``: a diffusers pipeline folder (``model_index.json``): its ``unet``, ``text_encoder``
  and ``vae`` are compared with the base's; the scheduler, tokenizer and safety checker are not used;
- ``lora``: a LoRA file that ``load_lora_weights`` reads (diffusers/peft keys as DUO saves them, or kohya
  keys as in SPM's releases, which then run without SPM's facilitated transport), or a folder holding one.

``path`` is a local file or folder, an HF hub repo id (``owner/name``), or a file or folder inside one
(``owner/name/unet``); hub content is fetched once into the HF cache, which also works offline afterwards.

This module sits in ``duobench/`` rather than ``baselines/``: it re-implements no paper, it is the harness's
way in for any method's output, as `duobench.models` is for any base model.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch

from duobench.baselines.weight_delta import apply_weight_delta, save_weight_delta, weight_delta
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.lora import apply_loras
from duobench.methods import MethodSpec, read_card, write_card
from duobench.metrics.base import sha256_file
from duobench.models import unreachable_errors, unreadable_checkpoint_errors

KINDS = ("auto", "state-dict", "unet-folder", "pipeline-folder", "lora")
COMPONENTS = ("unet", "text_encoder", "vae")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
COMPVIS_PREFIXES = ("model.diffusion_model.", "cond_stage_model.", "first_stage_model.")
LORA_NAME = "external"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(/.+)?$")
_HUB_SKIPPED = ["*.ckpt", "*.msgpack", "*.onnx", "*.onnx_data", "*.h5", "safety_checker/*"]
_PROBE_ADAPTER = "duobench_external_probe"
_EXAMPLES = 3


@dataclass(frozen=True)
class ExternalConfig:
    """Where the checkpoint is and what it is; ``sha256`` is its content hash, filled in when the config is built.

    Give ``sha256`` to insist on one exact checkpoint: a different file is then refused instead of imported.
    For a folder it is the hash of its files' relative paths and sha256s (hidden files skipped).
    """

    path: str = ""
    kind: str = "auto"
    sha256: str = ""

    def __post_init__(self) -> None:
        if not self.path:
            raise DuobenchError(
                "Method 'external' needs the checkpoint to evaluate: --method-opt path=<file, folder or HF id>, "
                "e.g. path=/ckpts/diffusers-nudity-ESDu1-UNET.pt."
            )
        if self.kind not in KINDS:
            raise DuobenchError(f"Method 'external': kind must be one of {', '.join(KINDS)} (got {self.kind!r}).")
        object.__setattr__(self, "path", str(self.path))
        digest = content_sha256(resolve_source(self.path))
        if self.sha256 and str(self.sha256).lower() != digest:
            raise DuobenchError(
                f"The checkpoint {self.path} has sha256 {digest}, not the {self.sha256} the config asks for: it is "
                "another file. Point path at the intended checkpoint, or drop sha256 to accept this one."
            )
        object.__setattr__(self, "sha256", digest)


# --- where the checkpoint is -----------------------------------------------------------------------------


def resolve_source(path: str) -> Path:
    """The checkpoint as a local file or folder: the path itself, or its copy in the HF cache."""
    local = Path(path).expanduser()
    if local.exists():
        return local.resolve()
    if path.startswith(("/", ".", "~")) or not _HUB_ID.match(path):
        raise DuobenchError(f"The checkpoint {path} does not exist. Check the path (it is read on this machine).")
    return hub_snapshot(path)


def hub_snapshot(hub_path: str) -> Path:
    """Fetch ``owner/name`` (or a file or folder inside it) into the HF cache and return its local path."""
    from huggingface_hub import snapshot_download

    owner, name, *inner_parts = hub_path.split("/")
    inner = "/".join(inner_parts)
    try:
        root = snapshot_download(
            f"{owner}/{name}",
            allow_patterns=[inner, f"{inner}/*"] if inner else None,
            ignore_patterns=None if inner else _HUB_SKIPPED,
        )
    except unreachable_errors() as error:  # offline, unknown or gated id, network: "cannot get it from here"
        raise DuobenchError(
            f"The checkpoint {hub_path!r} is not a local path, and as an HF hub id it could not be fetched "
            f"({type(error).__name__}: {str(error).split('. ')[0][:200]}). Fetch it once with internet (it then "
            f"stays in the HF cache for offline runs), e.g. `huggingface-cli download {owner}/{name}`, or pass a "
            "local file or folder."
        ) from error
    target = Path(root) / inner
    if not target.exists():
        raise DuobenchError(f"The HF repo {owner}/{name} has no file or folder {inner!r}.")
    return target


def content_sha256(source: Path) -> str:
    """A file's sha256 (comparable with ``sha256sum``), or one hash over a folder's files and their sha256s."""
    if source.is_file():
        return sha256_file(source)
    digest = hashlib.sha256()
    for file in sorted(source.rglob("*")):
        relative = file.relative_to(source)
        if file.is_file() and not any(part.startswith(".") for part in relative.parts):
            digest.update(f"{relative.as_posix()}\0{sha256_file(file)}\n".encode())
    return digest.hexdigest()


# --- reading it ------------------------------------------------------------------------------------------


def folder_kind(folder: Path) -> str:
    if (folder / "model_index.json").exists():
        return "pipeline-folder"
    if (folder / "config.json").exists():
        return "unet-folder"
    return "auto"  # a folder around one weights file (a state dict or a LoRA): decided from its keys


def weights_file(source: Path) -> Path:
    """``source`` itself, or the one weights file at the top of the folder ``source``."""
    if source.is_file():
        return source
    candidates = sorted(path for path in source.iterdir() if path.is_file() and path.suffix in WEIGHT_SUFFIXES)
    if len(candidates) != 1:
        found = ", ".join(path.name for path in candidates) or "none"
        raise DuobenchError(
            f"The folder {source} is neither a diffusers folder (model_index.json or config.json) nor holds exactly "
            f"one weights file ({', '.join(WEIGHT_SUFFIXES)}; found: {found}). Point path at the file to import."
        )
    return candidates[0]


def read_tensors(file: Path) -> dict[str, torch.Tensor]:
    """The file's name → tensor mapping, unwrapped from ``{"state_dict": …}``."""
    try:
        if file.suffix == ".safetensors":
            from safetensors.torch import load_file

            loaded = load_file(str(file))
        else:
            loaded = torch.load(file, map_location="cpu", weights_only=True)
    except (OSError, *unreadable_checkpoint_errors()) as error:  # not a tensors-only checkpoint, or corrupt
        raise DuobenchError(
            f"Cannot read {file} as a checkpoint ({type(error).__name__}: {str(error).splitlines()[0][:200]}). "
            "It must be a safetensors file or a torch file of tensors only (duobench loads with weights_only=True "
            "and never runs pickled code); re-save it with `torch.save(model.state_dict(), path)` or safetensors."
        ) from error
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(value, torch.Tensor) for value in loaded.values()):
        raise DuobenchError(f"{file} is not a state dict (a mapping of names to tensors), so it cannot be imported.")
    return loaded


def is_lora(tensors: dict[str, torch.Tensor]) -> bool:
    """Every LoRA naming (diffusers, peft, kohya) spells "lora"; no plain UNet or text-encoder weight does."""
    return any("lora" in name.lower() for name in tensors)


def split_components(tensors: dict[str, torch.Tensor], file: Path) -> dict[str, dict[str, torch.Tensor]]:
    """Component → state dict: by the ``unet.`` / ``text_encoder.`` / ``vae.`` prefixes, else all UNet."""
    if any(name.startswith(COMPVIS_PREFIXES) for name in tensors):
        raise DuobenchError(
            f"{file} is a CompVis/LDM-format checkpoint (keys 'model.diffusion_model.*'), whose names duobench "
            "cannot compare with diffusers' layer for layer. Convert it once with diffusers, e.g. `python -c \"from "
            f"diffusers import StableDiffusionPipeline as P; P.from_single_file('{file}').save_pretrained('"
            f"{file.with_suffix('')}-diffusers')\"` (or diffusers' scripts/convert_original_stable_diffusion_to_"
            f"diffusers.py), then pass path={file.with_suffix('')}-diffusers."
        )
    prefixes = tuple(f"{component}." for component in COMPONENTS)
    if not all(name.startswith(prefixes) for name in tensors):
        return {"unet": tensors}
    split: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in tensors.items():
        component, _, key = name.partition(".")
        split.setdefault(component, {})[key] = tensor
    return split


def folder_weights(pipe, folder: Path, kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """Component → state dict of a diffusers UNet folder or of the model components of a pipeline folder."""
    if kind == "unet-folder":
        subfolders = {"unet": None}
    else:
        subfolders = {component: component for component in COMPONENTS if (folder / component).is_dir()}
    weights = {}
    for component, subfolder in subfolders.items():
        model_class = type(getattr(pipe, component))
        try:
            model = model_class.from_pretrained(folder, subfolder=subfolder)
        except (*unreachable_errors(), *unreadable_checkpoint_errors()) as error:  # missing files, wrong layout
            raise DuobenchError(
                f"Cannot load the {component} of {folder} as a {model_class.__name__} "
                f"({type(error).__name__}: {str(error).splitlines()[0][:200]}). Check kind= (the folder must be "
                "written by save_pretrained) and that the checkpoint is for the base model's architecture."
            ) from error
        weights[component] = model.state_dict()
    if not weights:
        raise DuobenchError(f"The pipeline folder {folder} has none of the subfolders {', '.join(COMPONENTS)}.")
    return weights


# --- importing it ----------------------------------------------------------------------------------------


def check_fits(pipe, component: str, tensors: dict[str, torch.Tensor], source: Path) -> None:
    """Every tensor must name a tensor of the base ``component`` and have its shape; name the first misfits."""
    module = getattr(pipe, component, None)
    if module is None:
        raise DuobenchError(f"{source} holds {component} weights, but the base model has no {component}.")
    base = module.state_dict()
    unknown = [name for name in tensors if name not in base]
    reshaped = [name for name in tensors if name in base and tuple(tensors[name].shape) != tuple(base[name].shape)]
    if len(unknown) == len(tensors):
        raise DuobenchError(
            f"None of the {len(tensors)} tensor names in {source} is a {component} weight of the base model (e.g. "
            f"{unknown[0]!r}; the base has e.g. {next(iter(base))!r}). The checkpoint is for another architecture "
            "or uses another naming; duobench imports diffusers-named weights (pass kind= if detection was wrong)."
        )
    problems = []
    if unknown:
        problems.append(f"{len(unknown)} name(s) the base {component} does not have (e.g. {unknown[:_EXAMPLES]})")
    if reshaped:
        examples = ", ".join(
            f"{name!r}: checkpoint {tuple(tensors[name].shape)} vs base {tuple(base[name].shape)}"
            for name in reshaped[:_EXAMPLES]
        )
        problems.append(f"{len(reshaped)} tensor(s) of another shape ({examples})")
    if problems:
        raise DuobenchError(
            f"{source} does not match the base model's {component}: {'; '.join(problems)}. It was made for another "
            "base model: pass that model as --model (e.g. the SD version it was fine-tuned from)."
        )


def import_weights(pipe, weights: dict[str, dict[str, torch.Tensor]], source: Path, out_dir: Path) -> dict:
    """Save ``checkpoint − base`` per changed component; return the card's per-component summary."""
    for component, tensors in weights.items():
        check_fits(pipe, component, tensors, source)
    summary = {}
    for component, tensors in weights.items():
        base = getattr(pipe, component).state_dict()
        delta = weight_delta(base, tensors)
        if not delta:
            continue
        save_weight_delta(delta, out_dir, component)
        summary[component] = {
            "changed_tensors": len(delta),
            "checkpoint_tensors": len(tensors),
            "base_tensors": len(base),
            "inexact_elements": inexact_elements(base, tensors, delta),
        }
    if not summary:
        raise DuobenchError(f"{source} has the same weights as the base model: there is no edit to evaluate.")
    return {"components": summary}


def inexact_elements(base: dict, edited: dict, delta: dict[str, torch.Tensor]) -> int:
    """How many elements strength 1 (``base + delta``, as `apply_weight_delta` computes it) does not reproduce."""
    count = 0
    for name, change in delta.items():
        dtype = base[name].dtype
        rebuilt = (base[name].detach().cpu().float() + change).to(dtype)
        count += int((rebuilt != edited[name].detach().cpu().to(dtype)).sum())
    return count


def import_lora(pipe, file: Path, tensors: dict[str, torch.Tensor], source: Path, out_dir: Path) -> dict:
    """Store the LoRA as DUO's apply reads it, after checking every one of its weights finds a base layer.

    diffusers only warns about LoRA keys that match no layer, so the check loads the LoRA once and compares
    the parameters it placed with the file's, then unloads it (the base pipe is left as it was).
    """
    from duobench.lora import LORA_WEIGHTS_NAME

    stored = out_dir / LORA_WEIGHTS_NAME
    if file.suffix == ".safetensors":
        shutil.copyfile(file, stored)  # byte for byte: keeps the metadata (rank, alpha) diffusers reads
    else:
        from safetensors.torch import save_file

        save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(stored))
    in_file = sum(tensor.numel() for tensor in tensors.values() if tensor.numel() > 1)  # scalars are alphas
    try:
        pipe.load_lora_weights(out_dir, weight_name=LORA_WEIGHTS_NAME, adapter_name=_PROBE_ADAPTER)
        placed = sum(
            parameter.numel()
            for component in (pipe.unet, pipe.text_encoder)
            for name, parameter in component.named_parameters()
            if f".{_PROBE_ADAPTER}." in name
        )
    except (RuntimeError, ValueError, KeyError) as error:  # peft's size mismatch, diffusers' unknown format
        raise DuobenchError(
            f"The LoRA {source} does not fit the base model ({str(error).strip().splitlines()[-1][:300]}). "
            "It was trained for another base model: pass that model as --model."
        ) from error
    finally:
        pipe.unload_lora_weights()
    if placed != in_file:
        raise DuobenchError(
            f"Only {placed} of the {in_file} LoRA weights in {source} found a layer of the base model (diffusers' "
            "warning above names the keys it skipped). The LoRA was trained for another architecture or uses a "
            "naming diffusers does not read; pass the matching --model."
        )
    return {"loras": [{"name": LORA_NAME, "folder": ".", "weight": 1.0}], "lora_parameters": in_file}


def import_checkpoint(pipe, source: Path, kind: str, out_dir: Path) -> dict:
    """Write the artifact's weights into ``out_dir``; return what its card records about them."""
    if kind == "auto" and source.is_dir():
        kind = folder_kind(source)
    if kind in ("unet-folder", "pipeline-folder"):
        if not source.is_dir():
            raise DuobenchError(f"kind={kind} needs a folder, but {source} is a file.")
        return {"kind": kind, **import_weights(pipe, folder_weights(pipe, source, kind), source, out_dir)}
    file = weights_file(source)
    tensors = read_tensors(file)
    if kind == "lora" or (kind == "auto" and is_lora(tensors)):
        return {"kind": "lora", **import_lora(pipe, file, tensors, source, out_dir)}
    return {"kind": "state-dict", **import_weights(pipe, split_components(tensors, file), source, out_dir)}


def train(config: ExternalConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Import the checkpoint (nothing is trained); the concept is only recorded, the checkpoint decided it."""
    out_dir = Path(out_dir)
    source = resolve_source(config.path)
    details = import_checkpoint(pipe, source, config.kind, out_dir)
    write_card(out_dir, "external", config, concept, source=config.path, local_path=str(source), **details)


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> None:
    """Edit ``pipe`` in place toward the checkpoint: 0 is the base model, 1 the checkpoint."""
    if not 0.0 <= strength <= 1.0:
        raise DuobenchError(f"External strength interpolates base (0) to checkpoint (1); got {strength}.")
    card = read_card(artifact_dir, "an external-checkpoint")
    if card["kind"] == "lora":
        apply_loras(pipe, artifact_dir, card["loras"], strength, prefix="external")
        return
    for component in card["components"]:
        apply_weight_delta(pipe, artifact_dir, strength, component)


EXTERNAL = MethodSpec(
    name="external",
    config_cls=ExternalConfig,
    train=train,
    apply=apply,
    description="an already-unlearned checkpoint made elsewhere, imported as a weight delta or LoRA",
    touches=("unet", "text_encoder", "vae"),
)
