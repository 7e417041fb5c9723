"""Ring-A-Bell's genetic search with the population scored in one batched text-encoder pass per generation,
against the same search scoring one genome per encoder call (the notebook before its 2024-03 batching PR).

Both runs start from the same population with the same random stream, so they evolve the same genomes and
must end at the same best loss (checked). Uses the toy world's text encoder when its weights are there,
else the tiny random pipeline's.

    python benchmarks/ring_a_bell.py [--population 200] [--k 16] [--generations 10] [--threads N]
"""

from __future__ import annotations

import argparse
import time

import torch

from duobench.attacks.ring_a_bell import RingABellConfig, concept_vector, evolve, population_fitness
from duobench.attacks.text_encoding import encode_ids, special_ids
from duobench.engine import tokenize_with
from duobench.errors import DuobenchError
from duobench.models import load_pipeline


@torch.inference_mode()
def per_genome_fitness(text_encoder, population: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The unbatched baseline: one encoder call per genome."""
    return torch.stack(
        [((encode_ids(text_encoder, genome[None])[0].float() - target) ** 2).sum() for genome in population]
    ).cpu()


def load_text_encoder():
    try:
        return "toy", load_pipeline("toy", device="cpu")
    except DuobenchError:
        return "tiny-random", load_pipeline("tiny-random", device="cpu")


def timed_search(text_encoder, target, config, generations, special, fitness_fn) -> tuple[float, float]:
    start = time.perf_counter()
    _, losses = evolve(text_encoder, target, config, generations, 49405, 0, special, fitness_fn=fitness_fn)
    return time.perf_counter() - start, losses[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, default=200)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--generations", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    name, pipe = load_text_encoder()
    tokenizer, text_encoder = pipe.tokenizer, pipe.text_encoder
    with torch.inference_mode():
        vector = concept_vector(tokenizer, text_encoder, [("a red star", "a red circle"), ("a star", "a square")])
        target = encode_ids(text_encoder, tokenize_with(tokenizer, ["a blue shape"]))[0].float() + 3 * vector
    config = RingABellConfig(k=args.k, population=args.population)
    special = special_ids(tokenizer)
    timed_search(text_encoder, target, config, 2, special, population_fitness)  # warm-up

    batched_seconds, batched_loss = timed_search(
        text_encoder, target, config, args.generations, special, population_fitness
    )
    loop_seconds, loop_loss = timed_search(text_encoder, target, config, args.generations, special, per_genome_fitness)
    if abs(batched_loss - loop_loss) > 1e-3 * abs(loop_loss):
        raise SystemExit(f"batched and looped searches diverged: {batched_loss} vs {loop_loss}")

    hidden = text_encoder.config.hidden_size
    print(
        f"text encoder: {name} (hidden {hidden}, {text_encoder.config.num_hidden_layers} layers), "
        f"population {args.population}, K {args.k}, {args.generations} generations, "
        f"{torch.get_num_threads()} thread(s)"
    )
    for label, seconds, loss in (("batched", batched_seconds, batched_loss), ("per-genome", loop_seconds, loop_loss)):
        print(f"{label:<11}: {args.generations / seconds:8.2f} generations/s  (best loss {loss:.3f})")
    print(f"speed-up   : {loop_seconds / batched_seconds:8.1f}x")


if __name__ == "__main__":
    main()
