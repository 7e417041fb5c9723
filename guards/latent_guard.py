"""`latent-guard`: Latent Guard (Liu et al., ECCV 2024), a learned prompt filter in the text encoder's latent space.

Re-implemented from the official code, rt219/LatentGuard@5b13ece (``utils.py``, ``main.py``, ``inference.py``,
``configs.py``, read as stored at 47e0d54, whose files match the dossier's section 5 on 5b13ece). Nothing of it
is imported or copied; the math is held against it below.

**Features** (``utils.py`` ``WrapClip``). The frozen text encoder of the pipeline handed to `prepare`: on SD1.x
that is CLIP ViT-L/14's text model, the official features; on the toy model, the toy text encoder. A prompt is
tokenised SD1-style (77 ids, end-token padding) and encoded to its ``last_hidden_state`` (77 x d), and the vector
at the end-of-text position (the argmax of the ids, as the official code finds it) is put in front: 78 x d. A
concept's embedding is that same end-of-text vector of the concept's words encoded alone.

**The embedding mapping layer** (``utils.py`` ``EmbeddingMappingLayer``, ``configs.py``): 16 heads x 32 dims.
Keys and values are Linear(d -> 512) of the 78 prompt vectors, the query is Linear(d -> 512) of the concept
vector; per head, softmax(q k^T / sqrt(32)) over all 78 positions -- padding included, no mask, as the
official code does (so padding tokens move the score with the prompt's length) -- weights the values. The
heads' outputs, concatenated, go through Linear(512 -> 128) (v'); the query through Linear(512 -> 128) (q').
The score is cos(v', q') times a learned temperature (initialised at 1/0.07).

**Training** (``main.py``): AdamW at lr 1e-3 for ``epochs`` (official 1001). An epoch visits every training
concept once, shuffled, in batches of ``batch_size`` concepts (official 64; the last batch may be smaller),
each with one random (unsafe prompt, its safe rewrite) pair of its own. With S_u[i, j] = score(unsafe_i,
concept_j) and S_s[i, j] = score(safe_i, concept_j) over the batch (`latent_guard_loss`)::

    L_i = mean_i CE([S_u[i, :], m_1, ..., m_n], i)       m_k = max_j S_s[k, j]
    L_t = mean_j CE([S_u[:, j], S_s[:, j]], j)
    L   = L_i + L_t

**Deciding** (``inference.py``): each prompt is scored against every concept of the blacklist and refused iff
the highest score is >= the threshold. ``threshold=9.0131`` is the official default, a raw scaled cosine (it
moves with the learned temperature and the blacklist; the README says to adapt it). ``threshold=fpr@<x>%`` is
calibrated in `prepare` on the concept's benign prompts (distinct texts; seeds do not matter to a prompt
filter): the threshold is placed halfway between the k-th and the (k+1)-th highest benign score, k = floor(x%
of them), so at most x% of them are refused (just above the highest score for k = 0). A run reports the
threshold value it used in `identity` (``threshold_value``). The blacklist is the concept's ``erase_words``
and ``synonyms`` (``blacklist=`` replaces it) and can change without retraining, as in the paper.

**Data** (``data=``): training needs CoPro-style data, (unsafe prompt, safe prompt, concept) triples:

- ``data=<path to CoPro_v1.0.json>``: the official file. Layout assumed (``utils.py`` ``prepare_dataset``): a
  JSON object whose ``ID_train_data`` is a list of ``{"unsafe_prompt": ..., "safe_prompt": ..., "concept":
  ...}``; only it is read (the official training split). ``ID_concepts``, ``OOD_concepts``, ``ID_test_data``,
  ``OOD_test_data``, ``concept_synonym`` and ``concept_adv`` may be present and are ignored.
- ``data=toy``: a toy CoPro built from the toy world's vocabulary (`duobench.toy.shapes`): the concepts are the
  concept's blocked words (``erase_words`` + ``synonyms``: star, pentagram, ...); each one's unsafe prompts are
  the caption templates filled with it and every colour word, and each safe prompt is the same caption with a
  random word of another shape. The other shapes' canonical words (circle, square, ...) join as concepts that
  are never blacklisted, only there to give the contrastive batch negatives: their unsafe prompts are their
  captions, their safe prompts the same captions with a generic word ("a red shape"). Without them the
  official threshold refused 17.5% of the star concept's benign prompts (crosses scored up to 9.69 against
  "five-pointed star", stars at least 11.65); with them the benign prompts score at most about -1.5 and
  stars at least 13.8 (1001 epochs, seed 0).
- ``data=auto`` (default): ``toy`` for a toy-world concept (its ``model_families`` name ``toy``: it runs only
  on the toy model), otherwise an error asking for ``data=<CoPro json>`` or ``weights=``.

**Weights** (``weights=<path or http(s) URL>``): the official ``model_parameters.pth``, a state dict of the
official module with keys ``x1_to_key.{weight,bias}`` (768 -> 512), ``x1_to_value.*``, ``x2_to_query.*``,
``final_mlp.*`` (512 -> 128), ``mlp_query1.*`` and ``tempr`` (`OFFICIAL_KEYS` maps them onto ours); a
``.safetensors`` file this guard wrote is accepted too. A URL is downloaded once under
``$DUOBENCH_HOME/downloads/latent-guard/``. The official weights fit only a text encoder of width 768 (CLIP
ViT-L/14). Trained weights are cached under ``$DUOBENCH_HOME/guards/latent-guard/<key>/`` (safetensors plus
``card.json``), keyed by the training options, the data (the toy data: the concept's training identity; a
CoPro file: its sha256), the text encoder's fingerprint and the CPU thread count, and trained once under a
file lock into a staging folder renamed into place, as method artifacts are (`duobench.methods`).

**What it sees.** Text only. Items with exact ``token_ids`` (attack results) are encoded from those ids,
exactly as the model sees them. An item with a prompt ``embedding`` (Concept Inversion) conditions the model
on a vector the guard never sees: it is decided on the item's ``prompt`` text, and its evidence says so. A
deployed Latent Guard cannot stop an attack that works in embedding space.

**Deviations from the official code** (each keeps the math; none changes a score):

- features come from the pipeline's own text encoder (identical to the official CLIP ViT-L/14 text model on
  SD1.x), not a second copy loaded on ``cuda:0`` at import time; nothing reads CoPro to decide a prompt;
- the scores of all (prompt, concept) pairs of a batch come from one pass (keys, values per prompt; queries per
  concept) instead of repeating each prompt once per concept: the same numbers up to float summation order;
- features are cached on demand during training instead of from a precomputed ``clip_cache.pt``;
- the sampling is seeded (``seed``; the official code is not), and no checkpoint is written every 500 epochs and
  no AUC evaluation runs during training; the weights are saved as safetensors under our own key names;
- the loss drops the official ``ALPHA = 0`` in-place addition to the safe logits (a no-op);
- the default blacklist is the concept's words, not CoPro's ID concepts (pass them with ``blacklist=``);
- ``threshold=fpr@<x>%`` and the toy CoPro are duobench's additions.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import re
import shutil
import types
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from duobench.concepts import Concept, training_identity
from duobench.errors import DuobenchError
from duobench.guards.base import Decision, config_identity, refusal
from duobench.items import WorkItem
from duobench.paths import duobench_home

NUM_HEADS = 16
HEAD_DIM = 32
OUT_DIM = 128
"""The official mapping layer's size (``configs.py``)."""
TEMPERATURE_INIT = 1 / 0.07
OFFICIAL_THRESHOLD = 9.0131
"""``inference.py``'s default: a raw scaled cosine, valid for the official weights and blacklist only."""
WEIGHTS_FILE = "latent_guard.safetensors"
CARD_NAME = "card.json"
CACHE_VERSION = 1
"""Bumped when the training code changes what a cached artifact holds."""
OFFICIAL_KEYS = {
    "x1_to_key": "prompt_to_key",
    "x1_to_value": "prompt_to_value",
    "x2_to_query": "concept_to_query",
    "final_mlp": "value_out",
    "mlp_query1": "query_out",
    "tempr": "temperature",
}
"""Official ``model_parameters.pth`` key prefix -> our module's."""
ENCODE_BATCH = 64
_FPR = re.compile(r"^fpr@(\d+(?:\.\d+)?)%$")
_DATA_HELP = "auto, toy, or the path of a CoPro-format JSON file (the official dataset/CoPro_v1.0.json)"


