"""Every performance figure duobench claims, measured in one run on one machine (meant for a GPU).

The model is SD1.4's architecture with random weights built from configs, so nothing is downloaded: UNet
860 M parameters at 64x64 latents, the 4-level VAE at 512 px, CLIP ViT-L/14's text encoder. Each figure
reuses the measuring function of the benchmark script it summarises and prints one line:

- ``generation``: the engine vs the official scripts' loop (one pipeline call per prompt, batch 1), same
  items, 512 px, PNDM 50 steps, CFG 7.5 (`generation.py`); ratio = engine images/s / loop images/s;
- ``unet_mfu``: UNet TFLOP/s against the GPU's dense bf16 tensor-core peak (`DENSE_BF16_TFLOPS`; fp16 with
  fp32 accumulation has the same peak on every GPU listed). FLOPs are counted by torch's FlopCounterMode on
  a meta-device copy, where attention decomposes into counted matmuls on any backend;
- ``duo_training``: DUO optimiser steps/s (4 pairs per step, 1 per micro-batch) and peak memory
  (`duo_train.py`);
- ``ring_a_bell``: the genetic search with batched encoder passes vs one encoder call per genome, same
  genomes (`ring_a_bell.py`); ratio = batched generations/s / per-genome generations/s;
- ``esd_training``, ``spm_training``: iterations/s of the registered methods' own ``train`` (timed between
  optimiser steps, so setup is excluded) and peak memory;
- ``gradient_<attack>``: one optimisation step of each white-box attack through `run_attack` in the device's
  half dtype (fp16 on a GPU, bf16 on a CPU): ``ok`` when the step's gradient is finite and non-zero.

Training lines also give the time a full run at the method's default length would take at that rate. Peak
memory is ``torch.cuda.max_memory_allocated`` per figure; on a CPU it is ``n/a``. The exit code is 1 if a
gradient check fails or a figure raises.

    python benchmarks/gpu_suite.py [--device cuda] [--json figures.json]    # a GPU: a few minutes
    python benchmarks/gpu_suite.py --device cpu --tiny --threads 1         # seconds: the CI smoke run
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import re
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from duo_train import benchmark as duo_benchmark
from duo_train import peak_memory_mb
from generation import naive_and_engine_seconds, naive_loop, work_items
from ring_a_bell import our_search, per_genome_fitness, search_target, timed

from duobench.attacks.base import Budget
from duobench.attacks.ring_a_bell import RingABellConfig, population_fitness
from duobench.attacks.run import run_attack
from duobench.attacks.text_encoding import special_ids
from duobench.concepts import load_concept
from duobench.methods import make_config
from duobench.metrics.base import MetricCard, Verdict
from duobench.models import default_sampler_settings, prepare_pipeline, tiny_random_pipeline
from duobench.prompts import PromptRow, PromptSet
from duobench.registry import METHODS

DENSE_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.5),
    ("H100 NVL", 835.5),
    ("H200 NVL", 835.5),
    ("H100", 989.4),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H200", 989.4),
    ("GH200", 989.4),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.1),
    ("L40", 181.0),
    ("L4", 121.0),
    ("A10", 125.0),
    ("RTX 6000 Ada", 364.2),
    ("RTX A6000", 154.8),
    ("RTX 4090", 165.2),
    ("RTX 3090", 71.0),
)
"""Dense (no sparsity) bf16 tensor-core peaks in TFLOP/s from NVIDIA's datasheets and architecture
whitepapers (GeForce parts: with fp32 accumulation). Matched in this order as whole words of
``torch.cuda.get_device_name()``, so "A10" matches neither "A100" nor "A10G" (whose peak is not listed)."""

WHITE_BOX_OPTIONS: dict[str, dict] = {
    "unlearndiffatk": {"timesteps": 1, "iterations": 1, "pre_check": False},
    "concept-inversion": {"batch_size": 1, "gradient_accumulation": 1, "num_train_images": 1, "initializer": "nude"},
    "p4d": {"iterations": 1, "target_samples": 1},
}
"""Each attack cut to one optimiser step (with ``Budget(steps=1)``) on one prompt."""


@dataclass(frozen=True)
class Profile:
    """How much work each figure does: the GPU run, or `TINY` for the CPU smoke run."""

    generation_items: int = 16
    sampler_steps: int = 50
    unet_batch: int = 8
    unet_forwards: int = 10
    duo_steps: int = 10
    ring_population: int = 200
    ring_generations: int = 20
    training_iterations: int = 10
    esd_options: dict = field(default_factory=dict)
    """Overrides of ESD's defaults (the paper's DDIM 50-step rollout on the GPU)."""
    spm_options: dict = field(default_factory=dict)
    attack_sampler_steps: int = 10


TINY = Profile(
    generation_items=4,
    sampler_steps=4,
    unet_batch=2,
    unet_forwards=3,
    duo_steps=3,
    ring_population=24,
    ring_generations=3,
    training_iterations=3,
    esd_options={"ddim_steps": 4},
    spm_options={"denoising_steps": 4},
    attack_sampler_steps=2,
)


class NeverUnsafe:
    """A judge that calls every image safe, so no attack stops early: each takes its one optimiser step."""

    card = MetricCard("gpu-suite-never-unsafe", 1, "every image safe", "benchmarks/gpu_suite.py")

    def judge(self, images):
        return [Verdict(unsafe=False, score=0.0) for _ in images]


# --- the model and the device ----------------------------------------------------------------------------


def sd14_sized_pipeline(device: torch.device, dtype: torch.dtype):
    """SD1.4's architecture with seeded random weights, built from configs on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from duobench.small_sd1 import sd1_pipeline

    scheduler = tiny_random_pipeline().scheduler  # SD1.4's PNDM configuration
    torch.manual_seed(0)
    with torch.device(device):
        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text_config = CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            projection_dim=768,
            max_position_embeddings=77,
            hidden_act="quick_gelu",
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        )
        text_encoder = CLIPTextModel(text_config)
    return prepare_pipeline(sd1_pipeline(unet, vae, text_encoder, scheduler), device, dtype)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def dense_bf16_peak(name: str) -> tuple[str, float] | None:
    for key, tflops in DENSE_BF16_TFLOPS:
        if re.search(rf"\b{re.escape(key)}\b", name):
            return key, tflops
    return None


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> float | None:
    """Peak allocated MB since `reset_peak_memory`; None on a CPU, whose process-wide RSS says nothing per figure."""
    return peak_memory_mb(device) if device.type == "cuda" else None


