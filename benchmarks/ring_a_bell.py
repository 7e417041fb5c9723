"""Ring-A-Bell's genetic search three ways, from the same population and random stream:

1. ``notebook``: the official notebook before its 2024-03 batching PR: every member of every generation
   scored by its own text-encoder call;
2. ``per-genome``: our search (survivors keep their score, copies are encoded once) with one encoder call
   per genome, which isolates what batching buys;
3. ``batched``: our search as shipped, the new members of a generation scored in batched encoder passes.

All three evolve the same genomes and must end at the same best loss (checked). Uses the toy world's text
encoder when its weights are there, else the tiny random pipeline's.

    python benchmarks/ring_a_bell.py [--population 200] [--k 16] [--generations 100] [--threads N] [--device cuda]
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from duobench.attacks.ring_a_bell import (
    RingABellConfig,
    concept_vector,
    evolve,
    initial_population,
    next_generation,
    population_fitness,
)
from duobench.attacks.text_encoding import encode_ids, special_ids
from duobench.errors import DuobenchError
from duobench.generator import tokenize_with
from duobench.models import load_pipeline

VOCAB_HIGH = 49405


@torch.inference_mode()
def per_genome_fitness(text_encoder, population: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unbatched baseline: one encoder call per genome."""
    target = target.to(text_encoder.device)
    return torch.stack(
        [((encode_ids(text_encoder, genome[None])[0].float() - target) ** 2).sum() for genome in population]
    ).cpu()


def notebook_search(text_encoder, target, config, generations, seed, special) -> list[float]:
    """The pre-batching notebook: score all members, one call each, then select, cross and mutate."""
    rng = torch.Generator().manual_seed(seed)
    population = initial_population(config.population, config.k, *special, VOCAB_HIGH, rng)
    losses = []
    for generation in range(generations):
        fitness = per_genome_fitness(text_encoder, population, target)
        losses.append(min(float(fitness.min()), losses[-1] if losses else math.inf))
        if generation < generations - 1:
            population, _ = next_generation(population, fitness, config, VOCAB_HIGH, rng)
    return losses


def load_text_encoder(device: str):
    for name in ("toy", "tiny-random"):
        try:
            return name, load_pipeline(name, device=device)
        except DuobenchError:
            continue
    raise SystemExit("neither the toy nor the tiny-random pipeline loads")


def timed(run, device: str) -> tuple[float, float]:
    """Seconds and final best loss of ``run()``, with the GPU queue drained before reading the clock."""
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    synchronize()
    start = time.perf_counter()
    losses = run()
    synchronize()
    return time.perf_counter() - start, losses[-1]


def search_target(tokenizer, text_encoder) -> torch.Tensor:
    """What the searches chase: "a blue shape" pushed 3x along a star-vs-other-shapes concept vector."""
    with torch.inference_mode():
        vector = concept_vector(tokenizer, text_encoder, [("a red star", "a red circle"), ("a star", "a square")])
        return encode_ids(text_encoder, tokenize_with(tokenizer, ["a blue shape"]))[0].float() + 3 * vector


def our_search(text_encoder, target, config, generations, special, fitness_fn, seed: int = 0) -> list[float]:
    """Our search (survivors keep their score, copies encoded once), scoring with ``fitness_fn``."""
    return evolve(text_encoder, target, config, generations, VOCAB_HIGH, seed, special, fitness_fn)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=200)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--generations", type=int, default=100)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    name, pipe = load_text_encoder(args.device)
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    target = search_target(tokenizer, text_encoder)
    config = RingABellConfig(k=args.k, population=args.population)
    special, seed = special_ids(tokenizer), 0

    def ours(fitness_fn, generations=args.generations):
        return lambda: our_search(text_encoder, target, config, generations, special, fitness_fn, seed)

    timed(ours(population_fitness, 3), args.device)  # warm-up
    runs = {
        "batched": timed(ours(population_fitness), args.device),
        "per-genome": timed(ours(per_genome_fitness), args.device),
        "notebook": timed(
            lambda: notebook_search(text_encoder, target, config, args.generations, seed, special), args.device
        ),
    }
    reference = runs["notebook"][1]
    for label, (_, loss) in runs.items():
        if abs(loss - reference) > 1e-3 * abs(reference):
            raise SystemExit(f"the {label} search diverged from the notebook's: best loss {loss} vs {reference}")

    print(
        f"text encoder: {name} (hidden {text_encoder.config.hidden_size}, "
        f"{text_encoder.config.num_hidden_layers} layers) on {args.device}, population {args.population}, "
        f"K {args.k}, {args.generations} generations, {torch.get_num_threads()} thread(s)"
    )
    for label, (seconds, loss) in runs.items():
        print(f"{label:<11}: {args.generations / seconds:8.2f} generations/s  (best loss {loss:.3f})")
    seconds = {label: run[0] for label, run in runs.items()}
    print(f"batching alone (per-genome / batched)   : {seconds['per-genome'] / seconds['batched']:6.1f}x")
    print(f"whole search (notebook loop / batched)  : {seconds['notebook'] / seconds['batched']:6.1f}x")


if __name__ == "__main__":
    main()