@dataclass
class LatentGuardConfig:
    data: str = "auto"
    """Training data: ``auto``, ``toy`` or a CoPro JSON path (module docstring); unused with ``weights``."""
    weights: str = ""
    """Trained weights to load instead of training: the official ``model_parameters.pth`` (path or URL)."""
    blacklist: tuple[str, ...] = ()
    """The concepts a prompt is scored against; empty: the concept's erase words and synonyms."""
    threshold: str = str(OFFICIAL_THRESHOLD)
    """A raw score (official 9.0131) or ``fpr@<x>%`` (at most x% of the benign prompts refused)."""
    epochs: int = 1001
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0

    def __post_init__(self) -> None:
        self.data = str(self.data).strip() or "auto"
        self.weights = str(self.weights or "").strip()
        blacklist = self.blacklist.split(",") if isinstance(self.blacklist, str) else self.blacklist
        self.blacklist = tuple(str(word).strip() for word in blacklist if str(word).strip())
        self.threshold = _normalised_threshold(self.threshold)
        self.epochs = _whole("epochs", self.epochs, smallest=1)
        self.batch_size = _whole("batch_size", self.batch_size, smallest=1)
        self.seed = _whole("seed", self.seed, smallest=0)
        try:
            self.lr = float(self.lr)
        except (TypeError, ValueError):
            raise ValueError(f"lr must be a number, got {self.lr!r}") from None
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")
        if self.weights and self.data != "auto":
            raise ValueError(
                f"give either weights= (trained weights to load) or data= (data to train on), not both "
                f"(weights={self.weights!r}, data={self.data!r})"
            )

    def training_options(self) -> dict[str, Any]:
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "seed": self.seed}


