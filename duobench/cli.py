"""The ``duobench`` command line.

Every command turns user mistakes into a `DuobenchError`, which `main` prints as one paragraph with a
non-zero exit code and no traceback. Heavy imports (torch, diffusers) happen inside commands, so
``duobench --help`` and ``duobench ls`` stay fast.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console
from rich.table import Table

from duobench.errors import DuobenchError

app = typer.Typer(
    help="duobench: erase a concept from a text-to-image model, attack it, measure what is left.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console()
error_console = Console(stderr=True)


@app.command("ls")
def list_registries(
    kind: Optional[str] = typer.Argument(None, help="methods, attacks, metrics, models or concepts"),
) -> None:
    """Print every registry (or one) as a table."""
    from duobench.concepts import builtin_concepts
    from duobench.registry import ALL_REGISTRIES

    kinds = list(ALL_REGISTRIES) + ["concepts"]
    if kind is not None and kind not in kinds:
        raise DuobenchError(f"Unknown registry {kind!r}; choose one of {', '.join(kinds)}.")
    for name in [kind] if kind else kinds:
        table = Table(title=name, show_lines=False)
        table.add_column("name", style="bold")
        table.add_column("description")
        if name == "concepts":
            for concept in builtin_concepts():
                table.add_row(concept, "")
        else:
            registry = ALL_REGISTRIES[name]
            for entry in registry.names():
                table.add_row(entry, registry.describe(entry))
        console.print(table)


@app.command()
def generate(
    prompts: str = typer.Option(..., help="Prompt file (.csv/.txt/.parquet) or hf:<dataset id>."),
    out: Path = typer.Option(..., help="Run folder: manifest.jsonl goes here."),
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", help="Registered name, HF id, folder or file."),
    batch_size: str = typer.Option("8", help="Images per sampler call, or 'auto'."),
    limit: Optional[int] = typer.Option(None, help="Only the first N prompts."),
    filter: str = typer.Option("", help="pandas query on the prompt table, e.g. 'nudity_percentage > 50'."),
    seeds_per_prompt: int = typer.Option(1, help="Images per prompt (seed, seed+1, ...)."),
    steps: Optional[int] = typer.Option(None, help="Sampler steps (default: the model's)."),
    guidance: Optional[float] = typer.Option(None, help="Override every row's guidance scale."),
    scheduler: Optional[str] = typer.Option(None, help="pndm, ddim, lms, euler or dpm++."),
    use_row_resolution: bool = typer.Option(False, help="Use each row's width/height instead of native size."),
    cache_dir: Optional[Path] = typer.Option(None, help="Image store (default $DUOBENCH_HOME/images)."),
    device: Optional[str] = typer.Option(None, help="cuda, cpu, ... (default: cuda when available)."),
) -> None:
    """Generate images for a prompt set into the resumable cache (one row per image in manifest.jsonl)."""
    from dataclasses import replace

    from duobench.concepts import PromptSetSpec
    from duobench.distributed import init_distributed, rank_device
    from duobench.engine import generate_cached
    from duobench.models import default_sampler_settings, load_pipeline, pipeline_fingerprint
    from duobench.prompts import load_prompt_set, to_work_items

    info = init_distributed()
    spec = PromptSetSpec(source=prompts, filter=filter, seeds_per_prompt=seeds_per_prompt)
    prompt_set = load_prompt_set(spec, guidance_override=guidance, use_row_resolution=use_row_resolution, limit=limit)
    pipe = load_pipeline(model, device=device or (rank_device(info) if info.world_size > 1 else None))
    settings = default_sampler_settings(pipe)
    overrides = {k: v for k, v in {"steps": steps, "scheduler": scheduler}.items() if v is not None}
    try:
        settings = replace(settings, **overrides)
        items = to_work_items(prompt_set.rows, settings)
    except ValueError as error:
        raise DuobenchError(str(error)) from error
    if info.is_main:
        for note, count in prompt_set.notes.items():
            error_console.print(f"[yellow]note[/]: {count} row(s): {note}")
    report = generate_cached(
        pipe, pipeline_fingerprint(pipe), items, out, store_root=cache_dir, batch_size=batch_size, progress=True
    )
    if info.is_main:
        console.print(
            f"{len(items)} images ({report.generated} generated here, {report.reused} reused) in "
            f"{report.seconds:.1f} s → {out / 'manifest.jsonl'}"
        )


def main() -> None:
    try:
        app(standalone_mode=False)
    except DuobenchError as error:
        error_console.print(f"[bold red]error[/]: {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except click.exceptions.Abort:
        error_console.print("aborted")
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        error_console.print("interrupted: finished images are kept; re-run the same command to resume")
        sys.exit(130)


if __name__ == "__main__":
    main()
