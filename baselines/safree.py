"""SAFREE: training-free, adaptive guard for safe text-to-image generation (Yoon et al., ICLR 2025, arXiv
2410.12761), as an inference-time edit on duobench's generator.

SAFREE changes no weight. It moves the prompt's *trigger tokens* out of a toxic-concept subspace of the text
encoder's embedding space, for the first denoising steps only. Reference: the official code,
jaehong31/SAFREE@b8b2c3f, ``models/modified_stable_diffusion_pipeline.py`` (the SD1.x pipeline) and
``generate_safree.py`` (the runs); read, not copied. With E(·) the text encoder, h ∈ R^{77×D} its last
hidden state for the prompt (what the UNet is conditioned on) and pool(·) its pooled output (the hidden
state at the end token after the final LayerNorm):

1. **Toxic-concept subspace.** C = [pool(k_1), …, pool(k_K)] ∈ R^{D×K} for the K concept phrases (for
   nudity the official 17, `NUDITY_PHRASES`), and its projector P_c = C (CᵀC)⁺ Cᵀ.
2. **Masked-prompt subspace.** For a prompt of n tokens, n copies with token i replaced by id 0 (CLIP's
   "!"), pooled: m_i = pool(prompt with token i masked), M = [m_1 … m_n] ∈ R^{D×n}, P_m = M (MᵀM)⁺ Mᵀ.
3. **Trigger tokens.** d_i = ‖(I − P_c) m_i‖, the distance of the masked-i prompt from the toxic subspace.
   Token i is a trigger when masking it moves the prompt *away* from the subspace by more than α over the
   others: d_i ≥ (1 + α) · mean_{j≠i} d_j, α = ``alpha`` = 0.01.
4. **Projection.** Each trigger token's embedding becomes h'_i = (I − P_c) P_m h_i: into the span of the
   masked prompts, then out of the toxic subspace. The start token, end token, padding and every other
   token keep their embeddings; the negative-prompt (unconditional) row is not touched.
5. **Self-validating filter (SVF).** β = 1 − mean_k cos((I − P_c) P_m h_k, h_k) over the active tokens
   (start token … end token), and t' = round(up_t · σ(2 k (10 β − t_0))) with up_t = 10, k = 2.5,
   t_0 = 5.333 (the official nudity constants; its artist runs use k = 3.5, t_0 = 5.5). Steps i ≤ t'
   (0-based, so t' + 1 of them) use the projected embedding, the rest the original. Without the SVF
   (``self_validation=false``) every step uses it (the official ``re_attn_t`` window's default, -1..1001).
6. **Latent re-attention (LRA)**, ``latent_reattention=fourier-low``. Every UNet call gains a third group
   of rows conditioned on the *original* prompt (its prediction is discarded). In the decoder's skip
   connections of the two deepest widths (1280 and 640 channels on SD1.x; here the widest and second
   widest decoder widths of any UNet) the prompt rows' feature maps are Fourier-transformed, and in the
   central 2×2 block of the shifted spectrum each coefficient is kept where the original rows' real part
   exceeds the prompt rows', and otherwise replaced by the constant s (s_1 = 0.9 at the widest width,
   s_2 = 0.2 at the second; the official ``freeu_hyp 1.0-1.0-0.9-0.2``, whose b_1 = b_2 = 1 scale nothing).
   This is the official ``SafeGuard_Low_Fourier_filter`` with ``safree='low'``. Note that it acts on every
   prompt and every step, benign ones included: where the two branches agree (no trigger token, or after
   step t') the coefficients are replaced by s.

What the published numbers used, and the defaults here. The official SD1.4 runs (``scripts/run_nudity.sh``:
``--safree -svf -lra``) differ from the method above in two ways:

- **Negative prompt.** They pass the 17 phrases joined by ", " as the classifier-free guidance negative
  prompt, so every published SAFREE number also includes SD negative prompting (SD-NP), which the paper
  does not mention. Here it is ``negative_prompt=official`` (the concept phrases joined by ", "); the default
  ``none`` keeps each item's own negative prompt, as the paper describes the method.
- **LRA does nothing there.** ``generate_safree.py`` registers the FreeU-style up-block hooks without their
  ``safree=`` argument, so each hook falls to ``else: NotImplementedError(...)``, an exception object that
  is built and never raised: the skip features pass unfiltered, and the third UNet row only costs compute.
  The published numbers are therefore ``latent_reattention=off`` (images equal up to batched float
  rounding). The default here, ``fourier-low``, is the filter the code is written to run. The code offers
  ``low``, ``high`` and ``all`` variants and never selects one; we run ``low`` and could not check it
  against the paper's equation offline. Nobody has published numbers with a working LRA. In the toy world
  it replaces every image, benign ones included, by a flat colour field (measured: DSR 1.00 with prior
  preservation 0.51 and toy CLIP score 7.6, against 0.04 / 1.00 / 98.5 for the base model), because the
  toy decoder's skip maps are 2×2 to 8×8, where the central 2×2 block of the spectrum is most or all of it;
  the toy concept therefore runs with ``latent_reattention=off``.

To reproduce the published protocol: ``negative_prompt=official latent_reattention=off`` (with the concept's
sampler: the official runs use DPM-Solver++, 50 steps, CFG 7.5, one image per prompt). The card of every
artifact records this under ``published_numbers_used``.

The toy world (``--model toy --concept star``, plain prompts, 25 × 4 images; DSR / prior preservation):
base model 0.04 / 1.00; the paper's method without LRA 0.05 / 1.00 (the trigger token "star" is found and
its embedding projected to nearly zero, but the toy UNet reads the star from the end token and padding,
which SAFREE leaves alone); with ``fourier-low`` 1.00 / 0.51 (flat colour fields, see above); the published
protocol (``negative_prompt=official latent_reattention=off``) 0.90 / 0.83, against SD-NP with the same
five phrases as its negative prompt 0.91 / 0.83: in the toy world all of SAFREE's published-protocol
effect is its negative prompt. The self-validating filter makes no difference there (0.90 / 0.83 without it).

Deviations from the official code (every one deliberate):

- **Batched.** The official pipeline forces batch size 1; here every item of a batch gets its own masked
  subspace, trigger tokens and t'. Items are independent.
- **Masked copies at 77 tokens.** The official code encodes the masked copies unpadded (``padding=
  "longest"``); here they are the item's 77 ids with one token set to 0. The text encoder is causal, so the
  pooled output at the end token is the same up to float rounding. Exact token-id prompts (an attack's) are
  handled the same way: n is the number of ids between the start token and the first end token.
- **Prompts over 75 tokens.** The official code truncates the unpadded ids to 77 *without* an end token,
  so the pooled output is read at the largest token id of the prompt; here the tokenizer's truncation keeps
  the end token at position 76 and pooling reads it there.
- **Edge cases kept as they are.** A one-token prompt has no other tokens to compare with: the mean over
  none is NaN, the test fails, and the token is projected, as in the official code. An empty prompt has no
  token to project and is left alone (the official code would fail on it).
- **The concept phrases for other concepts.** The official code has phrase lists for nudity and for two
  artists; for any other concept the default is the concept's ``erase_words`` and ``synonyms`` (else its
  ``erase_prompt``): for the toy star, "star, pentagram, pentacle, five-pointed star, five pointed star".
  ``subspace_phrases`` takes any comma-separated list.
- **Where it acts.** The projection is computed from the conditioning rows the generator hands the UNet
  (after every earlier conditioning edit of the chain) and swapped in by a UNet forward pre-hook, per call:
  the generator calls the UNet once per entry of ``scheduler.timesteps``, which is the official loop's i.
- ``project_end_tokens`` (default false; not SAFREE's, a duobench option): for an item with a trigger
  token, the end token and the padding after it (positions n+1..76) are projected too. SAFREE never touches
  them, yet the causal text encoder writes the whole prompt, trigger included, into them, and a UNet that
  reads the concept from there (the toy model does) is not defended by the token projection alone.
- **No CFG.** At CFG ≤ 1 the projection still applies to the prompt rows (the official code assumes CFG);
  LRA needs the guidance batch and is skipped.
- **LRA on any UNet.** The official filter is hard-wired to 1280/640 channels and to batch rows 0/1/2; here
  the widths are read from the UNet's decoder, and the rows are the prompt group and the appended original
  group of the batch. An LRA chain with SPM (whose hooks read the UNet batch) is not supported.
- ``strength`` (duobench's knob for every method, not SAFREE's): each trigger token's embedding is
  ``torch.lerp(h_i, h'_i, strength)``, the negative prompt is interpolated as in SD-NP, and the LRA-filtered
  skip features as lerp(unfiltered, filtered, strength); t' is computed from the full projection. At
  strength 0 no hook is installed and images are the base model's bit for bit; at 1, exactly the method.

Coverage. The trigger-token test needs the prompt's token ids, so text and exact-token-id prompts are
defended and a replayed embedding (Concept Inversion) is not: the run summary says so. With
``negative_prompt=official`` a replayed embedding still gets the negative prompt.

Artifact: ``card.json`` only (SAFREE trains nothing): the resolved concept phrases, negative prompt, LRA
settings, and what the published numbers used.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from duobench.baselines.sd_np import joined_negative
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import Conditioning, Generator, SamplingHook, tokenize_with
from duobench.methods import MethodSpec, read_card, write_card

NUDITY_PHRASES = (
    "Sexual Acts",
    "Content Meant to Arouse Sexual Excitement",
    "Nudity",
    "Pornography",
    "Erotic Art",
    "Lustful",
    "Seductive",
    "Orgasmic",
    "Libido",
    "Kinky",
    "Sexual Orientation",
    "Sexual Attraction",
    "Sexual Intercourse",
    "Sexual Pleasure",
    "Sexual Fantasy",
    "Carnal Desires",
    "Sexual Gratification",
)
"""The official nudity concept phrases (``negative_prompt_space`` in ``generate_safree.py``)."""

MASK_TOKEN_ID = 0
"""The id the official code masks a token with: 0, CLIP's "!" (not a padding token)."""

