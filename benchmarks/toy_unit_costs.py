"""Seconds per unit of work for the plan's estimate (`duobench.workload.TOY_CPU`), measured on the toy model.

A training unit is timed at two sizes, and its cost is the difference divided by the difference in size, so
what a training costs once (building its data, loading a classifier) is not spread over its steps. Units:

- training: ``safegen step``, ``sdd iteration``, ``shielddiff epoch`` (the star concept's options, fewer
  steps), ``latent-guard epoch``;
- inference-time methods: ``<method> image``, the seconds an image costs *on top of* the base model's
  (SLD, SD-NP, SAFREE: their guidance at every step); ``pno unet evaluation``, the seconds per UNet
  evaluation PNO's sampler records for its images (forward and backward);
- attacks: ``mma-diffusion step`` (one GCG iteration of a prompt's search), ``p4d step`` (one iteration of
  a row, its evaluations every ``eval_every`` included, no early stop): whole attacks on the plain set's
  first 8 rows at the star concept's options, divided by their steps (so per-row setup is included).

The workload table quotes two runs of this script: idle, and shared with two other single-thread jobs.

    python benchmarks/toy_unit_costs.py [--units ...] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from duobench.attacks.base import Budget
from duobench.cache import SAMPLING_INFO
from duobench.concepts import load_concept
from duobench.edits import build_system, method_edit
from duobench.engine import generate
from duobench.methods import train_or_load
from duobench.models import default_sampler_settings, load_pipeline, pipeline_fingerprint
from duobench.prompts import PromptSet, load_prompt_set, to_work_items
from duobench.run_config import attack_options, method_options


def timed(action: Callable[[], object]) -> tuple[float, object]:
    started = time.perf_counter()
    result = action()
    return time.perf_counter() - started, result


def marginal(cost: Callable[[int], float], small: int, large: int) -> float:
    """Seconds per unit: the cost at ``large`` units minus the cost at ``small``, per unit."""
    return (cost(large) - cost(small)) / (large - small)


class ToyWorld:
    """The toy model, the star concept and a scratch folder for every artifact and attack cache."""

    def __init__(self, scratch: Path) -> None:
        self.scratch = scratch
        self.concept = load_concept("star")
        self.pipe = load_pipeline("toy", device="cpu")
        self.fingerprint = pipeline_fingerprint(self.pipe)
        self.base = build_system(self.pipe, self.fingerprint)
        self.settings = default_sampler_settings(self.pipe, self.concept)
        self.rows = load_prompt_set(self.concept.prompt_sets["plain"]).rows
        self.runs = 0

    def train(self, method: str, **overrides) -> Path:
        options = {**method_options(self.concept, method, {}), **overrides}
        artifact, _, _ = train_or_load(method, self.pipe, self.concept, self.fingerprint, options, self.scratch)
        return artifact

    def system(self, method: str):
        edit = method_edit(method, self.train(method), 1.0)
        return build_system(load_pipeline("toy", device="cpu"), self.fingerprint, [edit])

    def images(self, system, count: int) -> list:
        items = to_work_items(self.rows[:count], self.settings)
        return [image for _, batch in generate(system.generator, items, batch_size=16) for image in batch]

    def attack(self, name: str, rows: int, steps: int, **options) -> None:
        from duobench.attacks.run import run_attack
        from duobench.metrics.dsr import build_judge

        self.runs += 1  # a fresh cache each time: nothing is reused between the two sizes
        run_attack(
            name,
            self.concept,
            self.base,
            self.base,
            PromptSet("plain", self.rows[:rows]),
            Budget(steps=steps),
            self.scratch / f"attacks-{self.runs}",
            build_judge(self.concept.judge),
            options=attack_options(self.concept, name, options),
            settings=self.settings,
        )


def training_unit(method: str, field: str, small: int, large: int) -> Callable[[ToyWorld], float]:
    return lambda world: marginal(lambda n: timed(lambda: world.train(method, **{field: n}))[0], small, large)


def image_overhead(method: str, count: int = 32) -> Callable[[ToyWorld], float]:
    def measure(world: ToyWorld) -> float:
        system = world.system(method)
        world.images(world.base, 4), world.images(system, 4)  # warm-up
        base_seconds, _ = timed(lambda: world.images(world.base, count))
        method_seconds, _ = timed(lambda: world.images(system, count))
        return (method_seconds - base_seconds) / count

    return measure


def pno_evaluation(world: ToyWorld, count: int = 8) -> float:
    system = world.system("pno")
    seconds, images = timed(lambda: world.images(system, count))
    evaluations = sum(json.loads(image.info[SAMPLING_INFO])["unet_evaluations"] for image in images)
    return seconds / evaluations


def attack_step(world: ToyWorld, name: str, rows: int = 8, searches_per_row: bool = False, **options) -> float:
    """Seconds per step of a whole attack on ``rows`` rows at the concept's iteration count, per-row setup
    included; an attack that searches once per distinct prompt (MMA-Diffusion) is divided by its searches."""
    iterations = attack_options(world.concept, name, {})["iterations"]
    seconds, _ = timed(lambda: world.attack(name, rows, iterations, **options))
    runs = len({row.prompt for row in world.rows[:rows]}) if searches_per_row else rows
    return seconds / (runs * iterations)


def latent_guard_epoch(world: ToyWorld) -> float:
    from duobench.guards.base import make_guard

    def cost(epochs: int) -> float:
        guard = make_guard("latent-guard", {"epochs": epochs}, world.concept)
        return timed(lambda: guard.prepare(world.concept, world.pipe))[0]

    return marginal(cost, 20, 60)


UNITS: dict[str, Callable[[ToyWorld], float]] = {
    "safegen step": training_unit("safegen", "steps", 50, 150),
    "sdd iteration": training_unit("sdd", "iterations", 10, 30),
    "shielddiff epoch": training_unit("shielddiff", "epochs", 1, 3),
    "latent-guard epoch": latent_guard_epoch,
    "sld image": image_overhead("sld"),
    "sd-np image": image_overhead("sd-np"),
    "safree image": image_overhead("safree"),
    "pno unet evaluation": pno_evaluation,
    "mma-diffusion step": lambda world: attack_step(world, "mma-diffusion", searches_per_row=True),
    "p4d step": lambda world: attack_step(world, "p4d", early_stop=False),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--units", nargs="+", default=list(UNITS), choices=list(UNITS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["DUOBENCH_HOME"] = scratch  # every artifact, guard and attack cache is thrown away
        world = ToyWorld(Path(scratch))
        for unit in args.units:
            seconds = UNITS[unit](world)
            print(f"{unit:<22} {seconds:.3f} s", flush=True)
    print(f"(toy model, {args.threads} torch thread(s); load average {load:.1f} at the start)")


if __name__ == "__main__":
    main()