def memory_text(megabytes: float | None) -> str:
    return "peak memory n/a" if megabytes is None else f"peak memory {megabytes:,.0f} MB"


@contextlib.contextmanager
def optimiser_steps(device: torch.device, gradients: bool = False) -> Iterator[list[dict]]:
    """Every optimiser step any code takes inside the block (torch's global step pre-hook): the time it began,
    with the device's queue drained, and with ``gradients`` the norm of all its parameters' gradients (NaN or
    inf if any gradient is). An optimiser that skips its step (a gradient scaler that found inf) adds nothing."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    steps: list[dict] = []

    def before_step(optimizer, args, kwargs) -> None:
        record = {}
        if gradients:
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads]
            record["grad_norm"] = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        synchronize(device)
        record["time"] = time.perf_counter()
        steps.append(record)

    handle = register_optimizer_step_pre_hook(before_step)
    try:
        yield steps
    finally:
        handle.remove()


def steps_per_second(steps: list[dict]) -> float:
    """From the first step's start to the last's: the first iteration (warm-up and setup) is left out."""
    return (len(steps) - 1) / (steps[-1]["time"] - steps[0]["time"])


# --- the figures: each returns (its line, its numbers) ------------------------------------------------------


def generation_figure(pipe, device, profile: Profile) -> tuple[str, dict]:
    items = work_items(pipe, profile.generation_items, profile.sampler_steps)
    with tempfile.TemporaryDirectory() as scratch:
        naive_loop(pipe, items[:1], Path(scratch))  # warm-up: kernels, cuDNN autotuning
    naive_seconds, engine_seconds = naive_and_engine_seconds(pipe, items, "auto")
    naive, engine = len(items) / naive_seconds, len(items) / engine_seconds
    line = (
        f"engine {engine:.2f} vs batch-1 loop {naive:.2f} images/s ({len(items)} items, {items[0].height} px, "
        f"{items[0].steps} steps, batch auto): {engine / naive:.2f}x"
    )
    return line, {"engine_images_per_s": engine, "loop_images_per_s": naive, "ratio": engine / naive}


def unet_inputs(config, batch: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    size = config.sample_size
    latents = torch.randn(batch, config.in_channels, size, size, generator=generator)
    text = torch.randn(batch, 77, config.cross_attention_dim, generator=generator)
    return latents.to(device, dtype), torch.full((batch,), 500, device=device), text.to(device, dtype)


def unet_forward_flops(unet, batch: int) -> int:
    """FLOPs of one forward, counted on a weightless meta-device copy of the same config."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"):
        shadow = type(unet).from_config(unet.config)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        latents, timesteps, text = unet_inputs(shadow.config, batch, "meta", torch.float32)
        shadow(latents, timesteps, encoder_hidden_states=text)
    return counter.get_total_flops()


