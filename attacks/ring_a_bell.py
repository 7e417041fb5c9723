"""Ring-A-Bell (Tsai, Hsu et al., ICLR 2024): a genetic search for K tokens whose CLIP encoding is the
prompt's encoding pushed along the concept direction.

1. Concept vector: ``c = mean_i (E(with_i) - E(without_i))`` over (prompt with the concept, prompt without
   it) pairs, where ``E`` is the text encoder's full last hidden state over all 77 positions (77 x D), not the
   pooled output. The pairs are the official ones (`Get_Concept_Vector.ipynb`, see "Concept vector source").
2. Target per prompt: ``E(prompt) + eta * c``.
3. Genome: ``[start] + K ids + [end] * (76 - K)``; only the K ids evolve, drawn from ``[1, 49405]``.
   Fitness (lower is better): ``sum over 77 x D of (target - E(genome))^2``, padding positions included.
4. Per generation: keep the best half; each survivor, with probability ``crossover_rate``, crosses with a
   random survivor at a cut in ``[1, K]`` into two children; every individual, with probability
   ``mutation_rate``, gets one random position set to a random id.

Paper settings (`InversePrompt.ipynb`): population 200, 3000 generations, mutation 0.25, crossover 0.5,
K = 16 (also 38 and 77, i.e. 75 free tokens), eta = 3 for nudity. The population's fitness is one batched
text-encoder call per generation (survivors that were not mutated keep their score, and copies of a genome
are encoded once: about 54 of 200 members per generation once the search has converged); the notebook's
first version looped over all 200 genomes one by one.

Concept vector source (``concept_pairs``):

- ``official`` (default): the prompt files of the public repository ``chiayi-hsu/Ring-A-Bell`` named by the
  concept's ``ring_a_bell_source`` (repo, commit, file paths and their sha256), downloaded once from
  ``<source_url>/<repo>/<commit>/<path>`` (raw.githubusercontent.com by default) into
  ``$DUOBENCH_HOME/sources/<repo>/<commit>/<path>`` and checked against the pinned sha256 on every load.
  Offline, place the files there. The pairs are rebuilt as the notebook does:

  - ``nudity``: row i of ``Nudity_prompt.csv`` becomes ``"{nudity} {people}, {location}"`` (``"{nudity},
    {location}"`` when ``people`` is ``None`` and ``clothes`` is not) and is paired with row i of
    ``NoNudity_prompt.csv``'s ``prompt``. The notebook repeats every prompt 5 times and deletes 19 failed
    entries of that 250-long list (indices ``NUDITY_FAILED``, the images NudeNet found no nudity in), so the
    mean runs over 231 entries; the encoder is deterministic, so we encode each row once and weight it by
    its surviving copies, which is the same mean. The cells are read as text, so ``None`` is the string the
    notebook compares with, as pandas 1.x reads it; under pandas 2 (which reads ``None`` as NaN) the
    notebook would write "nan" into the 13 prompts whose ``people`` is None. The repository does not say
    which pandas made the released ``Nudity_vector.npy``, and we have not compared our vector with it (that
    needs SD1.4's text encoder).
  - ``violence``: the ``prompt`` / ``prompt1`` columns of ``Violence_30.csv`` (30 pairs, 5 repeats each and
    none dropped, i.e. a plain mean).

  A concept without ``ring_a_bell_source`` (the toy star: there is no official file for it) uses its own
  ``ring_a_bell_pairs``, and the source says so.
- ``concept-file``: the concept's ``ring_a_bell_pairs`` even when an official source exists. For nudity and
  violence these are 20 pairs written for duobench in the style of the official files, a labelled fallback
  for machines that cannot reach the files: results made this way are not the official attack.

The source (kind, repo, commit, every file's path, URL and sha256, or the concept file) is written to the
attack's ``prepare/concept_vector_source.json`` and to every result's ``log.extra["concept_vector_source"]``.
It enters the attack's cache key through the concept (``ring_a_bell_source``, ``ring_a_bell_pairs``) and the
config (``concept_pairs``, ``source_url``). We use the prompt files rather than the released
``Concept Vectors/*_vector.npy``: those hold SD1.4's (77, 768) vectors only, while the files give the vector
of whichever text encoder is attacked.

Differences from the official notebook, on purpose:

- **Token ids are evaluated as found.** The notebook saves ``tokenizer.decode(ids)`` and the evaluation
  re-tokenises that text, which drifts (the released K=38 strings re-tokenise to 37-49 tokens, K=77 to
  73-90, truncated at 77), so the evaluated prompts are not the optimised ones. We replay the exact 77 ids
  (``replay="token_ids"``, default) and keep the decoded text beside them; ``replay="text"`` reproduces the
  official behaviour. ``log.extra["text_roundtrip_exact"]`` records whether the text would have drifted.
- **The best genome ever scored is returned.** Mutation also hits survivors (as in the notebook: there is no
  elitism), so the best individual can be lost between generations; we keep the best seen.
- The text encoder is the unlearned model's own (for UNet-editing methods it is SD's, so the prompts are
  computed once, keyed by the encoder's weights, and transfer to every such method).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from duobench.attacks.base import AttackLog, AttackModels, AttackResult, Budget, item_seed
from duobench.attacks.text_encoding import encode_ids, special_ids
from duobench.cache import atomic_write_bytes
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import tokenize_with
from duobench.paths import duobench_home
from duobench.progress import track
from duobench.prompts import PromptRow

CONCEPT_PAIRS = ("official", "concept-file")
RAW_GITHUB = "https://raw.githubusercontent.com"
DOWNLOAD_TIMEOUT_SECONDS = 60


@dataclass(frozen=True)
class RingABellConfig:
    k: int = 16
    """Free tokens (16, 38 or 75 in the paper)."""
    eta: float = 3.0
    """Concept strength: 3 for nudity in the notebook; 5 or 5.5 for violence in the released sets."""
    population: int = 200
    generations: int = 3000
    mutation_rate: float = 0.25
    crossover_rate: float = 0.5
    replay: str = "token_ids"
    """``token_ids`` evaluates the optimised ids; ``text`` the decoded string, as the official code does."""
    concept_pairs: str = "official"
    """``official``: the pairs of the concept's ``ring_a_bell_source`` files (its ``ring_a_bell_pairs`` when it
    names none); ``concept-file``: the concept's ``ring_a_bell_pairs``, a labelled fallback."""
    source_url: str = RAW_GITHUB
    """Where the official files are downloaded from: ``<source_url>/<repo>/<commit>/<path>``."""
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 75:
            raise ValueError(f"k must be in [1, 75] (77 positions minus start and end), got {self.k}")
        if self.population < 4:
            raise ValueError(f"population must be at least 4, got {self.population}")
        if self.replay not in {"token_ids", "text"}:
            raise ValueError(f"replay must be 'token_ids' or 'text', got {self.replay!r}")
        if self.concept_pairs not in CONCEPT_PAIRS:
            raise ValueError(f"concept_pairs must be one of {CONCEPT_PAIRS}, got {self.concept_pairs!r}")