LRA_MODES = ("off", "fourier-low")

PUBLISHED_PROTOCOL = {
    "negative_prompt": "the concept phrases joined by ', ' (negative_prompt=official)",
    "latent_reattention": "registered without safree=, a no-op (latent_reattention=off)",
    "self_validation": True,
    "alpha": 0.01,
    "up_t": 10,
    "sampler": "DPM-Solver++ 50 steps, CFG 7.5, 1 image per prompt (SD1.4)",
    "source": "jaehong31/SAFREE@b8b2c3f scripts/run_nudity.sh, generate_safree.py",
}


@dataclass(frozen=True)
class SAFREEConfig:
    """The official hyper-parameters by default. ``subspace_phrases``: comma-separated, "" = the concept's
    default (`default_phrases`). ``negative_prompt``: ``none`` (the paper's method), ``official`` (the concept
    phrases joined by ", ", as the published runs) or any text. ``latent_reattention``: ``fourier-low``
    (the paper's method) or ``off`` (what the published runs did in effect)."""

    subspace_phrases: str = ""
    alpha: float = 0.01
    self_validation: bool = True
    project_end_tokens: bool = False
    up_t: int = 10
    svf_k: float = 2.5
    svf_midpoint: float = 5.333
    negative_prompt: str = "none"
    latent_reattention: str = "fourier-low"
    lra_s1: float = 0.9
    lra_s2: float = 0.2

    def __post_init__(self) -> None:
        if self.latent_reattention is False:  # YAML 1.1 reads a bare `off` as false
            object.__setattr__(self, "latent_reattention", "off")
        if self.negative_prompt is None:
            object.__setattr__(self, "negative_prompt", "none")
        if self.latent_reattention not in LRA_MODES:
            raise ValueError(
                f"latent_reattention must be one of {', '.join(LRA_MODES)}, got {self.latent_reattention!r}"
            )
        if self.up_t < 0:
            raise ValueError(f"up_t must be >= 0, got {self.up_t}")
        for name in ("self_validation", "project_end_tokens"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")

    def phrases(self, concept: Concept) -> list[str]:
        """The concept subspace's phrases, each once (a repeated phrase would make CᵀC exactly singular)."""
        if self.subspace_phrases.strip():
            return list(dict.fromkeys(p.strip() for p in self.subspace_phrases.split(",") if p.strip()))
        return default_phrases(concept)

    def negative_text(self, concept: Concept) -> str:
        """The negative text SAFREE adds, or "" for none (each item keeps its own negative prompt)."""
        choice = self.negative_prompt.strip()
        if choice.lower() in ("", "none"):
            return ""
        return ", ".join(self.phrases(concept)) if choice.lower() == "official" else choice


def default_phrases(concept: Concept) -> list[str]:
    """The official list for nudity; otherwise the concept's words to erase and their synonyms (the 17 nudity
    phrases are that: the concept's name and its paraphrases)."""
    if concept.name == "nudity":
        return list(NUDITY_PHRASES)
    words = [word.strip() for word in (*concept.erase_words, *concept.synonyms) if word.strip()]
    phrases = list(dict.fromkeys(words)) or [concept.erase_prompt.strip()]
    if not any(phrases):
        raise DuobenchError(
            f"Concept {concept.name!r} has no erase_words or erase_prompt; give SAFREE subspace_phrases."
        )
    return phrases


# --- the math, one function per step of the paper ---------------------------------------------------------


def projection_matrix(columns: torch.Tensor) -> torch.Tensor:
    """P = E (EᵀE)⁺ Eᵀ, the orthogonal projector onto the span of the columns of E (D × K).

    The pseudo-inverse keeps singular values down to 1e-15 of the largest, as the official
    ``torch.pinverse`` does: masked prompts are nearly collinear (EᵀE's condition number is ~1e5-1e6 on
    the toy model), and torch's default cut-off (machine epsilon × K) would drop real directions."""
    return columns @ torch.linalg.pinv(columns.T @ columns, rtol=1e-15) @ columns.T


def trigger_tokens(masked_pooled: torch.Tensor, concept_projector: torch.Tensor, alpha: float) -> torch.Tensor:
    """Step 3: which of the n tokens are triggers, from the pooled outputs of the n masked prompts (n × D).

    d_i = ‖(I − P_c) m_i‖; token i is kept iff d_i < (1 + α) · mean_{j≠i} d_j (NaN for n = 1: a trigger)."""
    eye = torch.eye(concept_projector.shape[0], dtype=concept_projector.dtype, device=concept_projector.device)
    distances = torch.linalg.vector_norm((eye - concept_projector) @ masked_pooled.T, dim=0)
    others = torch.stack([torch.cat((distances[:i], distances[i + 1 :])).mean() for i in range(len(distances))])
    return ~(distances < (1.0 + alpha) * others)


def orthogonal_projection(
    embeddings: torch.Tensor, masked_projector: torch.Tensor, concept_projector: torch.Tensor
) -> torch.Tensor:
    """Step 4's map on every row of (L × D) embeddings: h ↦ (I − P_c) P_m h."""
    eye = torch.eye(concept_projector.shape[0], dtype=concept_projector.dtype, device=concept_projector.device)
    return ((eye - concept_projector) @ masked_projector @ embeddings.T).T


def self_validation_beta(embeddings: torch.Tensor, projected: torch.Tensor, active: int) -> float:
    """Step 5's β = 1 − mean cosine between each active token's projection and itself."""
    cosine = torch.nn.functional.cosine_similarity(projected[:active], embeddings[:active], dim=-1)
    return 1.0 - cosine.mean().item()


def projected_step_count(beta: float, up_t: int, k: float = 2.5, midpoint: float = 5.333) -> int:
    """Step 5's t' = round(up_t · σ(2 k (10 β − t_0))): steps 0..t' use the projected embedding."""
    x = 2.0 * k * (10.0 * beta - midpoint)
    sigmoid = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
    return round(up_t * sigmoid)


def fourier_low_filter(prompt: torch.Tensor, original: torch.Tensor, scale: float, half_width: int = 1) -> torch.Tensor:
    """Step 6 on one skip feature map (B × C × H × W): in the central (2·half_width)² block of the shifted
    spectrum, keep the prompt rows' coefficient where the original rows' real part is larger, else s."""
    dtype = prompt.dtype
    spectrum = torch.fft.fftshift(torch.fft.fftn(prompt.float(), dim=(-2, -1)), dim=(-2, -1))
    reference = torch.fft.fftshift(torch.fft.fftn(original.float(), dim=(-2, -1)), dim=(-2, -1))
    row, col = spectrum.shape[-2] // 2, spectrum.shape[-1] // 2
    block = (..., slice(row - half_width, row + half_width), slice(col - half_width, col + half_width))
    low = spectrum[block]
    keep = (reference[block] - low).real > 0
    spectrum[block] = torch.where(keep, low, torch.full_like(low, scale))
    return torch.fft.ifftn(torch.fft.ifftshift(spectrum, dim=(-2, -1)), dim=(-2, -1)).real.to(dtype)


# --- the hook ---------------------------------------------------------------------------------------------


@dataclass
class ItemPlan:
    """One item's SAFREE decision: its projected prompt embedding (None: no trigger token) and t'."""

    projected: torch.Tensor | None
    last_projected_step: int
    triggers: list[int]


class SafreeGuard(SamplingHook):
    """Projects trigger tokens out of the concept subspace for steps 0..t' (and optionally LRA, a negative
    prompt)."""

    name = "safree"
    forms = ("text", "token_ids")

    def __init__(self, pipe, card: dict, strength: float = 1.0) -> None:
        if not 0.0 <= strength <= 1.0:
            raise DuobenchError(f"SAFREE strength must be in [0, 1], got {strength}.")
        config = card["config"]
        self.pipe = pipe
        self.phrases: list[str] = list(card["phrases"])
        self.negative_text: str = card["negative_prompt"]
        self.alpha = float(config["alpha"])
        self.self_validation = bool(config["self_validation"])
        self.project_end_tokens = bool(config.get("project_end_tokens", False))
        self.up_t = int(config["up_t"])
        self.svf_k, self.svf_midpoint = float(config["svf_k"]), float(config["svf_midpoint"])
        self.latent_reattention = config["latent_reattention"]
        self.lra_scales = (float(config["lra_s1"]), float(config["lra_s2"]))
        self.strength = float(strength)
        self._projectors: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    # step 1
    def concept_projector(self) -> torch.Tensor:
        """P_c in float32, once per text-encoder device and dtype (after every weight edit of the chain)."""
        encoder = self.pipe.text_encoder
        key = (str(encoder.device), encoder.dtype)
        if key not in self._projectors:
            pooled = self.pooled(tokenize_with(self.pipe.tokenizer, self.phrases))
            self._projectors[key] = projection_matrix(pooled.T)
        return self._projectors[key]

    @torch.no_grad()
    def pooled(self, token_ids: torch.Tensor) -> torch.Tensor:
        encoder = self.pipe.text_encoder
        return encoder(token_ids.to(encoder.device)).pooler_output.float()

    def prompt_length(self, ids: torch.Tensor) -> int:
        """n: the ids between the start token and the first end token (75 if there is none)."""
        ends = (ids[1:] == self.pipe.tokenizer.eos_token_id).nonzero()
        return int(ends[0]) if len(ends) else len(ids) - 2

    # steps 2-5 for one item
    def plan(self, ids: torch.Tensor | None, embedding: torch.Tensor) -> ItemPlan:
        n = self.prompt_length(ids) if ids is not None else 0
        if n == 0:  # a replayed embedding, or an empty prompt: nothing to project
            return ItemPlan(None, -1, [])
        concept_projector = self.concept_projector()
        masked = ids.repeat(n, 1)
        masked[torch.arange(n), torch.arange(1, n + 1)] = MASK_TOKEN_ID
        masked_pooled = self.pooled(masked)
        masked_projector = projection_matrix(masked_pooled.T)
        triggers = trigger_tokens(masked_pooled, concept_projector, self.alpha)
        original = embedding.float().to(concept_projector.device)
        full = orthogonal_projection(original, masked_projector, concept_projector)
        if self.self_validation:
            beta = self_validation_beta(original, full, n + 2)
            last_step = projected_step_count(beta, self.up_t, self.svf_k, self.svf_midpoint)
        else:
            last_step = 10**9
        trigger_positions = [i + 1 for i in range(n) if triggers[i]]
        if not trigger_positions:
            return ItemPlan(None, last_step, [])
        positions = trigger_positions
        if self.project_end_tokens:  # not SAFREE's: see the module docstring
            positions = trigger_positions + list(range(n + 1, len(ids)))
        projected = original.clone()
        projected[positions] = torch.lerp(original[positions], full[positions], self.strength)
        return ItemPlan(projected.to(device=embedding.device, dtype=embedding.dtype), last_step, trigger_positions)

    def condition(self, generator: Generator, conditioning: Conditioning) -> Conditioning:
        """The optional negative prompt (the published runs' SD-NP part), as SD-NP joins it."""
        if self.strength == 0 or not self.negative_text:
            return conditioning
        texts = [joined_negative(own, self.negative_text) for own in conditioning.negative_prompts]
        own = conditioning.negative_embeds
        concept = generator.encode_texts(texts).to(device=own.device, dtype=own.dtype)
        if self.strength == 1:
            conditioning.negative_embeds, conditioning.negative_prompts = concept, texts
        else:
            conditioning.negative_embeds = torch.lerp(own, concept, self.strength)
        return conditioning

    @contextlib.contextmanager
    def unet_call(self, rows: torch.Tensor, conditioning: Conditioning) -> Iterator[None]:
        if self.strength == 0:
            yield
            return
        batch = len(conditioning.items)
        start = batch if rows.shape[0] > batch else 0  # the prompt rows: after the negatives under CFG
        originals = rows[start : start + batch]
        plans = [self.plan(conditioning.token_ids[b], originals[b]) for b in range(batch)]
        lra = self.latent_reattention != "off" and start > 0
        if not lra and all(plan.projected is None for plan in plans):
            yield
            return
        unet = self.pipe.unet
        state = {"step": 0, "rows": rows.shape[0]}

        def swap_rows(module, args, kwargs):
            hidden = kwargs["encoder_hidden_states"]
            step = state["step"]
            swapped = hidden
            for b, plan in enumerate(plans):
                if plan.projected is not None and step <= plan.last_projected_step:
                    if swapped is hidden:
                        swapped = hidden.clone()
                    swapped[start + b] = plan.projected
            if lra:  # a third group of rows on the original prompt, dropped after the call
                swapped = torch.cat([swapped, originals.to(swapped.dtype)])
                if args:
                    args = (torch.cat([args[0], args[0][start : start + batch]]), *args[1:])
                else:
                    kwargs = {
                        **kwargs,
                        "sample": torch.cat([kwargs["sample"], kwargs["sample"][start : start + batch]]),
                    }
            kwargs = {**kwargs, "encoder_hidden_states": swapped}
            return args, kwargs

        def count_and_trim(module, args, kwargs, output):
            state["step"] += 1
            if not lra:
                return output
            if isinstance(output, tuple):
                return (output[0][: state["rows"]], *output[1:])
            output.sample = output.sample[: state["rows"]]
            return output

        handles = [
            unet.register_forward_pre_hook(swap_rows, with_kwargs=True),
            unet.register_forward_hook(count_and_trim, with_kwargs=True),
        ]
        if lra:
            handles += self._register_reattention(unet, start, batch)
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _register_reattention(self, unet, start: int, batch: int) -> list:
        """Step 6: filter the prompt rows' skip features in the decoder blocks of the two widest widths."""
        widths = sorted(set(unet.config.block_out_channels), reverse=True)
        scales = dict(zip(widths[:2], self.lra_scales, strict=False))
        strength = self.strength

        def filter_skips(block, args, kwargs):
            hidden = kwargs["hidden_states"]
            skips = list(kwargs["res_hidden_states_tuple"])
            for j in range(len(block.resnets)):  # iteration j pops skips[-1 - j] beside hidden of this width
                width = hidden.shape[1] if j == 0 else block.resnets[j - 1].out_channels
                if width not in scales:
                    continue
                skip = skips[-1 - j]
                prompt_rows, original_rows = skip[start : start + batch], skip[-batch:]
                filtered = fourier_low_filter(prompt_rows, original_rows, scales[width])
                if strength != 1:
                    filtered = torch.lerp(prompt_rows, filtered, strength)
                skip = skip.clone()
                skip[start : start + batch] = filtered
                skips[-1 - j] = skip
            return args, {**kwargs, "res_hidden_states_tuple": tuple(skips)}

        return [block.register_forward_pre_hook(filter_skips, with_kwargs=True) for block in unet.up_blocks]


def train(config: SAFREEConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Nothing to train: the card records the resolved phrases, negative prompt and settings."""
    write_card(
        out_dir,
        "safree",
        config,
        concept,
        phrases=config.phrases(concept),
        negative_prompt=config.negative_text(concept),
        published_numbers_used=PUBLISHED_PROTOCOL,
    )


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> SafreeGuard:
    """The SAFREE hook for the card's configuration; ``pipe``'s weights are left as they are."""
    card = read_card(Path(artifact_dir))
    if card.get("method") != "safree" or "phrases" not in card:
        raise DuobenchError(f"{artifact_dir} is not a SAFREE artifact (its card.json has no concept phrases).")
    return SafreeGuard(pipe, card, strength)


SAFREE = MethodSpec(
    name="safree",
    config_cls=SAFREEConfig,
    train=train,
    apply=apply,
    description="SAFREE: trigger tokens projected out of the concept subspace for the first steps (training-free)",
    touches=("conditioning",),
)
