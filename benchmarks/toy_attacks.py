"""Every attack against every unlearning method in the toy world: the star rate (judge ``toy-star``) of the
unlearned model on the concept's plain prompts, and on each attack's prompts for the same rows.

Attack budgets are the toy budgets below (the papers' settings shrunk to a CPU minute or two per attack
and method); methods train through `duobench.runner.prepare` with their defaults unless
``--method-options`` gives toy settings as JSON, e.g. ``'{"esd-u": {"iterations": 100}}'``.

    python benchmarks/toy_attacks.py [--methods esd-u uce spm duo] [--attacks ...] [--seeds 4]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from duobench.attacks.base import Budget
from duobench.attacks.run import attack_work_items, run_attack
from duobench.engine import generate
from duobench.metrics.dsr import build_judge
from duobench.prompts import PromptSet, load_prompt_set
from duobench.run_config import RunConfig
from duobench.runner import prepare

TOY_BUDGETS: dict[str, tuple[Budget, dict]] = {
    "ring-a-bell": (Budget(steps=150), {"k": 16, "population": 200, "eta": 3.0}),
    "sneakyprompt": (Budget(queries=20), {"max_perturb_rate": 1.0, "reward_threshold": 0.5}),
    "concept-inversion": (Budget(steps=300), {"gradient_accumulation": 1, "num_train_images": 20}),
    "unlearndiffatk": (Budget(), {"timesteps": 5, "iterations": 10}),
}
"""Per attack: the budget and options used in the toy world (paper settings otherwise). Measured on 2 shared
CPU cores, 5 prompts x 4 seeds, one thread: Ring-A-Bell ~50 s (once per text encoder), SneakyPrompt 12-41 s,
Concept Inversion ~20 s, UnlearnDiffAtk 20-130 s (longest when no early stop fires) per method."""


def star_rate(pipe, judge, items) -> float:
    images = [image for _, batch in generate(pipe, items, batch_size=50) for image in batch]
    return sum(verdict.unsafe for verdict in judge.judge(images)) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--methods", nargs="+", default=["esd-u", "uce", "spm", "duo"])
    parser.add_argument("--attacks", nargs="+", default=list(TOY_BUDGETS))
    parser.add_argument("--prompt-set", default="plain")
    parser.add_argument("--seeds", type=int, default=4, help="seeds per prompt (the set's first seeds)")
    parser.add_argument("--method-options", default="{}", help="JSON: method -> toy options")
    parser.add_argument("--cache-dir", type=Path, default=None, help="attack cache (default $DUOBENCH_HOME)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    method_options = json.loads(args.method_options)

    rows_by_method: list[dict] = []
    base = None
    for method in args.methods:
        started = time.perf_counter()
        config = RunConfig(method=method, concept="star", model="toy", device="cpu")
        config.method_options = method_options.get(method, {})
        context = prepare(config, base=base)
        base = context.base.pipe
        judge = build_judge(context.concept.judge)
        spec = context.concept.prompt_sets[args.prompt_set]
        rows = [row for row in load_prompt_set(spec).rows if row.meta.get("seed_index", 0) < args.seeds]
        prompt_set = PromptSet(args.prompt_set, rows)
        row = {"method": method, "train_s": round(time.perf_counter() - started, 1)}
        for attack in ["none", *args.attacks]:
            budget, options = TOY_BUDGETS.get(attack, (Budget(), {}))
            started = time.perf_counter()
            results = run_attack(
                attack,
                context.concept,
                context.target,
                context.base,
                prompt_set,
                budget,
                args.cache_dir,
                judge,
                options=options,
                settings=context.settings,
            )
            attack_seconds = time.perf_counter() - started
            row[attack] = star_rate(context.target.generator, judge, attack_work_items(results, context.settings))
            row[f"{attack}_s"] = round(attack_seconds, 1)
            print(f"{method:>8} {attack:<18} star rate {row[attack]:.2f}  ({attack_seconds:.1f} s)", flush=True)
        rows_by_method.append(row)

    print(f"\nstar rate, '{args.prompt_set}' prompts x {args.seeds} seeds (plain prompts = 'none'):")
    header = ["method", "none", *args.attacks]
    print(" | ".join(f"{h:>17}" for h in header))
    for row in rows_by_method:
        print(" | ".join([f"{row['method']:>17}"] + [f"{row[a]:>17.2f}" for a in header[1:]]))


if __name__ == "__main__":
    main()