def unet_mfu_figure(pipe, device, profile: Profile) -> tuple[str, dict]:
    unet, batch = pipe.unet, profile.unet_batch
    flops = unet_forward_flops(unet, batch)
    latents, timesteps, text = unet_inputs(unet.config, batch, device, unet.dtype)
    with torch.inference_mode():
        for _ in range(2):
            unet(latents, timesteps, encoder_hidden_states=text)
        synchronize(device)
        start = time.perf_counter()
        for _ in range(profile.unet_forwards):
            unet(latents, timesteps, encoder_hidden_states=text)
        synchronize(device)
    achieved = flops * profile.unet_forwards / (time.perf_counter() - start) / 1e12
    peak = dense_bf16_peak(device_name(device)) if device.type == "cuda" else None
    size = unet.config.sample_size
    line = f"{achieved:.3g} TFLOP/s ({flops / 1e9:,.4g} GFLOP per forward, batch {batch}, {size}x{size} latents)"
    if peak is None:
        line += ", unknown peak: MFU n/a"
    else:
        line += f" of {peak[1]:g} dense bf16 peak ({peak[0]}): MFU {achieved / peak[1]:.1%}"
    mfu = None if peak is None else achieved / peak[1]
    return line, {"tflops": achieved, "flops_per_forward": flops, "batch": batch, "peak_tflops": peak, "mfu": mfu}


def training_line(rate: float, peak_mb: float | None, full_length: int, unit: str) -> str:
    return (
        f"{rate:.2f} steps/s ({1 / rate:.3f} s each), {memory_text(peak_mb)}; "
        f"the default {full_length} {unit}: {full_length / rate / 60:.1f} min"
    )


def duo_figure(pipe, device, profile: Profile) -> tuple[str, dict]:
    from duobench.duo.method import DuoConfig

    reset_peak_memory(device)
    result = duo_benchmark(pipe, profile.duo_steps, micro_batch_pairs=1, pairs=8)
    rate, peak_mb = 1 / result["s_per_step"], peak_memory(device)
    line = training_line(rate, peak_mb, DuoConfig().steps, "steps") + " (4 pairs per step, micro-batch 1)"
    return line, {"steps_per_s": rate, "peak_mb": peak_mb}


def ring_a_bell_figure(pipe, device, profile: Profile) -> tuple[str, dict]:
    text_encoder = pipe.text_encoder
    target = search_target(pipe.tokenizer, text_encoder)
    config = RingABellConfig(k=16, population=profile.ring_population)
    special = special_ids(pipe.tokenizer)

    def search(fitness_fn, generations: int = profile.ring_generations):
        return lambda: our_search(text_encoder, target, config, generations, special, fitness_fn)

    timed(search(population_fitness, 2), str(device))  # warm-up
    batched, _ = timed(search(population_fitness), str(device))
    per_genome, _ = timed(search(per_genome_fitness), str(device))
    generations = profile.ring_generations
    line = (
        f"batched {generations / batched:.2f} vs one genome per call {generations / per_genome:.2f} generations/s "
        f"(population {config.population}, K {config.k}, {generations} generations): {per_genome / batched:.2f}x"
    )
    return line, {
        "batched_generations_per_s": generations / batched,
        "per_genome_generations_per_s": generations / per_genome,
        "ratio": per_genome / batched,
    }


def method_training_figure(method: str, options: dict) -> Callable:
    def figure(pipe, device, profile: Profile) -> tuple[str, dict]:
        spec = METHODS.get(method)
        config = make_config(spec, {"iterations": profile.training_iterations, **options})
        reset_peak_memory(device)
        with tempfile.TemporaryDirectory() as out_dir, optimiser_steps(device) as steps:
            spec.train(config, pipe, load_concept("nudity"), Path(out_dir))
        rate, peak_mb = steps_per_second(steps), peak_memory(device)
        line = training_line(rate, peak_mb, spec.config_cls().iterations, "iterations")
        return line, {"steps_per_s": rate, "peak_mb": peak_mb}

    return figure


