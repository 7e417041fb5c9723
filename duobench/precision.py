"""Backpropagating through a model held in half precision: autocast for the forward, a loss scale for fp16.

Users run SD on a GPU in fp16 (`duobench.models.default_dtype`). The white-box attacks (UnlearnDiffAtk,
Concept Inversion, P4D) and the fine-tuning baselines (ESD, SPM) differentiate through that UNet and text
encoder. Run naively in fp16, the forward's softmaxes and norms can overflow and the backward's small
gradients (an MSE over 4 x 64 x 64 latents hands each element about 1e-4) flush to zero under fp16's
6e-8. The recipe is the usual mixed-precision one (as `attacks/finetune.py` and DUO's accelerate run do):

- the optimised variables (adversarial embeddings, a learned token, adapters, a trained UNet copy) are fp32
  master parameters, with fp32 optimiser state;
- the forward runs under ``torch.autocast(device, dtype=<model dtype>)``: matmuls and convolutions in half,
  softmax, layer/group norm and the MSE in fp32;
- in fp16 only, the loss is multiplied by a dynamic scale before the backward pass and the gradients divided
  by it before the step (``torch.amp.GradScaler``: starts at 2^16, halves and skips the step on an inf/NaN
  gradient, doubles after 2000 clean steps). bf16 has fp32's exponent range and needs no scale.

In fp32 every piece is a no-op (``autocast`` is a null context, the scaler is disabled: ``scale(loss)`` is
``loss`` and ``step`` is ``optimizer.step()``), so fp32 results are bit for bit what they were without it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

HALF_DTYPES = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Precision:
    """How to run a differentiated forward through a model stored in ``dtype`` on ``device_type``."""

    device_type: str
    dtype: torch.dtype

    @classmethod
    def of(cls, model) -> Precision:
        """The precision of a diffusers / transformers model (anything with ``.device`` and ``.dtype``)."""
        return cls(torch.device(model.device).type, model.dtype)

    @property
    def mixed(self) -> bool:
        """Whether the model is half precision, so that forwards run under autocast."""
        return self.dtype in HALF_DTYPES

    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` to the model's dtype for a half-precision model; nothing for fp32."""
        if not self.mixed:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def grad_scaler(self) -> torch.amp.GradScaler:
        """A fresh dynamic loss scaler, enabled for fp16 only (a disabled one passes everything through).

        Use one per optimisation (one per attacked prompt), so a result does not depend on what ran before.
        The optimised parameters' gradients must be fp32 (``unscale_`` refuses fp16 gradients).
        """
        return torch.amp.GradScaler(self.device_type, enabled=self.dtype == torch.float16)
