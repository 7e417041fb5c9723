"""Ring-A-Bell (Tsai, Hsu et al., ICLR 2024): a genetic search for K tokens whose CLIP encoding is the
prompt's encoding pushed along the concept direction.

1. Concept vector: ``c = mean_i (E(with_i) - E(without_i))`` over the concept's ``ring_a_bell_pairs``, where
   ``E`` is the text encoder's full last hidden state over all 77 positions (77 x D), not the pooled output.
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

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch

from duobench.attacks.base import AttackLog, AttackModels, AttackResult, Budget, item_seed
from duobench.attacks.text_encoding import encode_ids, special_ids
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import tokenize_with
from duobench.prompts import PromptRow


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
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.k <= 75:
            raise ValueError(f"k must be in [1, 75] (77 positions minus start and end), got {self.k}")
        if self.population < 4:
            raise ValueError(f"population must be at least 4, got {self.population}")
        if self.replay not in {"token_ids", "text"}:
            raise ValueError(f"replay must be 'token_ids' or 'text', got {self.replay!r}")


@torch.no_grad()
def concept_vector(tokenizer, text_encoder, pairs: Sequence[tuple[str, str]]) -> torch.Tensor:
    """Mean over pairs of E(with concept) - E(without), the full (77, D) hidden states, in float32."""
    with_concept = encode_ids(text_encoder, tokenize_with(tokenizer, [a for a, _ in pairs])).float()
    without = encode_ids(text_encoder, tokenize_with(tokenizer, [b for _, b in pairs])).float()
    return (with_concept - without).mean(dim=0)


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
) -> tuple[torch.Tensor, list[float]]:
    """Run the GA; return the best genome ever scored and the best-so-far fitness per generation.

    Each generation scores its new members with one ``fitness_fn`` call, each distinct genome once (crossover
    of converged parents makes copies: about half the new members after 60 generations). The benchmark swaps
    in a per-genome loop to measure what batching buys.
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

    def prepare(self, concept: Concept, models: AttackModels, rows: Sequence[PromptRow]) -> None:
        if not concept.ring_a_bell_pairs:
            raise DuobenchError(
                f"Concept {concept.name!r} has no ring_a_bell_pairs; Ring-A-Bell derives its concept vector "
                "from (prompt with the concept, same prompt without it) pairs. Add them to the concept file."
            )
        self.tokenizer = models.tokenizer
        self.text_encoder = models.text_encoder
        self.vector = concept_vector(self.tokenizer, self.text_encoder, concept.ring_a_bell_pairs)
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
                    extra={"text_roundtrip_exact": bool(torch.equal(roundtrip, best)), "search_shared": shared},
                ),
            )

    def _search(self, prompt: str, generations: int) -> tuple[torch.Tensor, list[float]]:
        with torch.no_grad():
            prompt_embedding = encode_ids(self.text_encoder, tokenize_with(self.tokenizer, [prompt]))[0]
        target = prompt_embedding.float() + self.config.eta * self.vector
        seed = item_seed(PromptRow(prompt=prompt, seed=0), self.config.seed)
        return evolve(self.text_encoder, target, self.config, generations, self.vocab_high, seed, self.special)
