"""The artifact of methods that rewrite weights (ESD, UCE, an imported checkpoint): safetensors deltas.

A delta ``edited − base`` (fp32, keyed by the component's ``state_dict()`` names) holds only the tensors that
changed, so it is small when few do (UCE: 32 projections; ESD-x: cross-attention), loads onto any copy of the
base model, and makes the strength knob exact interpolation: ``W = W_base + strength · delta``. Each pipeline
component has its own file, ``<component>_delta.safetensors`` (``unet_delta.safetensors`` for ESD and UCE), so
an edit of the text encoder travels the same way as one of the UNet.

Applying remembers each touched tensor's base value (on the CPU, on the component object itself), so applying
again with another strength starts from the base rather than stacking edits, and strength 0 restores the
base weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from duobench.errors import DuobenchError

_BASE_VALUES_ATTRIBUTE = "_duobench_base_values"
_DISPLAY_NAMES = {"unet": "UNet", "text_encoder": "text encoder", "vae": "VAE"}


def delta_file(component: str = "unet") -> str:
    return f"{component}_delta.safetensors"


def weight_delta(base: dict[str, torch.Tensor], edited: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``edited − base`` in fp32 for every tensor of ``edited`` that differs from ``base``."""
    delta = {}
    for name, value in edited.items():
        difference = value.detach().float().cpu() - base[name].detach().float().cpu()
        if torch.any(difference != 0):
            delta[name] = difference.contiguous()
    return delta


def save_weight_delta(delta: dict[str, torch.Tensor], out_dir: Path, component: str = "unet") -> Path:
    if not delta:
        raise DuobenchError(
            f"The edit changed no {_DISPLAY_NAMES.get(component, component)} weight, so there is nothing to save; "
            "check the config."
        )
    path = Path(out_dir) / delta_file(component)
    save_file(delta, str(path))
    return path


def apply_weight_delta(pipe, artifact_dir: Path, strength: float, component: str = "unet") -> None:
    """Set each delta tensor of ``pipe.<component>`` to ``base + strength · delta``, in place."""
    path = Path(artifact_dir) / delta_file(component)
    if not path.exists():
        raise DuobenchError(f"{artifact_dir} holds no {path.name}; it is not a weight-delta artifact.")
    delta = load_file(str(path))
    module = getattr(pipe, component)
    state = module.state_dict(keep_vars=True)
    mismatched = [
        name for name, value in delta.items() if name not in state or tuple(state[name].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise DuobenchError(
            f"The delta in {path} does not fit this {_DISPLAY_NAMES.get(component, component)} ({len(mismatched)} "
            f"tensors missing or of another shape, e.g. {mismatched[0]!r}); it was made for a different base model."
        )
    base_values: dict[str, torch.Tensor] = module.__dict__.setdefault(_BASE_VALUES_ATTRIBUTE, {})
    with torch.no_grad():
        for name, change in delta.items():
            tensor = state[name]
            if name not in base_values:
                base_values[name] = tensor.detach().to("cpu", copy=True)
            base = base_values[name].to(device=tensor.device, dtype=torch.float32)
            tensor.copy_((base + float(strength) * change.to(tensor.device)).to(tensor.dtype))
