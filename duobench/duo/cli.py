"""``duobench duo``: DUO's own steps that have no place in the generic verbs (building the paired data)."""

from __future__ import annotations

import typer

duo_app = typer.Typer(
    help="DUO's paired data (unsafe images and their SDEdit-made safe partners).", no_args_is_help=True
)


@duo_app.command()
def data(
    concept: str = typer.Option("nudity", help="Concept name or YAML file (its duo_pairs recipe)."),
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", help="Base model that draws the pairs."),
    sub_concept: str = typer.Option("", help="One sub-concept (violence: blood, suffering, gun, horror)."),
    seed: int = typer.Option(0, help="First seed; every image's seed is recorded in the card."),
    batch_size: int = typer.Option(8, help="Images per sampler call."),
    device: str | None = typer.Option(None, help="cuda, cpu, ..."),
) -> None:
    """Build (or find cached) the paired data set for a concept, judged by its data judge."""
    from rich.console import Console

    from duobench.concepts import load_concept
    from duobench.duo.pairs import build_pair_set, sub_concepts
    from duobench.models import load_pipeline

    concept_data = load_concept(concept)
    pipe = load_pipeline(model, device=device)
    names = [sub_concept] if sub_concept else sub_concepts(concept_data)
    for name in names:
        pair_set = build_pair_set(pipe, concept_data, sub_concept=name, seed=seed, batch_size=batch_size)
        Console().print(f"{name or concept_data.name}: {len(pair_set)} pairs in {pair_set.folder}")
