"""SLD: Safe Latent Diffusion (Schramowski et al., CVPR 2023), as a guidance hook on duobench's generator.

SLD changes no weight. At every denoising step the UNet also predicts the noise for a *safety concept*
c_S (a third row beside the unconditional and the prompt rows), and classifier-free guidance is steered
away from it. With ε_∅, ε_p, ε_S the predictions for the negative prompt ("" by default), the prompt and the
safety concept, s_g the CFG scale and the SLD hyper-parameters s_S (``guidance_scale``), λ (``threshold``),
s_m (``momentum_scale``), β_m (``mom_beta``) and the warm-up δ (``warmup_steps``):

    μ   = min(1, s_S · |ε_p − ε_S|)  where ε_p − ε_S < λ, else 0       (element-wise safety scale, eq. 6)
    γ_t = μ ⊙ (ε_S − ε_∅) + s_m · ν_t                                  (safety guidance, eq. 4, plus momentum, eq. 7)
    ν_{t+1} = β_m · ν_t + (1 − β_m) · γ_t,   ν_0 = 0                    (momentum, eq. 8)
    ε̄   = ε_∅ + s_g · (ε_p − ε_∅ − γ_t)   from step δ on               (eq. 3)
    ε̄   = ε_∅ + s_g · (ε_p − ε_∅)          during the first δ steps

The equation numbers are the ones the reference code's comments give, and where paper and code could be
read differently we follow the code: diffusers' (deprecated) ``StableDiffusionPipelineSafe``, the authors'
pipeline moved into diffusers. As there, the momentum ν builds up during the warm-up too (only γ's use is
delayed), the threshold test is ``ε_p − ε_S ≥ λ → μ = 0``, and the safety embedding is the text encoder's
output for c_S, computed by the (possibly edited) model's own text encoder.

A property of SLD worth knowing: μ grows with |ε_p − ε_S|, so a prompt whose prediction equals the safety
concept's (the prompt *is* c_S, e.g. "star" with the default safety text "star") gets μ = 0 and is not steered
at all; prompts that contain the concept among other words ("a red star") are.

Hyper-parameters: the paper's four configurations, as ``SafetyConfig`` in the reference package:

    preset   δ (warm-up)  s_S   λ      s_m  β_m
    weak     15           20    0.0    0.0  0.0
    medium   10           1000  0.01   0.3  0.4
    strong    7           2000  0.025  0.5  0.7
    max       0           5000  1.0    0.5  0.7

The default is ``medium``: it is the reference pipeline's own default (its ``__call__`` defaults are exactly
the MEDIUM values) and what erasure papers call "SLD-Medium"; ``max`` is their "SLD-Max". Each value can be
overridden by name (None = the preset's).

The safety concept. The paper uses one text for all of I2P's categories (``I2P_SAFETY_CONCEPT``, quoted
from the reference pipeline; pass ``safety_concept=i2p``). duobench erases one concept at a time, so the
default is the concept's own ``erase_prompt`` ("nudity", "star"); any other text can be given. Erasure papers
ran the reference pipeline, whose safety text is the I2P one: to compare with their SLD rows on nudity, set
``safety_concept=i2p``.

Deliberate differences from the reference code:

- ``strength`` (duobench's knob for every method, not the paper's) scales the safety term in eq. 3:
  ε̄ = ε_∅ + s_g · (ε_p − ε_∅ − strength · γ_t). Momentum is computed as in the reference and only its use is
  scaled. At strength 0 the hook adds no UNet row and guides with plain CFG, so images are bit-identical to
  the base model's (an extra row could change the float results of a batched UNet call).
- SLD needs classifier-free guidance: at CFG scale ≤ 1 (or on a model without CFG) the generator makes no
  guidance step, and SLD does nothing, as in the reference (``enable_safety_guidance`` requires
  ``guidance_scale > 1``); equally with s_S ≤ 1.
- Every prompt form is defended: the safety row rides along whatever the prompt row holds (text, exact
  token ids, a replayed embedding), since it depends only on c_S. The reference takes text prompts only.
- No image safety checker: the reference pipeline also runs the SD safety checker on the output; duobench
  measures that with judges instead, so SLD here is the guidance alone (as erasure papers evaluate it).
- The safety embedding is encoded once per text-encoder device and dtype and reused (the reference encodes
  it on every call): encoded on first use, i.e. after every weight edit of the chain has been applied.
- The safety term is computed in the UNet's output dtype, as the reference does; nothing is upcast.

Artifact: ``card.json`` only (SLD trains nothing), holding the resolved hyper-parameters and safety text.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import Conditioning, Generator, GuidanceStep, SamplingHook, classifier_free_guidance
from duobench.methods import MethodSpec, read_card, write_card

I2P_SAFETY_CONCEPT = (
    "an image showing hate, harassment, violence, suffering, humiliation, harm, suicide, sexual, nudity,"
    " bodily fluids, blood, obscene gestures, illegal activity, drug use, theft, vandalism, weapons, child"
    " abuse, brutality, cruelty"
)
"""The reference pipeline's default safety concept, covering I2P's seven categories."""


@dataclass(frozen=True)
class SLDParameters:
    """The five numbers of one SLD configuration (the reference's ``sld_*`` arguments)."""

    warmup_steps: int
    guidance_scale: float
    threshold: float
    momentum_scale: float
    mom_beta: float


PRESETS = {
    "weak": SLDParameters(warmup_steps=15, guidance_scale=20.0, threshold=0.0, momentum_scale=0.0, mom_beta=0.0),
    "medium": SLDParameters(warmup_steps=10, guidance_scale=1000.0, threshold=0.01, momentum_scale=0.3, mom_beta=0.4),
    "strong": SLDParameters(warmup_steps=7, guidance_scale=2000.0, threshold=0.025, momentum_scale=0.5, mom_beta=0.7),
    "max": SLDParameters(warmup_steps=0, guidance_scale=5000.0, threshold=1.0, momentum_scale=0.5, mom_beta=0.7),
}
"""The paper's Hyp-Weak/Medium/Strong/Max, as ``SafetyConfig`` in the reference package."""


@dataclass(frozen=True)
class SLDConfig:
    """A preset plus optional overrides of its values (None = the preset's), and the safety concept text
    ("" = the concept's ``erase_prompt``, ``i2p`` = `I2P_SAFETY_CONCEPT`)."""

    preset: str = "medium"
    safety_concept: str = ""
    warmup_steps: int | None = None
    guidance_scale: float | None = None
    threshold: float | None = None
    momentum_scale: float | None = None
    mom_beta: float | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"preset must be one of {', '.join(PRESETS)}, got {self.preset!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")
        if self.mom_beta is not None and not 0.0 <= self.mom_beta <= 1.0:
            raise ValueError(f"mom_beta must be in [0, 1], got {self.mom_beta}")

    def parameters(self) -> SLDParameters:
        """The preset with this config's overrides applied."""
        overrides = {f.name: getattr(self, f.name) for f in fields(SLDParameters) if getattr(self, f.name) is not None}
        return SLDParameters(**{**asdict(PRESETS[self.preset]), **overrides})

    def safety_text(self, concept: Concept) -> str:
        if self.safety_concept.strip().lower() == "i2p":
            return I2P_SAFETY_CONCEPT
        text = self.safety_concept or concept.erase_prompt
        if not text.strip():
            raise DuobenchError(
                f"Concept {concept.name!r} has an empty erase_prompt; give SLD a safety_concept (or 'i2p')."
            )
        return text