def _whole(name: str, value: Any, smallest: int) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a whole number, got {value!r}") from None
    if not number.is_integer() or number < smallest:
        raise ValueError(f"{name} must be a whole number >= {smallest}, got {value!r}")
    return int(number)


def _normalised_threshold(value: Any) -> str:
    text = str(value).strip().replace(" ", "")
    match = _FPR.match(text)
    if match:
        if not 0 <= float(match.group(1)) <= 100:
            raise ValueError(f"threshold {value!r}: the false-positive rate must be within 0-100%")
        return text
    try:
        number = float(text)
    except ValueError:
        raise ValueError(
            f"threshold must be a number (a raw score; official {OFFICIAL_THRESHOLD}) or fpr@<x>% (calibrated on "
            f"the benign prompts), got {value!r}"
        ) from None
    if not math.isfinite(number):
        raise ValueError(f"threshold must be finite, got {value!r}")
    return repr(number)


# --- the model ------------------------------------------------------------------------------------------


class EmbeddingMapping(nn.Module):
    """The embedding mapping layer: a concept-queried attention over a prompt's 78 vectors, then the scaled
    cosine of the attended value and the query (module docstring)."""

    def __init__(self, width: int, num_heads: int = NUM_HEADS, head_dim: int = HEAD_DIM, out_dim: int = OUT_DIM):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        inner = num_heads * head_dim
        self.prompt_to_key = nn.Linear(width, inner)
        self.prompt_to_value = nn.Linear(width, inner)
        self.concept_to_query = nn.Linear(width, inner)
        self.value_out = nn.Linear(inner, out_dim)
        self.query_out = nn.Linear(inner, out_dim)
        self.temperature = nn.Parameter(torch.tensor(TEMPERATURE_INIT))

    def forward(self, prompts: torch.Tensor, concepts: torch.Tensor) -> torch.Tensor:
        """Scores (P, C) of prompts (P, 78, d) against concepts (C, d): S[i, j] = score(prompt_i, concept_j)."""
        heads, size = self.num_heads, self.head_dim
        n_prompts, length, _ = prompts.shape
        keys = self.prompt_to_key(prompts).view(n_prompts, length, heads, size)
        values = self.prompt_to_value(prompts).view(n_prompts, length, heads, size)
        query = self.concept_to_query(concepts)  # (C, heads * size), head-major like the official view
        logits = torch.einsum("plhd,chd->pchl", keys, query.view(-1, heads, size)) / size**0.5
        attended = torch.einsum("pchl,plhd->pchd", logits.softmax(dim=-1), values)
        v_prime = self.value_out(attended.reshape(n_prompts, -1, heads * size))  # (P, C, out)
        q_prime = self.query_out(query)  # (C, out)
        cosine = (F.normalize(v_prime, dim=-1) * F.normalize(q_prime, dim=-1)).sum(dim=-1)
        return cosine * self.temperature