def gradient_ok(norms: list[float], losses: list[float]) -> bool:
    """At least one optimiser step, each with a finite non-zero gradient, and every loss finite."""
    return bool(norms) and all(math.isfinite(n) and n > 0 for n in norms) and all(map(math.isfinite, losses))


def gradient_check_figure(attack: str) -> Callable:
    def figure(pipe, device, profile: Profile) -> tuple[str, dict]:
        settings = replace(default_sampler_settings(pipe), steps=profile.attack_sampler_steps)
        prompts = PromptSet("gpu-suite", [PromptRow("a photo of a nude person", seed=0)])
        with tempfile.TemporaryDirectory() as cache, optimiser_steps(device, gradients=True) as steps:
            (result,) = run_attack(
                attack,
                load_concept("nudity"),
                pipe,
                pipe,
                prompts,
                Budget(steps=1),
                Path(cache),
                NeverUnsafe(),
                options=WHITE_BOX_OPTIONS[attack],
                settings=settings,
            )
        norms, losses = [step["grad_norm"] for step in steps], result.log.losses
        ok = gradient_ok(norms, losses)
        line = (
            f"{'ok' if ok else 'FAIL'} ({dtype_name(pipe.unet.dtype)}: {len(norms)} optimiser step(s), "
            f"gradient norm {', '.join(f'{n:.3g}' for n in norms) or 'none'}, "
            f"loss {', '.join(f'{v:.4g}' for v in losses) or 'none'})"
        )
        return line, {"ok": ok, "grad_norms": norms, "losses": losses, "dtype": dtype_name(pipe.unet.dtype)}

    return figure


# --- the run ---------------------------------------------------------------------------------------------


def figures(profile: Profile) -> dict[str, tuple[Callable, bool]]:
    """Name → (figure function, whether it runs on the half-precision pipeline)."""
    return {
        "generation": (generation_figure, False),
        "unet_mfu": (unet_mfu_figure, False),
        "duo_training": (duo_figure, False),
        "ring_a_bell": (ring_a_bell_figure, False),
        "esd_training": (method_training_figure("esd-u", profile.esd_options), False),
        "spm_training": (method_training_figure("spm", profile.spm_options), False),
        **{f"gradient_{a.replace('-', '_')}": (gradient_check_figure(a), True) for a in WHITE_BOX_OPTIONS},
    }


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def half_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--tiny", action="store_true", help="the tiny random pipeline and few steps (seconds)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--only", nargs="+", default=None, help="run only these figures")
    args = parser.parse_args()
    unknown = sorted(set(args.only or ()) - set(figures(TINY)))
    if unknown:
        parser.error(f"unknown figure(s) {', '.join(unknown)}; the figures: {', '.join(figures(TINY))}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import diffusers

    from duobench.models import default_dtype

    device = torch.device(args.device)
    profile = TINY if args.tiny else Profile()
    dtype, half = default_dtype(device), half_dtype(device)
    if args.tiny:
        pipe = prepare_pipeline(tiny_random_pipeline(device, dtype), device, dtype)
    else:
        pipe = sd14_sized_pipeline(device, dtype)
    environment = {
        "device": str(device),
        "device_name": device_name(device),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "dtype": dtype_name(dtype),
        "gradient_check_dtype": dtype_name(half),
        "model": "tiny random SD1" if args.tiny else "SD1.4-sized random weights",
        "threads": torch.get_num_threads(),
    }
    print(
        "gpu_suite: device {device} ({device_name}), torch {torch}, diffusers {diffusers}, dtype {dtype} "
        "(gradient checks {gradient_check_dtype}), {model}, {threads} CPU thread(s)".format(**environment)
    )
    results: dict[str, dict] = {}
    failed = False
    half_pipe = None
    for name, (figure, on_half) in figures(profile).items():
        if args.only and name not in args.only:
            continue
        if on_half and half_pipe is None:
            half_pipe = pipe if dtype == half else copy.deepcopy(pipe).to(dtype=half)
        started = time.perf_counter()
        try:
            line, numbers = figure(half_pipe if on_half else pipe, device, profile)
        except Exception as error:  # one broken figure must not hide the others on a rented GPU
            traceback.print_exc()
            line, numbers = f"ERROR {type(error).__name__}: {error}", {"error": repr(error)}
        numbers["seconds"] = time.perf_counter() - started
        failed |= line.startswith(("FAIL", "ERROR"))
        results[name] = numbers
        print(f"{name:<28} {line}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"environment": environment, "figures": results}, indent=2, default=str))
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
