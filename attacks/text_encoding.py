"""The CLIP text-encoder calls the attacks share: batched encoding of exact 77-id prompts (tokenised by
`duobench.generator.tokenize_with`), and encoding with some token embeddings replaced by free vectors
(UnlearnDiffAtk's relaxed prefix, Concept Inversion's learned token).

transformers' `CLIPTextModel.forward` takes ids only, and the official attack repos patch or re-implement
the transformer to feed embeddings in (UnlearnDiffAtk's ``CustomTextEncoder``, MMA-Diffusion's patched
``modeling_clip.py``). We instead replace the output of the token-embedding layer with a forward hook, so the
model's own forward (positions, causal mask, final layer norm) runs unchanged in every transformers version.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def prompt_ids(tokenizer, text: str) -> list[int]:
    """The ids of ``text`` alone: no start/end token, no padding, not truncated."""
    return tokenizer(text, add_special_tokens=False).input_ids


def special_ids(tokenizer) -> tuple[int, int]:
    """(start-of-text id, end-of-text id); SD1 pads with the end-of-text id."""
    return int(tokenizer.bos_token_id), int(tokenizer.eos_token_id)


def assemble_ids(tokenizer, middle: Sequence[int]) -> list[int]:
    """``[start] + middle + [end]`` padded with the end id to 77 (``middle`` must fit in 75)."""
    start, end = special_ids(tokenizer)
    length = tokenizer.model_max_length
    if len(middle) > length - 2:
        raise ValueError(f"{len(middle)} prompt ids do not fit in {length} positions")
    return [start, *middle] + [end] * (length - 1 - len(middle))


def encode_ids(text_encoder, ids: torch.Tensor) -> torch.Tensor:
    """The last hidden state (batch, 77, D) for a batch of id rows, in one encoder pass."""
    return text_encoder(ids.to(text_encoder.device))[0]


def encode_with_token_embeddings(text_encoder, ids: torch.Tensor, token_embeddings: torch.Tensor) -> torch.Tensor:
    """Encode as if the token-embedding layer had returned ``token_embeddings`` (batch, 77, D) for ``ids``.

    Differentiable with respect to ``token_embeddings``. ``ids`` still decides nothing but the pooled output,
    which SD does not use.
    """
    layer = text_encoder.get_input_embeddings()
    replacement = token_embeddings.to(dtype=layer.weight.dtype, device=layer.weight.device)

    def replace_output(module, inputs, output):
        return replacement

    handle = layer.register_forward_hook(replace_output)
    try:
        return text_encoder(ids.to(text_encoder.device))[0]
    finally:
        handle.remove()
