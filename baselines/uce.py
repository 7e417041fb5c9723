"""UCE: Unified Concept Editing (Gandikota et al., WACV 2024), the paper-era erase edit, on diffusers.

Every cross-attention key and value projection W (``attn2.to_k``, ``attn2.to_v``; 32 matrices in SD1.4)
is replaced, independently, by the minimiser of

    s_e Σ_i ‖W c_i − W_old g_i‖² + s_p Σ_j ‖W p_j − W_old p_j‖² + λ ‖W − W_old‖²_F

    W = (λ W_old + s_e Σ_i v_i c_iᵀ + s_p Σ_j (W_old p_j) p_jᵀ)
        · (λ I + s_e Σ_i c_i c_iᵀ + s_p Σ_j p_j p_jᵀ)⁻¹

with v_i = W_old g_i ("replace": the erased tokens are mapped to what the guide tokens produced).

Token handling, as in the paper-era ``train-scripts/train_erase.py`` (the code behind the published
numbers, not the 2025 ``uce_sd_erase.py`` that keeps one vector per concept):

- erase keys c_i: the text-encoder outputs of the erase prompt from its *last word token* to the end of the
  sequence (the word, the end token and all padding); guide vectors g_i: the guide prompt's outputs from its
  own last word token, the two spans cut to equal length. The empty guide is the default (" ", "towards
  uncond"): it has no word, so its span starts at the start token.
- preserve keys p_j: all positions of each preserve prompt, and the empty prompt "" is always preserved.
- defaults: λ = 0.5 (hard-coded in the paper-era script), erase_scale 1, preserve_scale
  max(0.1, 1 / number of preserved prompts) (1.0 when only "" is preserved, as for the published nudity edit).

Where the concept file's fields go: each comma-separated part of ``erase_prompt`` is one erase concept (the
script's ``--concepts 'violence, nudity, harm'``); ``guide_prompt`` is one guide for all of them or a
comma-separated guide per concept; ``preserve_prompts`` are preserved in addition to "" unless the option
``preserve_concept_prompts`` is false, which gives the script's default for non-art concepts: "" alone, at
preserve_scale 1.0 (the published nudity edit; `duobench/concepts/nudity.yaml` defaults to it).

Deliberate differences from the official code: the solve runs in float64 with ``torch.linalg.solve``
instead of an fp32 ``torch.inverse`` (same minimiser, less rounding); the text embeddings are computed once
instead of once per edited matrix; the ``tensor`` technique and the prompt-template expansion
(``--add_prompts``, off by default in the script) are not offered.

Artifact: ``unet_delta.safetensors`` holding ``W_new − W_old`` of the 32 projections; ``strength`` s gives
``W_old + s · (W_new − W_old)``. The edit takes seconds, even on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from duobench.baselines.weight_delta import apply_weight_delta, save_weight_delta, weight_delta
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import MethodSpec, write_card

EMPTY_GUIDE = " "


@dataclass(frozen=True)
class UCEConfig:
    """The paper-era defaults; ``preserve_scale`` None means max(0.1, 1 / number of preserved prompts).

    ``preserve_concept_prompts`` False preserves "" alone, ignoring the concept's ``preserve_prompts``.
    """

    lamb: float = 0.5
    erase_scale: float = 1.0
    preserve_scale: float | None = None
    preserve_concept_prompts: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.preserve_concept_prompts, bool):
            raise ValueError(f"preserve_concept_prompts must be true or false, got {self.preserve_concept_prompts!r}")


def uce_closed_form(
    weight: torch.Tensor,
    erase_keys: torch.Tensor,
    erase_values: torch.Tensor,
    preserve_keys: torch.Tensor,
    lamb: float,
    erase_scale: float,
    preserve_scale: float,
) -> torch.Tensor:
    """The minimiser above for one matrix ``weight`` (out × in); keys are rows (n × in), values (n × out)."""
    original = weight.double()
    keys, values, preserve = erase_keys.double(), erase_values.double(), preserve_keys.double()
    preserved_values = preserve @ original.T
    numerator = lamb * original + erase_scale * values.T @ keys + preserve_scale * preserved_values.T @ preserve
    identity = torch.eye(original.shape[1], dtype=torch.float64, device=original.device)
    gram = lamb * identity + erase_scale * keys.T @ keys + preserve_scale * preserve.T @ preserve
    # W = numerator · gram⁻¹, and gram is symmetric: solve gram · Wᵀ = numeratorᵀ.
    return torch.linalg.solve(gram, numerator.T).T.to(weight.dtype)


def _encode_with_lengths(pipe, prompts: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Text-encoder outputs (n × L × D) and each prompt's index of its last word token."""
    tokens = pipe.tokenizer(
        prompts,
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    )
    last_word = [int(count) - 2 for count in tokens.attention_mask.sum(dim=1)]
    return encode_token_ids(pipe, tokens.input_ids).float(), last_word


