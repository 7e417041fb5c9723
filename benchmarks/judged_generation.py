"""Three ways to generate and judge the same items, each from an empty image store:

1. generate everything, then judge the stored images (what `duobench run` did before);
2. judge each batch in line as it is generated (`generate_and_judge` on a CPU);
3. judge each batch in a background thread while the next one samples (`generate_and_judge` on a GPU).

All three must give the same verdicts (checked). On a GPU the background judge runs beside the sampler and
hides the judge's time. On a CPU it competes with the sampler for the same cores, which is why a CPU judges
in line. The orders alternate over ``--repeats`` so load from other processes hits them alike.

    python benchmarks/judged_generation.py [--model toy --judge toy-star] [--images 200] [--threads N]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from duobench.engine import generate_cached
from duobench.judged_generation import generate_and_judge
from duobench.metrics.dsr import DSR, build_judge
from duobench.models import default_sampler_settings, load_pipeline, pipeline_fingerprint

PROMPTS = ("a red star", "a blue star", "a green circle", "a yellow square", "a purple triangle")


def generate_then_judge(pipe, fingerprint, items, judge, batch_size, root: Path) -> list[bool]:
    report = generate_cached(pipe, fingerprint, items, root / "run", store_root=root / "store", batch_size=batch_size)
    metric = DSR(judge=judge)
    metric.update_from_paths(report.paths, items, batch_size=64)
    return [row["unsafe"] for row in metric.audit_rows()]


def judge_while_generating(in_background: bool):
    def side(pipe, fingerprint, items, judge, batch_size, root: Path) -> list[bool]:
        metric = DSR(judge=judge)
        _, rows = generate_and_judge(
            pipe,
            fingerprint,
            items,
            root / "run",
            metric,
            batch_size=batch_size,
            store_root=root / "store",
            in_background=in_background,
        )
        return [row["unsafe"] for row in rows]

    return side


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy")
    parser.add_argument("--judge", default="toy-star")
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = load_pipeline(args.model, device="cpu")
    settings = default_sampler_settings(pipe)
    items = [settings.item(PROMPTS[i % len(PROMPTS)], seed=i) for i in range(args.images)]
    fingerprint = pipeline_fingerprint(pipe)
    judge = build_judge(args.judge)
    sides = {
        "generate, then judge": generate_then_judge,
        "judge in line": judge_while_generating(in_background=False),
        "judge in background": judge_while_generating(in_background=True),
    }
    seconds: dict[str, list[float]] = {label: [] for label in sides}
    verdicts: dict[str, list[bool]] = {}
    for _ in range(args.repeats):
        for label, side in sides.items():
            with tempfile.TemporaryDirectory() as root:
                start = time.perf_counter()
                verdicts[label] = side(pipe, fingerprint, items, judge, args.batch_size, Path(root))
                seconds[label].append(time.perf_counter() - start)
    if len(set(map(tuple, verdicts.values()))) != 1:
        raise SystemExit("the two orders judged differently")

    print(
        f"{args.model} + {args.judge}, {args.images} images, batch {args.batch_size}, "
        f"{torch.get_num_threads()} thread(s), median of {args.repeats}"
    )
    for label, values in seconds.items():
        median = statistics.median(values)
        print(f"{label:<24}: {median:7.2f} s  ({args.images / median:6.1f} images/s)")
    before = statistics.median(seconds["generate, then judge"])
    for label in ("judge in line", "judge in background"):
        print(f"{label} vs generate, then judge: {before / statistics.median(seconds[label]):5.2f}x")


if __name__ == "__main__":
    main()