@torch.no_grad()
def concept_vector(
    tokenizer, text_encoder, pairs: Sequence[tuple[str, str]], weights: Sequence[float] | None = None
) -> torch.Tensor:
    """Mean over pairs of E(with concept) - E(without), the full (77, D) hidden states, in float32; with
    ``weights``, each pair counts as many times as its weight (the notebook's repeated, filtered list)."""
    with_concept = encode_ids(text_encoder, tokenize_with(tokenizer, [a for a, _ in pairs])).float()
    without = encode_ids(text_encoder, tokenize_with(tokenizer, [b for _, b in pairs])).float()
    if weights is None:
        return (with_concept - without).mean(dim=0)
    weight = torch.tensor(weights, dtype=torch.float32, device=with_concept.device).view(-1, 1, 1)
    return ((with_concept - without) * weight).sum(dim=0) / weight.sum()


# The official prompt files -------------------------------------------------------------------------------

NOTEBOOK_REPEATS = 5
"""`Get_Concept_Vector.ipynb` encodes every prompt 5 times (``num_samples = 5``) before averaging."""
NUDITY_FAILED = (134, 15, 16, 147, 151, 35, 38, 174, 55, 62, 202, 204, 91, 93, 95, 96, 98, 106, 109)
"""The notebook's ``fail`` list: entries of the 5x-repeated nudity list it deletes (entry j is row j // 5)."""


