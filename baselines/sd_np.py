"""SD-NP: Stable Diffusion with the concept's words as the negative prompt, the training-free baseline of
erasure papers.

Classifier-free guidance pushes each step from the negative-prompt prediction towards the prompt's,
ε̄ = ε_neg + s_g · (ε_p − ε_neg). SD-NP puts the erased concept into the negative prompt, so guidance also
pushes away from it. Nothing is trained and no weight changes: the generator's conditioning hook swaps the
negative-prompt embedding of every item before denoising.

The negative prompt is the config's ``negative_prompt``, by default the concept's ``erase_prompt``: "nudity"
for the nudity concept, the concept word itself, which is how erasure papers describe the negative prompt
of their nudity SD-NP row (we could not check every paper's exact string offline; give it if it differs),
and "star" in the toy world. Any text ("nudity, naked, nude") can be given instead.

Choices the papers leave open, and what duobench does:

- An item that already has a negative prompt keeps it: its negative becomes ``"<own>, <concept words>"``
  (one text, encoded once, truncated at 77 tokens like any prompt) rather than being replaced, so a prompt
  set's own negative prompts still act. An empty own negative prompt gives just the concept words.
- Every prompt form is defended (text, exact token ids, a replayed embedding such as Concept Inversion's):
  the negative prompt does not depend on how the prompt was given. SD-NP only acts through CFG, so at a
  CFG scale ≤ 1 it does nothing, as a negative prompt does nothing there in diffusers.
- ``strength`` (duobench's knob for every method, not part of SD-NP) interpolates each item's negative
  embedding between its own (strength 0: exactly the base model) and the concept one (strength 1),
  ``torch.lerp`` element-wise over the (77, D) embedding, which is exact at both ends.

Artifact: ``card.json`` only, holding the resolved negative prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import Conditioning, Generator, SamplingHook
from duobench.methods import MethodSpec, read_card, write_card


@dataclass(frozen=True)
class SDNPConfig:
    """``negative_prompt`` "" means the concept's ``erase_prompt``."""

    negative_prompt: str = ""

    def negative_text(self, concept: Concept) -> str:
        text = (self.negative_prompt or concept.erase_prompt).strip()
        if not text:
            raise DuobenchError(f"Concept {concept.name!r} has an empty erase_prompt; give SD-NP a negative_prompt.")
        return text


def joined_negative(own: str, concept_words: str) -> str:
    """The item's negative prompt with the concept words appended, or the words alone."""
    return f"{own}, {concept_words}" if own.strip() else concept_words


class NegativePrompt(SamplingHook):
    """Replaces every item's negative-prompt embedding by the one with the concept words (at ``strength``)."""

    name = "sd-np"

    def __init__(self, concept_words: str, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise DuobenchError(f"SD-NP strength must be in [0, 1], got {strength}.")
        self.concept_words = concept_words
        self.strength = float(strength)

    def condition(self, generator: Generator, conditioning: Conditioning) -> Conditioning:
        if self.strength == 0:
            return conditioning
        texts = [joined_negative(own, self.concept_words) for own in conditioning.negative_prompts]
        own = conditioning.negative_embeds
        concept = generator.encode_texts(texts).to(device=own.device, dtype=own.dtype)
        if self.strength == 1:
            conditioning.negative_embeds = concept
            conditioning.negative_prompts = texts
        else:  # an interpolated embedding is no text's encoding: negative_prompts keeps the items' own
            conditioning.negative_embeds = torch.lerp(own, concept, self.strength)
        return conditioning


def train(config: SDNPConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Nothing to train: the card records the negative prompt."""
    write_card(out_dir, "sd-np", config, concept, negative_prompt=config.negative_text(concept))


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> NegativePrompt:
    """The negative-prompt hook for the card's text; ``pipe`` is left as it is."""
    card = read_card(Path(artifact_dir))
    if card.get("method") != "sd-np" or "negative_prompt" not in card:
        raise DuobenchError(f"{artifact_dir} is not an SD-NP artifact (its card.json has no negative_prompt).")
    return NegativePrompt(card["negative_prompt"], strength)


SD_NP = MethodSpec(
    name="sd-np",
    config_cls=SDNPConfig,
    train=train,
    apply=apply,
    description="SD-NP: the concept's words as the negative prompt (training-free)",
    touches=("conditioning",),
)
