"""ESD, UCE and SPM in the toy world: the star rate under plain star prompts, and what survives of the rest.

Each method trains once on the toy model with the toy settings below (the paper defaults shrunk to CPU
minutes: fewer iterations, a larger learning rate), then the unlearned model draws the concept's ``plain``
prompts ("a red star", ... 5 colours) with ``--seeds`` seeds each and the benign shapes (circle, square,
triangle, cross in 5 colours) with half as many. Reported per model: the star rate (judge ``toy-star``),
the benign accuracy (the toy judge still names the requested shape), and the training time.

    python benchmarks/toy_baselines.py [--methods esd-u esd-x uce spm] [--seeds 10] [--weights-dir DIR]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch

from duobench.concepts import load_concept
from duobench.engine import generate
from duobench.items import WorkItem
from duobench.methods import make_config
from duobench.models import prepare_pipeline
from duobench.registry import METHODS
from duobench.toy.judge import JUDGE_FOLDER, JUDGE_SHAPE_LABELS, ToyJudge, toy_judge_card
from duobench.toy.model import WEIGHTS_DIR, load_toy_pipeline

TOY_SETTINGS: dict[str, dict] = {
    "esd-u": {"iterations": 100, "lr": 1e-4, "ddim_steps": 20},
    "esd-x": {"iterations": 100, "lr": 1e-3, "ddim_steps": 20},
    "uce": {},
    "spm": {"iterations": 100, "lr": 1e-2, "warmup_steps": 10, "denoising_steps": 20, "fixed_multiplier": 1.0},
}
"""Per-method overrides of the paper defaults for the toy model (32 px, 20 DDIM steps). Starting points
chosen before the toy weights existed (rollouts matched to the toy's 20 sampler steps, learning rates raised
for ~100 iterations); not yet measured: run this script and update them with the numbers it prints."""


def work_items(prompts: list[str], seeds: int, generation: dict) -> list[WorkItem]:
    return [WorkItem(prompt=prompt, seed=seed, **generation) for prompt in prompts for seed in range(seeds)]


def images(pipe, items: list[WorkItem]) -> list:
    return [image for _, batch in generate(pipe, items, batch_size=50) for image in batch]


def evaluate(pipe, judge: ToyJudge, concept, seeds: int, generation: dict) -> dict[str, float]:
    """Star rate on the concept's plain prompts, and benign-shape accuracy (half the seeds)."""
    star_items = work_items(list(concept.prompt_sets["plain"].prompts), seeds, generation)
    star_rate = sum(v.unsafe for v in judge.judge(images(pipe, star_items))) / len(star_items)
    benign_items = work_items(list(concept.benign_prompts.prompts), max(seeds // 2, 1), generation)
    shapes, _ = judge.predict(images(pipe, benign_items))
    named = [JUDGE_SHAPE_LABELS[i] for i in shapes.argmax(dim=1).tolist()]
    requested = [item.prompt.rsplit(" ", 1)[1] for item in benign_items]
    benign_accuracy = sum(a == b for a, b in zip(named, requested, strict=True)) / len(named)
    return {"star_rate": star_rate, "benign_accuracy": benign_accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=list(TOY_SETTINGS))
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--weights-dir", type=Path, default=WEIGHTS_DIR)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = prepare_pipeline(load_toy_pipeline(weights_dir=args.weights_dir), torch.device("cpu"), torch.float32)
    judge = ToyJudge(toy_judge_card("star"), weights_dir=args.weights_dir / JUDGE_FOLDER)
    concept = load_concept("star")
    generation = {k: concept.generation[k] for k in ("steps", "guidance", "height", "width", "scheduler")}
    rows = [("base", 0.0, evaluate(base, judge, concept, args.seeds, generation))]
    for method in args.methods:
        spec = METHODS.get(method)
        config = make_config(spec, TOY_SETTINGS[method])
        with tempfile.TemporaryDirectory() as out_dir:
            started = time.perf_counter()
            spec.train(config, base, concept, Path(out_dir))
            seconds = time.perf_counter() - started
            unlearned = copy.deepcopy(base)
            spec.apply(unlearned, Path(out_dir), 1.0)
            rows.append((method, seconds, evaluate(unlearned, judge, concept, args.seeds, generation)))
    print(f"{'model':8} {'train s':>8} {'star rate':>10} {'benign acc':>11}   settings")
    for name, seconds, result in rows:
        print(
            f"{name:8} {seconds:8.1f} {result['star_rate']:10.3f} {result['benign_accuracy']:11.3f}   "
            f"{TOY_SETTINGS.get(name, '')}"
        )


if __name__ == "__main__":
    main()
