"""LoRA plumbing shared by every LoRA-shaped artifact: attach a trainable adapter, save it in diffusers'
format, and load saved adapters onto a pipeline at a scale.

Used by DUO (trains and applies its LoRA), ``external`` (applies an imported LoRA) and any method that
writes the same artifact layout: a ``card.json`` whose ``loras`` list names each adapter as
``{name, folder, weight}``, and one ``pytorch_lora_weights.safetensors`` per folder, loadable with
``pipe.load_lora_weights(folder)``. Adapters live inside the UNet (or SD3's transformer; peft), so they suit
edits that the runner applies to its own fresh copy of the model; an attack, which must not change the model it
is handed, attaches its adapters as forward hooks instead (`duobench.attacks.finetune`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from duobench.errors import DuobenchError

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
TRAIN_ADAPTER = "duobench_train"


@contextmanager
def lora_attached(
    unet, targets: Sequence[str], rank: int, alpha: float, seed: int = 0
) -> Iterator[list[torch.nn.Parameter]]:
    """Attach a fresh trainable LoRA on the modules named by ``targets`` and yield its parameters; remove it
    afterwards.

    The Gaussian init of the LoRA's A matrices is drawn from ``seed`` without disturbing the caller's global
    random state. The base weights are frozen meanwhile and their ``requires_grad`` flags, the train/eval
    mode and the module tree are restored on exit, so the caller's pipeline is left exactly as it was.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig

    if getattr(unet, "peft_config", None):
        raise DuobenchError(
            f"Training a LoRA starts from the base model, but this UNet already carries LoRA adapter(s) "
            f"{sorted(unet.peft_config)}; call `pipe.unload_lora_weights()` first."
        )
    requires_grad = {name: p.requires_grad for name, p in unet.named_parameters()}
    was_training = unet.training
    unet.requires_grad_(False)
    config = LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(targets))
    with torch.random.fork_rng(devices=[unet.device] if unet.device.type == "cuda" else []):
        torch.manual_seed(seed)
        unet.add_adapter(config, adapter_name=TRAIN_ADAPTER)
    cast_training_params(unet, dtype=torch.float32)  # LoRA in fp32 even when the base runs in fp16
    try:
        yield [p for p in unet.parameters() if p.requires_grad]
    finally:
        unet.unload_lora()
        for name, parameter in unet.named_parameters():
            parameter.requires_grad_(requires_grad[name])
        unet.train(was_training)


def save_lora(unet, folder: Path) -> Path:
    """Write the adapter attached by `lora_attached` as ``pytorch_lora_weights.safetensors``.

    ``unet`` may be SD3's transformer: its file is then the SD3 layout (``transformer.*`` keys in peft's
    naming, as diffusers' SD3 LoRA training scripts write it), loadable by ``StableDiffusion3Pipeline``.
    """
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(unet, adapter_name=TRAIN_ADAPTER)
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in state.items()}
    metadata = unet.peft_config[TRAIN_ADAPTER].to_dict()
    metadata["target_modules"] = sorted(metadata["target_modules"])  # a set: sorted, so files are reproducible
    folder.mkdir(parents=True, exist_ok=True)
    if _is_sd3_transformer(unet):
        from diffusers import StableDiffusion3Pipeline

        StableDiffusion3Pipeline.save_lora_weights(
            save_directory=folder,
            transformer_lora_layers=state,
            weight_name=LORA_WEIGHTS_NAME,
            transformer_lora_adapter_metadata=metadata,
        )
        return folder / LORA_WEIGHTS_NAME
    StableDiffusionPipeline.save_lora_weights(
        save_directory=folder,
        unet_lora_layers=convert_state_dict_to_diffusers(state),
        weight_name=LORA_WEIGHTS_NAME,
        unet_lora_adapter_metadata=metadata,
    )
    return folder / LORA_WEIGHTS_NAME


def apply_loras(pipe, artifact_dir: Path, loras: Sequence[dict[str, Any]], strength: float, prefix: str) -> None:
    """Load each of ``loras`` (``{name, folder, weight}``, folders relative to ``artifact_dir``) into
    ``pipe`` and scale it by ``strength × weight``. Calling again with another strength only rescales:
    the weights load once per pipe."""
    from duobench.models import pipeline_family

    artifact_dir = Path(artifact_dir)
    denoiser = "transformer" if pipeline_family(pipe) == "sd3" else "unet"
    loaded = set(pipe.get_list_adapters().get(denoiser, []))
    names, weights = [], []
    for lora in loras:
        folder = artifact_dir / lora["folder"]
        if not (folder / LORA_WEIGHTS_NAME).exists():
            raise DuobenchError(f"LoRA artifact {artifact_dir} is incomplete: {folder / LORA_WEIGHTS_NAME} is missing.")
        name = adapter_name(prefix, artifact_dir, lora["name"])
        if name not in loaded:
            pipe.load_lora_weights(folder, weight_name=LORA_WEIGHTS_NAME, adapter_name=name)
        names.append(name)
        weights.append(strength * float(lora["weight"]))
    pipe.set_adapters(names, adapter_weights=weights)


def _is_sd3_transformer(model) -> bool:
    from diffusers import SD3Transformer2DModel

    return isinstance(model, SD3Transformer2DModel)


def adapter_name(prefix: str, artifact_dir: Path, lora: str) -> str:
    """A name unique to this artifact and LoRA, and free of the dots that torch module names forbid."""
    digest = hashlib.sha1(str(Path(artifact_dir).resolve()).encode()).hexdigest()[:10]
    return f"{prefix}_{digest}_{''.join(c if c.isalnum() else '_' for c in lora)}"