def safety_guidance(
    uncond: torch.Tensor,
    text: torch.Tensor,
    safety: torch.Tensor,
    momentum: torch.Tensor,
    parameters: SLDParameters,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's safety guidance γ_t and the next momentum ν_{t+1} (eq. 4-8), element-wise."""
    difference = text - safety
    scale = torch.clamp(torch.abs(difference) * parameters.guidance_scale, max=1.0)
    scale = torch.where(difference >= parameters.threshold, torch.zeros_like(scale), scale)
    gamma = torch.mul(safety - uncond, scale)
    gamma = gamma + parameters.momentum_scale * momentum
    next_momentum = parameters.mom_beta * momentum + (1 - parameters.mom_beta) * gamma
    return gamma, next_momentum


class SafeLatentDiffusion(SamplingHook):
    """Adds the safety-concept row to every UNet call and replaces the CFG step by SLD's (eq. 3)."""

    name = "sld"
    replaces_guidance = True

    def __init__(self, parameters: SLDParameters, safety_text: str, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise DuobenchError(f"SLD strength must be in [0, 1], got {strength}.")
        self.parameters = parameters
        self.safety_text = safety_text
        self.strength = float(strength)
        self._embeddings: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    @property
    def active(self) -> bool:
        """Whether SLD changes anything: the reference switches it off for s_S ≤ 1; strength 0 is the base."""
        return self.strength > 0 and self.parameters.guidance_scale > 1

    def safety_embedding(self, generator: Generator) -> torch.Tensor:
        """The (1, 77, D) encoding of the safety text, once per text-encoder device and dtype."""
        encoder = generator.pipe.text_encoder
        key = (str(encoder.device), encoder.dtype)
        if key not in self._embeddings:
            self._embeddings[key] = generator.encode_texts([self.safety_text])
        return self._embeddings[key]

    def extra_rows(self, generator: Generator, conditioning: Conditioning) -> torch.Tensor | None:
        if not self.active:
            return None
        return self.safety_embedding(generator).expand(len(conditioning.items), -1, -1)

    def guide(self, step: GuidanceStep) -> torch.Tensor:
        if not self.active:
            return classifier_free_guidance(step)
        momentum = step.state.get("sld_momentum")
        if momentum is None:
            momentum = torch.zeros_like(step.text)
        gamma, step.state["sld_momentum"] = safety_guidance(
            step.uncond, step.text, step.extra, momentum, self.parameters
        )
        guidance = step.text - step.uncond
        if step.index >= self.parameters.warmup_steps:
            guidance = guidance - self.strength * gamma
        return step.uncond + step.guidance * guidance


def train(config: SLDConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Nothing to train: the card records the resolved hyper-parameters and the safety text."""
    write_card(
        out_dir,
        "sld",
        config,
        concept,
        parameters=asdict(config.parameters()),
        safety_concept=config.safety_text(concept),
    )


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> SafeLatentDiffusion:
    """The SLD hook for the card's configuration; ``pipe`` is left as it is."""
    card = read_card(Path(artifact_dir))
    if card.get("method") != "sld" or "parameters" not in card:
        raise DuobenchError(f"{artifact_dir} is not an SLD artifact (its card.json has no SLD parameters).")
    return SafeLatentDiffusion(SLDParameters(**card["parameters"]), card["safety_concept"], strength)


SLD = MethodSpec(
    name="sld",
    config_cls=SLDConfig,
    train=train,
    apply=apply,
    description="SLD: safety guidance away from the concept at inference (presets weak/medium/strong/max)",
    touches=("guidance",),
)