def aligned_token_spans(pipe, erase: str, guide: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Erase keys and guide vectors, each from its prompt's last word token on, cut to equal length."""
    embeddings, (erase_last, guide_last) = _encode_with_lengths(pipe, [erase, guide or EMPTY_GUIDE])
    length = embeddings.shape[1] - max(erase_last, guide_last)
    return embeddings[0, erase_last : erase_last + length], embeddings[1, guide_last : guide_last + length]


def edit_concepts(concept: Concept, preserve_concept_prompts: bool = True) -> tuple[list[str], list[str], list[str]]:
    """(erase prompts, one guide per erase prompt, preserve prompts with "" first) from a concept file."""
    erase = [part.strip() for part in concept.erase_prompt.split(",") if part.strip()]
    if not erase:
        raise DuobenchError(f"Concept {concept.name!r} has an empty erase_prompt; UCE needs a concept to erase.")
    guides = [part.strip() for part in concept.guide_prompt.split(",")] if concept.guide_prompt else [""]
    if len(guides) == 1:
        guides = guides * len(erase)
    if len(guides) != len(erase):
        raise DuobenchError(
            f"Concept {concept.name!r}: guide_prompt has {len(guides)} comma-separated guides for "
            f"{len(erase)} erase concepts; give one guide for all, or one per concept."
        )
    return erase, guides, ["", *(concept.preserve_prompts if preserve_concept_prompts else ())]


def resolved_preserve_scale(config: UCEConfig, preserve: list[str]) -> float:
    """The configured preserve scale, or the script's default max(0.1, 1 / number of preserved prompts)."""
    return config.preserve_scale if config.preserve_scale is not None else max(0.1, 1 / len(preserve))


def cross_attention_projections(unet) -> dict[str, torch.nn.Linear]:
    """``{state-dict weight name: module}`` for every cross-attention ``to_k`` and ``to_v``."""
    from diffusers.models.attention_processor import Attention

    projections = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and module.is_cross_attention:
            projections[f"{name}.to_k.weight"] = module.to_k
            projections[f"{name}.to_v.weight"] = module.to_v
    if not projections:
        raise DuobenchError("This UNet has no cross-attention layers, so UCE has nothing to edit.")
    return projections


@torch.no_grad()
def edited_weights(config: UCEConfig, pipe, concept: Concept) -> dict[str, torch.Tensor]:
    """The new weight of every cross-attention key/value projection; ``pipe`` is not modified."""
    erase, guides, preserve = edit_concepts(concept, config.preserve_concept_prompts)
    spans = [aligned_token_spans(pipe, e, g) for e, g in zip(erase, guides, strict=True)]
    erase_keys = torch.cat([keys for keys, _ in spans])
    guide_vectors = torch.cat([guide for _, guide in spans])
    preserve_keys = encode_token_ids(pipe, tokenize(pipe, preserve)).float().flatten(0, 1)
    preserve_scale = resolved_preserve_scale(config, preserve)
    edited = {}
    for name, projection in cross_attention_projections(pipe.unet).items():
        weight = projection.weight.float()
        erase_values = guide_vectors.to(weight.device) @ weight.T
        edited[name] = uce_closed_form(
            weight,
            erase_keys.to(weight.device),
            erase_values,
            preserve_keys.to(weight.device),
            config.lamb,
            config.erase_scale,
            preserve_scale,
        )
    return edited


def train(config: UCEConfig, pipe, concept: Concept, out_dir: Path) -> None:
    erase, guides, preserve = edit_concepts(concept, config.preserve_concept_prompts)
    delta = weight_delta(pipe.unet.state_dict(), edited_weights(config, pipe, concept))
    save_weight_delta(delta, out_dir)
    write_card(
        out_dir,
        "uce",
        config,
        concept,
        erase_concepts=erase,
        guide_concepts=[g or EMPTY_GUIDE for g in guides],
        preserve_concepts=preserve,
        preserve_scale_used=resolved_preserve_scale(config, preserve),
        edited_matrices=len(delta),
    )


UCE = MethodSpec(
    name="uce",
    config_cls=UCEConfig,
    train=train,
    apply=apply_weight_delta,
    description="UCE: closed-form edit of cross-attention keys/values (paper-era token spans, lambda 0.5)",
)