@dataclass(frozen=True)
class OfficialFile:
    role: str
    path: str
    sha256: str


@dataclass(frozen=True)
class OfficialSource:
    """A concept's ``ring_a_bell_source``: which files of which commit, and the recipe that pairs them."""

    repo: str
    commit: str
    recipe: str
    files: tuple[OfficialFile, ...]

    @classmethod
    def from_concept(cls, concept: Concept) -> OfficialSource:
        raw = concept.ring_a_bell_source
        try:
            files = tuple(
                OfficialFile(role, str(spec["path"]), str(spec["sha256"]).lower())
                for role, spec in dict(raw["files"]).items()
            )
            source = cls(str(raw["repo"]), str(raw["commit"]), str(raw["recipe"]), files)
        except (KeyError, TypeError, ValueError) as error:
            raise DuobenchError(
                f"Concept {concept.name!r} has a malformed ring_a_bell_source ({type(error).__name__}: {error}); "
                "it needs repo, commit, recipe and files: {role: {path, sha256}}."
            ) from error
        if source.recipe not in RECIPES:
            raise DuobenchError(
                f"Concept {concept.name!r}: unknown ring_a_bell_source recipe {source.recipe!r}; "
                f"known: {', '.join(RECIPES)}."
            )
        missing = set(RECIPES[source.recipe][0]) - {file.role for file in files}
        if missing:
            raise DuobenchError(
                f"Concept {concept.name!r}: the {source.recipe} recipe needs the files {sorted(missing)} in "
                "ring_a_bell_source.files."
            )
        return source

    def url(self, base_url: str, file: OfficialFile) -> str:
        return f"{base_url.rstrip('/')}/{self.repo}/{self.commit}/{urllib.parse.quote(file.path)}"

    def cached_path(self, file: OfficialFile) -> Path:
        return duobench_home() / "sources" / self.repo / self.commit / file.path


def official_file(source: OfficialSource, file: OfficialFile, base_url: str) -> bytes:
    """The file's bytes from ``$DUOBENCH_HOME/sources``, else downloaded there; always sha256-checked."""
    path, url = source.cached_path(file), source.url(base_url, file)
    if path.is_file():
        data = path.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != file.sha256:
            raise DuobenchError(
                f"The cached Ring-A-Bell file {path} has sha256 {actual}, but the concept pins {file.sha256} "
                f"({source.repo}@{source.commit}:{file.path}). Delete it to download it again from {url}, or "
                "replace it with the original."
            )
        return data
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_SECONDS) as response:
            data = response.read()
    except OSError as error:  # URLError, HTTPError, timeouts: all "not reachable from here"
        raise DuobenchError(
            f"Cannot download Ring-A-Bell's official prompt file {file.path} ({type(error).__name__}: {error}). "
            f"Download {url} on a machine with internet and place it at {path}, or run the attack with "
            "concept_pairs=concept-file to use the concept file's ring_a_bell_pairs instead (written for "
            "duobench, not the official concept vector; the attack card says so)."
        ) from error
    actual = hashlib.sha256(data).hexdigest()
    if actual != file.sha256:
        raise DuobenchError(
            f"The Ring-A-Bell file downloaded from {url} has sha256 {actual}, but the concept pins {file.sha256} "
            f"({source.repo}@{source.commit}:{file.path}); it was not cached. Check source_url, or place the "
            f"original file at {path}."
        )
    atomic_write_bytes(path, data)
    return data


def _csv_rows(data: bytes, file: OfficialFile, columns: Sequence[str]) -> list[dict[str, str]]:
    """Rows as text cells (no NA parsing: ``None`` stays the string the notebook compares with)."""
    reader = csv.DictReader(io.StringIO(data.decode("utf-8-sig")))
    missing = set(columns) - set(reader.fieldnames or ())
    if missing:
        raise DuobenchError(f"Ring-A-Bell file {file.path} has no column(s) {sorted(missing)}.")
    return list(reader)


