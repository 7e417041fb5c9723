"""Engine vs the official scripts' loop, side by side in one run, on the same items of the same pipeline.

The naive loop is what the ESD/UCE/UnlearnDiffAtk evaluation scripts do: one pipeline call per prompt at
batch 1, a fresh generator per call, then save each PNG. The engine batches items with equal sampler
settings, encodes prompts in one pass and writes PNGs atomically into the content-addressed store.

    python benchmarks/generation.py [--model tiny-random|toy] [--items 256] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from duobench.engine import generate_cached
from duobench.items import WorkItem
from duobench.models import default_sampler_settings, load_pipeline, pipeline_fingerprint


def naive_loop(pipe, items: list[WorkItem], out_dir: Path) -> None:
    for index, item in enumerate(items):
        generator = torch.Generator("cpu").manual_seed(item.seed)
        image = pipe(
            item.prompt,
            negative_prompt=item.negative_prompt or None,
            guidance_scale=item.guidance,
            num_inference_steps=item.steps,
            height=item.height,
            width=item.width,
            generator=generator,
        ).images[0]
        image.save(out_dir / f"{index:05d}.png")


def work_items(pipe, count: int, steps: int) -> list[WorkItem]:
    """``count`` distinct prompts at the pipeline's native size and sampler, CFG 7.5."""
    settings = default_sampler_settings(pipe)
    return [
        WorkItem(
            prompt=f"a photo of object number {i}",
            seed=i,
            steps=steps,
            guidance=7.5,
            height=settings.height,
            width=settings.width,
            scheduler=settings.scheduler,
        )
        for i in range(count)
    ]


def naive_and_engine_seconds(pipe, items: list[WorkItem], batch_size: int | str) -> tuple[float, float]:
    """Seconds for the naive loop, then for the engine, on the same items, each writing into a fresh folder."""
    from duobench.generator import use_scheduler

    use_scheduler(pipe, items[0].scheduler)  # the naive loop samples with the same sampler
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        (scratch / "naive").mkdir()
        start = time.perf_counter()
        naive_loop(pipe, items, scratch / "naive")
        naive_seconds = time.perf_counter() - start

        start = time.perf_counter()
        generate_cached(
            pipe,
            pipeline_fingerprint(pipe),
            items,
            scratch / "run",
            store_root=scratch / "store",
            batch_size=batch_size,
        )
        engine_seconds = time.perf_counter() - start
    return naive_seconds, engine_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-random")
    parser.add_argument("--items", type=int, default=256)
    parser.add_argument("--batch-size", default="64")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    pipe = load_pipeline(args.model, device="cpu")
    items = work_items(pipe, args.items, args.steps)
    naive_seconds, engine_seconds = naive_and_engine_seconds(pipe, items, args.batch_size)

    print(
        f"model={args.model} items={args.items} steps={args.steps} size={items[0].height}px "
        f"threads={torch.get_num_threads()}"
    )
    print(f"naive loop (batch 1, one call per prompt): {args.items / naive_seconds:8.1f} images/s")
    print(f"duobench engine (batch {args.batch_size}):            {args.items / engine_seconds:8.1f} images/s")
    print(f"speed-up: {naive_seconds / engine_seconds:.1f}x")


if __name__ == "__main__":
    main()
