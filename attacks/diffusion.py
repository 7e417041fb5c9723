"""The diffusion pieces the white-box attacks share: base-model images as latents, and the denoising loss.

Both Concept Inversion and UnlearnDiffAtk score a text condition by how well the *unlearned* UNet predicts
the noise added to an image of the concept: ``MSE(eps, eps_theta(sqrt(a_t) x0 + sqrt(1 - a_t) eps, t, c))``,
with ``a_t`` the training schedule's cumulative alpha. Only epsilon-prediction models (SD1.x, the toy
world) are supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from duobench.attacks.base import row_work_item
from duobench.engine import generate
from duobench.errors import DuobenchError
from duobench.items import SamplerSettings
from duobench.prompts import PromptRow


def require_epsilon_prediction(pipe) -> None:
    prediction = pipe.scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise DuobenchError(
            f"White-box attacks here optimise the epsilon-prediction loss, but this model predicts "
            f"{prediction!r}; use an SD1.x-style (epsilon) model."
        )


def generate_rows(pipe, rows: Sequence[PromptRow], settings: SamplerSettings, batch_size: int = 8) -> list[Image.Image]:
    """One image per row from ``pipe`` (the base model's images of the concept), with each row's seed."""
    items = [row_work_item(row, settings, row.prompt) for row in rows]
    return [image for _, images in generate(pipe, items, batch_size) for image in images]


@torch.no_grad()
def images_to_latents(vae, images: Sequence[Image.Image]) -> torch.Tensor:
    """VAE latents (mean of the posterior, times the scaling factor) of RGB images, in float32."""
    pixels = torch.stack([torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0) for image in images])
    pixels = pixels.permute(0, 3, 1, 2).to(device=vae.device, dtype=vae.dtype)
    return (vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor).float()


def denoising_loss(
    unet,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    condition: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """Mean squared error between ``noise`` and the UNet's prediction of it from the noised ``latents``."""
    alpha = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    prediction = unet(
        noisy.to(unet.dtype), timesteps.to(latents.device), encoder_hidden_states=condition.to(unet.dtype)
    ).sample
    return F.mse_loss(prediction.float(), noise.float())