def nudity_pairs(with_concept: list[dict[str, str]], without: list[dict[str, str]]) -> tuple[list, list[int]]:
    """The nudity cell of `Get_Concept_Vector.ipynb`: row-wise pairs and each row's surviving copies."""
    if len(with_concept) != len(without) or NOTEBOOK_REPEATS * len(with_concept) <= max(NUDITY_FAILED):
        raise DuobenchError(
            f"Ring-A-Bell's nudity files must hold the same number of rows, enough for the notebook's failed "
            f"indices (50 each); got {len(with_concept)} and {len(without)}."
        )
    pairs = []
    for row, plain in zip(with_concept, without, strict=True):
        if row["clothes"] != "None" and row["people"] == "None":
            prompt = f"{row['nudity']}, {row['location']}"
        else:
            prompt = f"{row['nudity']} {row['people']}, {row['location']}"
        pairs.append((prompt, plain["prompt"]))
    weights = [NOTEBOOK_REPEATS] * len(pairs)
    for entry in NUDITY_FAILED:
        weights[entry // NOTEBOOK_REPEATS] -= 1
    return pairs, weights


def violence_pairs(rows: list[dict[str, str]]) -> tuple[list, list[int]]:
    """The violence cell: ``prompt`` (violent) against ``prompt1`` (the same sentence without violence)."""
    return [(row["prompt"], row["prompt1"]) for row in rows], [NOTEBOOK_REPEATS] * len(rows)


RECIPES: dict[str, tuple[dict[str, tuple[str, ...]], Callable[..., tuple[list, list[int]]]]] = {
    "nudity": (
        {"with_concept": ("nudity", "people", "clothes", "location"), "without_concept": ("prompt",)},
        nudity_pairs,
    ),
    "violence": ({"pairs": ("prompt", "prompt1")}, violence_pairs),
}
"""recipe -> (file role -> columns it needs, the function that turns the files' rows into weighted pairs)."""


def concept_vector_source(concept: Concept, config: RingABellConfig) -> dict[str, Any]:
    """Where the concept vector's pairs come from, read from the concept and the config alone (no download):
    the official repo, commit, recipe and every file's path, sha256 and URL, or the concept file, labelled."""
    if config.concept_pairs == "official" and concept.ring_a_bell_source:
        source = OfficialSource.from_concept(concept)
        files = [{**asdict(file), "url": source.url(config.source_url, file)} for file in source.files]
        return {
            "kind": "official",
            "repo": source.repo,
            "commit": source.commit,
            "recipe": source.recipe,
            "files": files,
        }
    if not concept.ring_a_bell_pairs:
        raise DuobenchError(
            f"Concept {concept.name!r} has no ring_a_bell_pairs"
            + (" (concept_pairs=concept-file)" if concept.ring_a_bell_source else " and no ring_a_bell_source")
            + "; Ring-A-Bell derives its concept vector from (prompt with the concept, same prompt without it) "
            "pairs. Add them to the concept file."
        )
    why = (
        "concept_pairs=concept-file: pairs written for this concept file, not the official Ring-A-Bell files"
        if concept.ring_a_bell_source
        else "the concept names no official Ring-A-Bell file (ring_a_bell_source); its own pairs are used"
    )
    return {"kind": "concept-file", "file": concept.path, "note": why}


def resolve_concept_pairs(
    concept: Concept, config: RingABellConfig
) -> tuple[list[tuple[str, str]], list[int] | None, dict[str, Any]]:
    """The (with, without) pairs for the concept vector, their weights, and `concept_vector_source` with the
    number of pairs (and of weighted entries) it gave."""
    record = concept_vector_source(concept, config)
    if record["kind"] == "concept-file":
        return list(concept.ring_a_bell_pairs), None, {**record, "pairs": len(concept.ring_a_bell_pairs)}
    source = OfficialSource.from_concept(concept)
    columns, recipe = RECIPES[source.recipe]
    tables = {
        file.role: _csv_rows(official_file(source, file, config.source_url), file, columns.get(file.role, ()))
        for file in source.files
    }
    pairs, weights = recipe(*(tables[role] for role in columns))
    return pairs, weights, {**record, "pairs": len(pairs), "weighted_entries": sum(weights)}


CPU_CHUNK_GENOMES = 32
"""Genomes per encoder pass on a CPU. A whole population in one pass allocates activations too big for the
caches (and fresh pages on every call): the toy encoder scores 200 genomes in 112 ms in one pass and in
58 ms (1 thread) / 37 ms (2 threads) in chunks of 32, against 105 / 88 ms one genome at a time. SD1.4's
encoder is compute-bound on a CPU at any chunk size. On a GPU the population goes in one pass."""


@torch.inference_mode()
def population_fitness(text_encoder, population: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error to ``target`` summed over all 77 x D, for the whole population in batched encoder
    passes: one pass on a GPU, cache-sized chunks on a CPU."""
    chunk = len(population) if text_encoder.device.type != "cpu" else CPU_CHUNK_GENOMES
    target = target.to(text_encoder.device)
    return torch.cat(
        [
            ((encode_ids(text_encoder, rows).float() - target) ** 2).sum(dim=(1, 2)).cpu()
            for rows in population.split(max(chunk, 1))
        ]
    )


def initial_population(size: int, k: int, start_id: int, end_id: int, vocab_high: int, rng: torch.Generator):
    population = torch.full((size, 77), end_id, dtype=torch.long)
    population[:, 0] = start_id
    population[:, 1 : k + 1] = torch.randint(1, vocab_high + 1, (size, k), generator=rng)
    return population


def next_generation(
    population: torch.Tensor,
    fitness: torch.Tensor,
    config: RingABellConfig,
    vocab_high: int,
    rng: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selection of the best half, single-point crossover into two children, one-position mutation.

    Returns the new population and the fitness each member inherits: a survivor that was not mutated keeps
    its score (NaN marks the members that must be scored), so no genome is encoded twice in a row.
    """
    order = fitness.argsort()[: config.population // 2]
    survivors, survivor_fitness = population[order], fitness[order]
    count = len(survivors)
    crossing = torch.nonzero(torch.rand(count, generator=rng) < config.crossover_rate).flatten()
    partners = torch.randint(0, count, (len(crossing),), generator=rng)
    cuts = torch.randint(1, config.k + 1, (len(crossing),), generator=rng)
    from_partner = torch.arange(population.shape[1])[None, :] >= cuts[:, None]
    first, second = survivors[crossing], survivors[partners]
    children = [torch.where(from_partner, second, first), torch.where(from_partner, first, second)]
    offspring = torch.cat([survivors, *children])
    inherited = torch.full((len(offspring),), float("nan"))
    inherited[:count] = survivor_fitness
    mutants = torch.nonzero(torch.rand(len(offspring), generator=rng) < config.mutation_rate).flatten()
    positions = torch.randint(1, config.k + 1, (len(mutants),), generator=rng)
    offspring[mutants, positions] = torch.randint(1, vocab_high + 1, (len(mutants),), generator=rng)
    inherited[mutants] = float("nan")
    return offspring, inherited


FitnessFn = Callable[[object, torch.Tensor, torch.Tensor], torch.Tensor]


def evolve(
    text_encoder,
    target: torch.Tensor,
    config: RingABellConfig,
    generations: int,
    vocab_high: int,
    seed: int,
    special: tuple[int, int],
    fitness_fn: FitnessFn = population_fitness,
    on_generation: Callable[[float], None] | None = None,
) -> tuple[torch.Tensor, list[float]]:
    """Run the GA; return the best genome ever scored and the best-so-far fitness per generation.

    Each generation scores its new members with one ``fitness_fn`` call, each distinct genome once (crossover
    of converged parents makes copies: about half the new members after 60 generations). The benchmark swaps
    in a per-genome loop to measure what batching buys. ``on_generation(best fitness so far)`` is called after
    every generation (the progress bar).
    """
    start_id, end_id = special
    rng = torch.Generator().manual_seed(seed)
    population = initial_population(config.population, config.k, start_id, end_id, vocab_high, rng)
    fitness = torch.full((len(population),), float("nan"))
    best, best_loss, losses = population[0], float("inf"), []
    for generation in range(generations):
        unscored = torch.isnan(fitness)
        distinct, copies = torch.unique(population[unscored], dim=0, return_inverse=True)
        fitness[unscored] = fitness_fn(text_encoder, distinct, target)[copies]
        winner = int(fitness.argmin())
        if float(fitness[winner]) < best_loss:
            best, best_loss = population[winner].clone(), float(fitness[winner])
        losses.append(best_loss)
        if on_generation is not None:
            on_generation(best_loss)
        if generation < generations - 1:
            population, fitness = next_generation(population, fitness, config, vocab_high, rng)
    return best, losses


class RingABell:
    """Ring-A-Bell: genetic search for K tokens near prompt + eta * concept vector in CLIP space."""

    name: ClassVar[str] = "ring-a-bell"
    access: ClassVar[str] = "text-encoder"
    config_cls: ClassVar[type] = RingABellConfig

    def __init__(self, config: RingABellConfig) -> None:
        self.config = config

    def card_details(self, concept: Concept) -> dict[str, Any]:
        return {"concept_vector_source": concept_vector_source(concept, self.config)}

    def fetch_sources(self, concept: Concept) -> str:
        pairs, _, source = resolve_concept_pairs(concept, self.config)
        return f"{len(pairs)} concept-vector pairs from the {source['kind']} source"

    def prepare(self, concept: Concept, models: AttackModels, rows: Sequence[PromptRow]) -> None:
        pairs, weights, self.source = resolve_concept_pairs(concept, self.config)
        atomic_write_bytes(models.workdir / "concept_vector_source.json", json.dumps(self.source, indent=2).encode())
        self.tokenizer = models.tokenizer
        self.text_encoder = models.text_encoder
        self.vector = concept_vector(self.tokenizer, self.text_encoder, pairs, weights)
        self.special = special_ids(self.tokenizer)
        self.vocab_high = min(self.special) - 1

    def attack(self, rows: Sequence[PromptRow], budget: Budget) -> Iterator[AttackResult]:
        """One search per distinct prompt text: the target depends on the text only, so rows that repeat a
        prompt with other seeds share its adversarial tokens (one GA per prompt, as the notebook runs)."""
        generations = budget.steps or self.config.generations
        searched: dict[str, tuple[torch.Tensor, list[float]]] = {}
        for row in rows:
            started = time.perf_counter()
            shared = row.prompt in searched
            if not shared:
                searched[row.prompt] = self._search(row.prompt, generations)
            best, losses = searched[row.prompt]
            text = self.tokenizer.decode(best[1 : self.config.k + 1].tolist())
            roundtrip = tokenize_with(self.tokenizer, [text])[0]
            yield AttackResult.from_row(
                self.name,
                row,
                text=text,
                replay=self.config.replay,
                token_ids=tuple(best.tolist()),
                log=AttackLog(
                    losses=losses,
                    seconds=time.perf_counter() - started,
                    extra={
                        "text_roundtrip_exact": bool(torch.equal(roundtrip, best)),
                        "search_shared": shared,
                        "concept_vector_source": self.source,
                    },
                ),
            )

    def _search(self, prompt: str, generations: int) -> tuple[torch.Tensor, list[float]]:
        with torch.no_grad():
            prompt_embedding = encode_ids(self.text_encoder, tokenize_with(self.tokenizer, [prompt]))[0]
        target = prompt_embedding.float() + self.config.eta * self.vector
        seed = item_seed(PromptRow(prompt=prompt, seed=0), self.config.seed)
        with track("Ring-A-Bell search", generations, unit="generations") as progress:
            return evolve(
                self.text_encoder,
                target,
                self.config,
                generations,
                self.vocab_high,
                seed,
                self.special,
                on_generation=lambda best: progress.advance(best_fitness=best),
            )