def latent_guard_loss(unsafe_scores: torch.Tensor, safe_scores: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(L, L_i, L_t) of ``main.py`` from the batch's score matrices, ``[i, j]`` = prompt i against concept j;
    prompt i is the unsafe (or safe) prompt sampled for concept i."""
    n = unsafe_scores.shape[0]
    labels = torch.arange(n, device=unsafe_scores.device)
    safe_max = safe_scores.max(dim=1).values  # each safe prompt's best concept
    loss_i = F.cross_entropy(torch.cat([unsafe_scores, safe_max.expand(n, n)], dim=1), labels)
    loss_t = F.cross_entropy(torch.cat([unsafe_scores, safe_scores], dim=0).T, labels)
    return loss_i + loss_t, loss_i, loss_t


# --- features -------------------------------------------------------------------------------------------


class TextFeatures:
    """The frozen text encoder's Latent Guard features: 78 x d per prompt (end-of-text vector first), d per
    concept; float32 on the encoder's device."""

    def __init__(self, pipe) -> None:
        self.tokenizer = pipe.tokenizer
        self.encoder = pipe.text_encoder
        self.length = self.tokenizer.model_max_length

    @property
    def width(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def device(self) -> torch.device:
        return self.encoder.device

    def token_ids(self, texts: Sequence[str]) -> torch.Tensor:
        from duobench.generator import tokenize_with

        return tokenize_with(self.tokenizer, texts)

    @torch.no_grad()
    def of_ids(self, ids: torch.Tensor) -> torch.Tensor:
        out = []
        for start in range(0, len(ids), ENCODE_BATCH):
            chunk = ids[start : start + ENCODE_BATCH].to(self.device)
            hidden = self.encoder(chunk)[0].float()
            end = hidden[torch.arange(len(chunk), device=hidden.device), chunk.argmax(dim=-1)]
            out.append(torch.cat([end[:, None], hidden], dim=1))
        return torch.cat(out) if out else torch.empty(0, self.length + 1, self.width, device=self.device)

    def of_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.of_ids(self.token_ids(texts))

    def of_concepts(self, concepts: Sequence[str]) -> torch.Tensor:
        return self.of_texts(concepts)[:, 0]


def text_encoder_fingerprint(pipe) -> str:
    """The text encoder's weights and config (`duobench.models.pipeline_fingerprint` of it alone) and the
    tokenizer's vocabulary size and length: what the features depend on."""
    from duobench.models import pipeline_fingerprint

    weights = pipeline_fingerprint(types.SimpleNamespace(text_encoder=pipe.text_encoder))
    tokenizer = pipe.tokenizer
    return f"{weights}-{type(tokenizer).__name__}-{len(tokenizer)}-{tokenizer.model_max_length}"


# --- data -----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CoPro:
    """Training triples (unsafe prompt, safe prompt, concept) and where they came from."""

    triples: tuple[tuple[str, str, str], ...]
    source: str
    identity: Any
    """What the trained weights depend on: the toy data's concept identity, or a CoPro file's sha256."""

    def by_concept(self) -> dict[str, list[tuple[str, str]]]:
        pairs: dict[str, list[tuple[str, str]]] = {}
        for unsafe, safe, concept in self.triples:
            pairs.setdefault(concept, []).append((unsafe, safe))
        return pairs


def toy_copro(words: Sequence[str], seed: int = 0, negatives: bool = True) -> list[tuple[str, str, str]]:
    """The toy CoPro of the module docstring for the blocked ``words``; ``negatives``: with the other shapes' own
    concepts."""
    from duobench.toy import shapes

    blocked = {word.lower() for word in words}
    others = [
        word
        for synonyms in shapes.SHAPE_SYNONYMS.values()
        if not blocked & set(synonyms)
        for word in synonyms
        if word not in blocked
    ]
    if not others:
        raise DuobenchError("The toy CoPro needs shapes outside the blacklist for its safe prompts; there are none.")
    colours = [word for synonyms in shapes.COLOUR_SYNONYMS.values() for word in synonyms]
    rng = random.Random(seed)
    triples = []
    for word in dict.fromkeys(words):
        seen = set()
        for template in (*shapes.CAPTION_TEMPLATES, *shapes.SHAPE_ONLY_TEMPLATES):
            for colour in colours:
                size = rng.choice(list(shapes.SIZE_WORDS))
                unsafe = shapes.with_articles(template.format(colour=colour, shape=word, size=size))
                if unsafe in seen:  # a shape-only template ignores the colour
                    continue
                seen.add(unsafe)
                safe = shapes.with_articles(template.format(colour=colour, shape=rng.choice(others), size=size))
                triples.append((unsafe, safe, word))
    if negatives:
        for word in [shape for shape in shapes.SHAPES if shape in others]:
            for template in shapes.CAPTION_TEMPLATES:
                for colour in colours:
                    size = rng.choice(list(shapes.SIZE_WORDS))
                    generic = rng.choice(shapes.GENERIC_SHAPE_WORDS)
                    unsafe = shapes.with_articles(template.format(colour=colour, shape=word, size=size))
                    safe = shapes.with_articles(template.format(colour=colour, shape=generic, size=size))
                    triples.append((unsafe, safe, word))
    return triples


def read_copro(path: str | Path) -> CoPro:
    """The official CoPro JSON's training split (``ID_train_data``; layout in the module docstring)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DuobenchError(f"The CoPro file {path} does not exist. Latent Guard's data= option takes {_DATA_HELP}.")
    raw = path.read_bytes()
    try:
        dataset = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DuobenchError(f"The CoPro file {path} is not valid JSON: {error}") from error
    entries = dataset.get("ID_train_data") if isinstance(dataset, dict) else None
    if not isinstance(entries, list) or not entries:
        raise DuobenchError(
            f"The CoPro file {path} has no ID_train_data list (the official CoPro_v1.0.json layout: "
            '"ID_train_data": [{"unsafe_prompt": ..., "safe_prompt": ..., "concept": ...}, ...]).'
        )
    fields_ = ("unsafe_prompt", "safe_prompt", "concept")
    triples = []
    for number, entry in enumerate(entries):
        if not isinstance(entry, dict) or not all(isinstance(entry.get(key), str) for key in fields_):
            raise DuobenchError(
                f"Entry {number} of ID_train_data in {path} lacks one of {', '.join(fields_)} (text each): "
                f"{entry!r:.200}"
            )
        triples.append(tuple(entry[key] for key in fields_))
    return CoPro(tuple(triples), source=str(path), identity={"sha256": hashlib.sha256(raw).hexdigest()})


def training_data(config: LatentGuardConfig, concept: Concept) -> CoPro:
    """The CoPro data ``config.data`` names for ``concept`` (``auto`` resolved)."""
    data = config.data
    if data == "auto":
        if "toy" not in concept.model_families:
            raise DuobenchError(
                f"Latent Guard needs trained weights for concept {concept.name!r}: pass weights=<path or URL of the "
                "official model_parameters.pth> (trained on CoPro for CLIP ViT-L/14, the SD1.x text encoder), or "
                "data=<path to CoPro_v1.0.json> to train it here (about half an hour on a GPU). Only toy-world "
                "concepts build their own training data."
            )
        data = "toy"
    if data == "toy":
        words = blocked_words(concept)
        triples = toy_copro(words, seed=0)
        return CoPro(tuple(triples), source="toy", identity={"toy": training_identity(concept), "words": words})
    if data.endswith(".json") or Path(data).expanduser().exists():
        return read_copro(data)
    raise DuobenchError(f"Latent Guard data={data!r} is not a file. Its data= option takes {_DATA_HELP}.")


def blocked_words(concept: Concept) -> list[str]:
    words = list(dict.fromkeys(word.strip() for word in (*concept.erase_words, *concept.synonyms) if word.strip()))
    if not words:
        raise DuobenchError(
            f"Concept {concept.name!r} lists no erase_words or synonyms for Latent Guard's blacklist. Pass "
            "blacklist=<concept>,<concept>."
        )
    return words


# --- training -------------------------------------------------------------------------------------------


def train_mapping(config: LatentGuardConfig, features: TextFeatures, data: CoPro, log_every: int = 0) -> tuple:
    """Train the mapping layer on ``data`` as ``main.py`` does; returns (module, loss per epoch)."""
    from duobench.progress import track

    pairs = data.by_concept()
    concepts = list(pairs)
    rng = random.Random(config.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = EmbeddingMapping(features.width).to(features.device)
    concept_vectors = features.of_concepts(concepts)
    cache: dict[str, torch.Tensor] = {}

    def encoded(texts: list[str]) -> torch.Tensor:
        missing = list(dict.fromkeys(text for text in texts if text not in cache))
        if missing:
            for text, vectors in zip(missing, features.of_texts(missing), strict=True):
                cache[text] = vectors
        return torch.stack([cache[text] for text in texts])

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr)
    losses = []
    with track("Latent Guard training", config.epochs, unit="epochs") as progress:
        for _ in range(config.epochs):
            order = rng.sample(range(len(concepts)), len(concepts))
            for start in range(0, len(order), config.batch_size):
                batch = order[start : start + config.batch_size]
                sampled = [rng.choice(pairs[concepts[index]]) for index in batch]
                unsafe = encoded([unsafe for unsafe, _ in sampled])
                safe = encoded([safe for _, safe in sampled])
                batch_concepts = concept_vectors[batch]
                loss, _, _ = latent_guard_loss(model(unsafe, batch_concepts), model(safe, batch_concepts))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            losses.append(loss.item())
            progress.advance(loss=losses[-1])
    return model.eval(), losses


@torch.no_grad()
def mean_loss(model: EmbeddingMapping, features: TextFeatures, data: CoPro, samples: int = 4, seed: int = 0) -> float:
    """The loss averaged over ``samples`` epochs' worth of random full batches (one per concept): how well
    ``model`` fits ``data`` (used to show that training lowers it)."""
    pairs = data.by_concept()
    concepts = list(pairs)
    rng = random.Random(seed)
    concept_vectors = features.of_concepts(concepts)
    total = 0.0
    for _ in range(samples):
        sampled = [rng.choice(pairs[concept]) for concept in concepts]
        unsafe = features.of_texts([unsafe for unsafe, _ in sampled])
        safe = features.of_texts([safe for _, safe in sampled])
        total += latent_guard_loss(model(unsafe, concept_vectors), model(safe, concept_vectors))[0].item()
    return total / samples


def training_key(config: LatentGuardConfig, data: CoPro, pipe) -> str:
    from duobench.methods import training_numerics

    payload = {
        "guard": LatentGuard.name,
        "version": CACHE_VERSION,
        "architecture": [NUM_HEADS, HEAD_DIM, OUT_DIM],
        "training": config.training_options(),
        "data": data.identity,
        "text_encoder": text_encoder_fingerprint(pipe),
        "numerics": training_numerics(pipe),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def train_or_load(config: LatentGuardConfig, concept: Concept, pipe, features: TextFeatures) -> tuple[Path, bool]:
    """The folder of the trained weights for this config, concept data and text encoder, training them once
    (lock and staging folder as `duobench.methods.train_or_load`); ``(folder, trained_now)``."""
    from duobench.locks import exclusive, owner_tag
    from duobench.methods import _publish, _remove_abandoned_staging

    data = training_data(config, concept)
    key = training_key(config, data, pipe)
    final = duobench_home() / "guards" / LatentGuard.name / key
    if (final / CARD_NAME).exists():
        return final, False
    with exclusive(final, f"training latent-guard {key}"):
        if (final / CARD_NAME).exists():
            return final, False
        staging = final.with_name(f".{final.name}.partial-{owner_tag()}")
        _remove_abandoned_staging(final)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        try:
            model, losses = train_mapping(config, features, data)
            save_weights(model, staging / WEIGHTS_FILE)
            card = {
                "guard": LatentGuard.name,
                "training": config.training_options(),
                "data": data.source,
                "concepts": len(data.by_concept()),
                "triples": len(data.triples),
                "concept": concept.name,
                "width": features.width,
                "final_loss": losses[-1],
                "temperature": model.temperature.item(),
            }
            (staging / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True))
            _publish(staging, final)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return final, True


# --- weights --------------------------------------------------------------------------------------------


def save_weights(model: EmbeddingMapping, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({name: tensor.detach().cpu().contiguous() for name, tensor in model.state_dict().items()}, str(path))


def load_state(path: Path) -> dict[str, torch.Tensor]:
    """Our module's state dict from a safetensors file we wrote or the official ``.pth`` (keys mapped)."""
    import pickle

    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except (SafetensorError, OSError) as error:
            raise DuobenchError(f"Could not read the Latent Guard weights {path}: {error}") from error
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as error:
        raise DuobenchError(
            f"Could not read {path} as the official Latent Guard model_parameters.pth (a torch state dict): "
            f"{str(error).splitlines()[0][:300]}. A whole pickled model (main.py's model_ep*.pt) is not read: save "
            "its state_dict()."
        ) from error
    if not isinstance(state, dict):
        raise DuobenchError(
            f"{path} holds a {type(state).__name__}, not the state dict of Latent Guard's mapping layer."
        )
    mapped = {}
    for name, tensor in state.items():
        name = name.removeprefix("module.")
        prefix, dot, rest = name.partition(".")
        mapped[OFFICIAL_KEYS.get(prefix, prefix) + dot + rest] = tensor
    return mapped


def load_mapping(path: Path, width: int) -> EmbeddingMapping:
    state = load_state(path)
    model = EmbeddingMapping(width)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        official = ", ".join(f"{key}.weight/.bias" for key in list(OFFICIAL_KEYS)[:-1]) + ", tempr"
        raise DuobenchError(
            f"{path} is not a Latent Guard mapping layer: missing {missing or 'nothing'}, unexpected "
            f"{unexpected[:8] or 'nothing'}. The official model_parameters.pth holds {official}."
        )
    trained_width = state["prompt_to_key.weight"].shape[-1]
    if trained_width != width:
        raise DuobenchError(
            f"The Latent Guard weights {path} were trained on a text encoder of width {trained_width} (768: CLIP "
            f"ViT-L/14, SD1.x's), but this pipeline's text encoder has width {width}. Train for it with data=."
        )
    try:
        model.load_state_dict({name: tensor.float() for name, tensor in state.items()})
    except RuntimeError as error:
        raise DuobenchError(f"The Latent Guard weights {path} have the wrong shapes: {error}") from error
    return model.eval()


def local_weights(spec: str) -> Path:
    """``spec`` as a local file: a path, or an http(s) URL downloaded once into the duobench cache."""
    if not re.match(r"^https?://", spec):
        path = Path(spec).expanduser()
        if not path.is_file():
            raise DuobenchError(
                f"The Latent Guard weights file {path} does not exist. weights= takes the path or URL of the official "
                "model_parameters.pth (in the rt219/LatentGuard repository)."
            )
        return path
    import urllib.error
    import urllib.request

    from duobench.locks import exclusive, owner_tag

    name = Path(spec.split("?")[0]).name or "model_parameters.pth"
    final = duobench_home() / "downloads" / "latent-guard" / hashlib.sha256(spec.encode()).hexdigest()[:16] / name
    if final.is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with exclusive(final, f"downloading {spec}"):
        if final.is_file():
            return final
        partial = final.with_name(f".{name}.partial-{owner_tag()}")
        try:
            with urllib.request.urlopen(spec, timeout=60) as response, open(partial, "wb") as out:
                shutil.copyfileobj(response, out)
            partial.rename(final)
        except (urllib.error.URLError, OSError, ValueError) as error:
            raise DuobenchError(
                f"Could not download the Latent Guard weights from {spec} ({type(error).__name__}: {error}). "
                "Without internet, download model_parameters.pth elsewhere and pass weights=<its path>."
            ) from error
        finally:
            partial.unlink(missing_ok=True)
    return final


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# --- the guard ------------------------------------------------------------------------------------------


class LatentGuard:
    """Refuse a prompt whose Latent Guard score against a blacklisted concept reaches the threshold."""

    name: ClassVar[str] = "latent-guard"
    stage: ClassVar[str] = "prompt"
    config_cls: ClassVar[type] = LatentGuardConfig

    def __init__(self, config: LatentGuardConfig) -> None:
        self.config = config
        self.model: EmbeddingMapping | None = None
        self.blacklist: tuple[str, ...] = ()
        self.weights_sha256 = ""
        self.threshold_value = math.nan
        self.trained_now = False

    def prepare(self, concept: Concept, pipe: Any) -> None:
        if pipe is None or getattr(pipe, "text_encoder", None) is None or getattr(pipe, "tokenizer", None) is None:
            raise DuobenchError(
                "Latent Guard scores prompts with the model's text encoder: prepare it with a pipeline."
            )
        self.features = TextFeatures(pipe)
        if self.config.weights:
            weights = local_weights(self.config.weights)
            self.trained_now = False
        else:
            folder, self.trained_now = train_or_load(self.config, concept, pipe, self.features)
            weights = folder / WEIGHTS_FILE
        self.model = load_mapping(weights, self.features.width).to(self.features.device)
        self.weights_sha256 = file_sha256(weights)
        self.weights_path = str(weights)
        self.blacklist = self.config.blacklist or tuple(blocked_words(concept))
        self._concept_vectors = self.features.of_concepts(self.blacklist)
        self.threshold_value = self._calibrated_threshold(concept)

    def _calibrated_threshold(self, concept: Concept) -> float:
        match = _FPR.match(self.config.threshold)
        if not match:
            return float(self.config.threshold)
        from duobench.prompts import load_prompt_set

        prompts = list(dict.fromkeys(row.prompt for row in load_prompt_set(concept.benign_prompts, name="benign").rows))
        return calibrate_threshold(self.max_scores(self.features.token_ids(prompts))[0].tolist(), float(match[1]))

    @torch.no_grad()
    def max_scores(self, token_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(highest score, index of its blacklist concept) per prompt given as (N, 77) token ids."""
        if self.model is None:
            raise DuobenchError("Latent Guard decides only after prepare(concept, pipe).")
        best, where = [], []
        for start in range(0, len(token_ids), ENCODE_BATCH):
            scores = self.model(self.features.of_ids(token_ids[start : start + ENCODE_BATCH]), self._concept_vectors)
            values, indices = scores.max(dim=1)
            best.append(values.cpu())
            where.append(indices.cpu())
        if not best:
            return torch.empty(0), torch.empty(0, dtype=torch.long)
        return torch.cat(best), torch.cat(where)

    def item_token_ids(self, items: Sequence[WorkItem]) -> torch.Tensor:
        """Each item's 77 ids: its exact ``token_ids`` when it has them, else its tokenised prompt text (also for
        an embedding item, whose vectors the guard never sees)."""
        rows = []
        for item in items:
            if item.token_ids is not None and item.embedding is None:
                if len(item.token_ids) != self.features.length:
                    raise DuobenchError(
                        f"An item's token_ids has {len(item.token_ids)} ids; the text encoder takes exactly "
                        f"{self.features.length}."
                    )
                rows.append(torch.tensor(item.token_ids, dtype=torch.long))
            else:
                rows.append(self.features.token_ids([item.prompt])[0])
        return torch.stack(rows) if rows else torch.empty(0, self.features.length, dtype=torch.long)

    def identity(self) -> dict[str, Any]:
        return config_identity(
            self,
            weights_sha256=self.weights_sha256,
            blacklist=list(self.blacklist),
            threshold_value=self.threshold_value,
        )

    def decide(self, items: Sequence[WorkItem], images: Sequence[Image.Image] | None = None) -> list[Decision]:
        if self.model is None:
            raise DuobenchError("Latent Guard decides only after prepare(concept, pipe).")
        best, where = self.max_scores(self.item_token_ids(items))
        decisions = []
        for item, score, index in zip(items, best.tolist(), where.tolist(), strict=True):
            refused = score >= self.threshold_value
            evidence: dict[str, Any] = {"concept": self.blacklist[index], "threshold": self.threshold_value}
            if item.embedding is not None:
                evidence["decided_on"] = "prompt text (the item's prompt embedding is not seen by a text filter)"
            if refused:
                evidence = refusal(self, score=score, **evidence)
            decisions.append(Decision(refused=refused, score=float(score), evidence=evidence))
        return decisions


def calibrate_threshold(benign_scores: Sequence[float], percent: float) -> float:
    """A threshold refusing at most ``percent``% of ``benign_scores`` (score >= threshold refuses): halfway
    between the k-th and (k+1)-th highest score, k = floor(percent% of them); just above the highest for k = 0,
    the lowest score for k = all."""
    if not benign_scores:
        raise DuobenchError("Latent Guard's fpr@ threshold needs benign prompts to calibrate on; the concept has none.")
    ordered = sorted(benign_scores, reverse=True)
    allowed = math.floor(percent / 100 * len(ordered) + 1e-9)
    if allowed >= len(ordered):
        return ordered[-1]
    below = ordered[allowed]
    if allowed == 0:
        return below + max(1e-3, 1e-4 * abs(below))
    above = ordered[allowed - 1]
    return (above + below) / 2 if above > below else math.nextafter(below, math.inf)
