"""DUO's training step: optimiser steps per second and peak memory, on the tiny random pipeline and the toy.

The pairs are random images at the model's native size, encoded by its VAE: the step's cost does not depend
on what the images show. One optimiser step is ``pairs_per_step`` pairs (4, as the official 4-GPU run); each
micro-batch runs the LoRA model and the reference on 3 × micro-batch inputs (x⁻_t, x⁺_t', pure noise). The
first step is excluded from the rate (warm-up).

    python benchmarks/duo_train.py [--models tiny-random toy] [--steps 10] [--micro-batch-pairs 1 4] [--threads 1]

On a shared CPU, small models run far faster on one thread: with two, every op waits at OpenMP's barrier
for the thread whose core another process holds.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler

from duobench.duo.loss import encode_pairs, train_lora
from duobench.duo.method import DuoConfig
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.models import load_pipeline


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def benchmark(pipe, steps: int, micro_batch_pairs: int, pairs: int) -> dict[str, float]:
    device = pipe.unet.device
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    generator = torch.Generator().manual_seed(0)
    unsafe, safe = (torch.rand(pairs, 3, size, size, generator=generator) * 2 - 1 for _ in range(2))
    latents = encode_pairs(pipe.vae, unsafe, safe)
    null_embedding = encode_token_ids(pipe, tokenize(pipe, [""]))
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    config = DuoConfig(steps=steps, micro_batch_pairs=micro_batch_pairs, checkpoint_every=steps)
    times: list[float] = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    with tempfile.TemporaryDirectory() as out_dir:
        train_lora(
            pipe.unet,
            scheduler,
            latents,
            null_embedding,
            config,
            Path(out_dir),
            lambda *_: times.append(time.perf_counter()),
        )
    seconds_per_step = (times[-1] - times[0]) / (len(times) - 1)
    return {"resolution": size, "s_per_step": seconds_per_step, "peak_mb": peak_memory_mb(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-random", "toy"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--micro-batch-pairs", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    print(f"torch threads: {torch.get_num_threads()}; pairs_per_step 4 (the official effective batch)")
    print(f"{'model':<12} {'res':>4} {'micro':>5} {'accum':>5} {'s/step':>8} {'steps/s':>8} {'peak MB':>8}")
    for model in args.models:
        try:
            pipe = load_pipeline(model)
        except DuobenchError as error:
            print(f"{model:<12} skipped: {error}")
            continue
        for micro in args.micro_batch_pairs:
            result = benchmark(pipe, args.steps, micro, args.pairs)
            print(
                f"{model:<12} {result['resolution']:>4} {micro:>5} {4 // micro:>5} "
                f"{result['s_per_step']:>8.3f} {1 / result['s_per_step']:>8.2f} {result['peak_mb']:>8.0f}"
            )


if __name__ == "__main__":
    main()
