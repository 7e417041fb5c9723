"""``duobench toy``: build the toy world from scratch, and check that the toy model draws what it is told."""

from __future__ import annotations

from pathlib import Path

import typer

toy_app = typer.Typer(
    help="The toy world: a tiny SD-architecture model of drawn shapes with an exact judge (runs on a CPU).",
    no_args_is_help=True,
)


@toy_app.command()
def build(
    out: Path | None = typer.Option(
        None, help="Output folder (default: the shipped duobench/toy/weights/, or weights_sd3/ with --family sd3)."
    ),
    seed: int = typer.Option(0, help="Seed of every stage; same seed, same weights."),
    detector_only: bool = typer.Option(
        False, "--detector-only", help="Train only the second detector (toy-star-2), about 3 minutes on 2 idle cores."
    ),
    family: str = typer.Option(
        "sd1",
        help="sd1: the toy world (judge, detector, VAE, UNet, CLIP). sd3: its SD3 counterpart (MMDiT transformer, "
        "CLIP-L + CLIP-G + T5, flow matching) on the SD1 toy's VAE, into duobench/toy/weights_sd3/.",
    ),
) -> None:
    """Train judge, second detector, VAE, UNet and text encoder from scratch (about 25 minutes on 2 idle CPU
    cores); with --family sd3, the SD3 toy model instead (about 40 minutes; it reuses the SD1 toy's VAE)."""
    from duobench.toy.build import BuildConfig, build_detector, build_toy_world

    if family not in ("sd1", "sd3"):
        raise typer.BadParameter(f"--family must be sd1 or sd3, not {family!r}")
    if family == "sd3":
        if detector_only:
            raise typer.BadParameter("--detector-only builds part of the SD1 toy world; leave out --family sd3")
        from duobench.toy.sd3_build import SD3BuildConfig, build_toy_sd3

        build_toy_sd3(out, SD3BuildConfig(seed=seed))
    elif detector_only:
        build_detector(out, BuildConfig(seed=seed))
    else:
        build_toy_world(out, BuildConfig(seed=seed))


@toy_app.command()
def check(
    model: str = typer.Option(
        "toy", help="Registered model name (toy, toy-sd3), or a folder `duobench toy build [--family sd3] --out` wrote."
    ),
    seeds: int = typer.Option(20, help="Images per prompt."),
    batch_size: int = typer.Option(64, help="Images per sampler call."),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (default: cuda when available)."),
) -> None:
    """Judge 5 shapes x 5 colours x SEEDS images and the star synonyms; exit 1 below the quality bar."""
    from duobench.toy.check import run_toy_check

    result = run_toy_check(model=model, seeds=seeds, batch_size=batch_size, device=device)
    if not result["passed"]:
        raise typer.Exit(code=1)
