"""What ESD's and SPM's training loops share: one noise prediction, a partial CFG rollout, a loss summary.

Both methods draw the training latent ``x_t`` by denoising fresh noise part of the way with the concept
prompt at a low guidance scale (3 in both papers), then query the model at the step where they stopped.
"""

from __future__ import annotations

import torch


def predict_noise(unet, latents: torch.Tensor, timestep, embeddings: torch.Tensor) -> torch.Tensor:
    """``ε(latents, t, embeddings)`` in fp32 whatever the UNet's dtype; a single embedding broadcasts."""
    if embeddings.shape[0] != latents.shape[0]:
        embeddings = embeddings.expand(latents.shape[0], *embeddings.shape[1:])
    output = unet(latents.to(unet.dtype), timestep, encoder_hidden_states=embeddings.to(unet.dtype)).sample
    return output.float()


@torch.no_grad()
def denoise_partially(
    unet,
    scheduler,
    latents: torch.Tensor,
    cond: torch.Tensor,
    uncond: torch.Tensor,
    guidance: float,
    steps: int,
) -> torch.Tensor:
    """Run the first ``steps`` of ``scheduler.timesteps`` with classifier-free guidance; return the latent.

    After ``k`` steps the latent sits at ``scheduler.timesteps[k]``, where the caller queries the model.
    """
    embeddings = torch.cat([uncond, cond])
    for timestep in scheduler.timesteps[:steps]:
        model_input = scheduler.scale_model_input(torch.cat([latents, latents]), timestep)
        noise_uncond, noise_cond = predict_noise(unet, model_input, timestep, embeddings).chunk(2)
        guided = noise_uncond + guidance * (noise_cond - noise_uncond)
        latents = scheduler.step(guided, timestep, latents).prev_sample
    return latents


def initial_noise(unet, height: int, width: int, generator: torch.Generator) -> torch.Tensor:
    """Standard normal noise of one latent (sizes in latent pixels), drawn on the CPU so that a seed means the
    same noise on any device."""
    shape = (1, unet.config.in_channels, height, width)
    return torch.randn(shape, generator=generator).to(unet.device)


def loss_summary(losses: list[float], window: int = 50) -> dict[str, float | None]:
    """Mean loss over the first and the last ``window`` iterations, for the artifact's card."""

    def mean(values: list[float]) -> float | None:
        return sum(values) / len(values) if values else None

    return {"loss_first": mean(losses[:window]), "loss_last": mean(losses[-window:])}
