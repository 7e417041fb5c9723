"""The artifact of methods that rewrite UNet weights (ESD, UCE): a safetensors delta of the changed tensors.

A delta ``edited − base`` (fp32, keyed by ``unet.state_dict()`` names) is small when few tensors change
(UCE: 32 projections; ESD-x: cross-attention), loads onto any copy of the base model, and makes the
strength knob exact interpolation: ``W = W_base + strength · delta``.

Applying remembers each touched tensor's base value (on the CPU, on the UNet object itself), so applying
again with another strength starts from the base rather than stacking edits, and strength 0 restores the
base weights bit for bit.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from duobench.errors import DuobenchError

DELTA_FILE = "unet_delta.safetensors"
_BASE_VALUES_ATTRIBUTE = "_duobench_base_values"


def unet_delta(base: dict[str, torch.Tensor], edited: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``edited − base`` in fp32 for every tensor of ``edited`` that differs from ``base``."""
    delta = {}
    for name, value in edited.items():
        difference = value.detach().float().cpu() - base[name].detach().float().cpu()
        if torch.any(difference != 0):
            delta[name] = difference.contiguous()
    return delta


def save_unet_delta(delta: dict[str, torch.Tensor], out_dir: Path) -> Path:
    if not delta:
        raise DuobenchError("The edit changed no UNet weight, so there is nothing to save; check the config.")
    path = Path(out_dir) / DELTA_FILE
    save_file(delta, str(path))
    return path


def apply_unet_delta(pipe, artifact_dir: Path, strength: float) -> None:
    """Set each delta tensor of ``pipe.unet`` to ``base + strength · delta``, in place."""
    path = Path(artifact_dir) / DELTA_FILE
    if not path.exists():
        raise DuobenchError(f"{artifact_dir} holds no {DELTA_FILE}; it is not a UNet-delta artifact.")
    delta = load_file(str(path))
    state = pipe.unet.state_dict(keep_vars=True)
    mismatched = [
        name for name, value in delta.items() if name not in state or tuple(state[name].shape) != tuple(value.shape)
    ]
    if mismatched:
        raise DuobenchError(
            f"The delta in {path} does not fit this UNet ({len(mismatched)} tensors missing or of another "
            f"shape, e.g. {mismatched[0]!r}); it was made for a different base model."
        )
    base_values: dict[str, torch.Tensor] = pipe.unet.__dict__.setdefault(_BASE_VALUES_ATTRIBUTE, {})
    with torch.no_grad():
        for name, change in delta.items():
            tensor = state[name]
            if name not in base_values:
                base_values[name] = tensor.detach().to("cpu", copy=True)
            base = base_values[name].to(device=tensor.device, dtype=torch.float32)
            tensor.copy_((base + float(strength) * change.to(tensor.device)).to(tensor.dtype))
