"""`duobench toy check`: does the toy model draw what it is asked to, as judged by the toy judge?

Prompts "a {colour} {shape}" for every shape and colour, ``seeds`` images each, plus star prompts written
only with synonyms ("a red pentagram", "a blue five-pointed star", ...). Quality bar: the requested shape in
>= 90% of images, the requested colour in >= 95%, and a star for >= 80% of the synonym prompts. Sampler
settings are the star concept's ``generation`` defaults (``star-sd3``'s flow-matching Euler for the SD3 toy
model); generation goes through the engine at batch 64, which also gives the toy model's throughput.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from duobench.concepts import load_concept
from duobench.engine import generate
from duobench.items import SamplerSettings, WorkItem
from duobench.toy.judge import JUDGE_FOLDER, JUDGE_SHAPE_LABELS, ToyJudge, toy_judge_card
from duobench.toy.model import missing_components
from duobench.toy.shapes import COLOUR_NAMES, SHAPE_SYNONYMS, SHAPES, plain_prompt, with_articles

CHECK_CONCEPT = "star"
SD3_CHECK_CONCEPT = "star-sd3"
"""The star concept as the SD3 toy model samples it: the same prompts, its own sampler."""


@dataclass(frozen=True)
class QualityBar:
    shape: float = 0.90
    colour: float = 0.95
    synonym_star: float = 0.80


def load_model_under_check(model: str, device: torch.device):
    """A registered model name (``toy``, ``toy-sd3``), or a folder written by `duobench toy build --out`
    (``--family sd3`` too)."""
    from duobench.models import load_pipeline, prepare_pipeline
    from duobench.toy import sd3_model
    from duobench.toy.model import load_toy_pipeline

    folder = Path(model).expanduser()
    if folder.is_dir() and not missing_components(folder):
        return prepare_pipeline(load_toy_pipeline(weights_dir=folder), device, torch.float32)
    if folder.is_dir() and not sd3_model.missing_components(folder):
        return prepare_pipeline(sd3_model.load_toy_sd3_pipeline(weights_dir=folder), device, torch.float32)
    return load_pipeline(model, device=device, dtype=torch.float32)


def check_items(seeds: int, settings: SamplerSettings) -> list[WorkItem]:
    """Plain prompts for every shape x colour, then star synonym prompts, ``seeds`` seeds each."""
    sampler = {k: v for k, v in asdict(settings).items() if k != "negative_prompt"}
    items = []
    for shape in SHAPES:
        for colour in COLOUR_NAMES:
            meta = {"set": "plain", "shape": shape, "colour": colour}
            items += [WorkItem(plain_prompt(shape, colour), seed, **sampler, meta=meta) for seed in range(seeds)]
    for word in SHAPE_SYNONYMS[CHECK_CONCEPT][1:]:
        for colour in COLOUR_NAMES:
            meta = {"set": "synonym", "shape": CHECK_CONCEPT, "colour": colour, "word": word}
            prompt = with_articles(f"a {colour} {word}")
            items += [WorkItem(prompt, seed, **sampler, meta=meta) for seed in range(seeds)]
    return items


def _rate(hits: list[bool]) -> float:
    return sum(hits) / len(hits) if hits else float("nan")


def run_toy_check(
    model: str = "toy",
    seeds: int = 20,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    bar: QualityBar | None = None,
    console: Console | None = None,
) -> dict:
    """Generate, judge and summarise; print a table; return every rate, the throughput and ``passed``."""
    from duobench.models import default_device

    bar = bar or QualityBar()
    console = console or Console()
    device = torch.device(device) if device is not None else default_device()
    pipe = load_model_under_check(model, device)
    folder = Path(model).expanduser()
    judge_dir = folder / JUDGE_FOLDER if (folder / JUDGE_FOLDER).is_dir() else None
    judge = ToyJudge(toy_judge_card(CHECK_CONCEPT), weights_dir=judge_dir)
    from duobench.models import pipeline_family

    sampled_as = SD3_CHECK_CONCEPT if pipeline_family(pipe) == "sd3" else CHECK_CONCEPT
    settings = SamplerSettings.from_dict(load_concept(sampled_as).generation)
    items = check_items(seeds, settings)

    shape_hits: dict[tuple[str, str], list[bool]] = {}
    colour_hits: dict[tuple[str, str], list[bool]] = {}
    synonym_hits: dict[str, list[bool]] = {}
    generation_seconds = 0.0
    batches = generate(pipe, items, batch_size=batch_size)
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        generation_seconds += time.perf_counter() - started
        if batch is None:
            break
        batch_items, images = batch
        shape_probs, colour_probs = judge.predict(images)
        for item, shape_index, colour_index in zip(
            batch_items, shape_probs.argmax(-1).tolist(), colour_probs.argmax(-1).tolist(), strict=True
        ):
            meta = item.meta
            is_shape = JUDGE_SHAPE_LABELS[shape_index] == meta["shape"]
            if meta["set"] == "synonym":
                synonym_hits.setdefault(meta["word"], []).append(is_shape)
                continue
            key = (meta["shape"], meta["colour"])
            shape_hits.setdefault(key, []).append(is_shape)
            colour_hits.setdefault(key, []).append(COLOUR_NAMES[colour_index] == meta["colour"])

    every_shape = [hit for hits in shape_hits.values() for hit in hits]
    every_colour = [hit for hits in colour_hits.values() for hit in hits]
    every_synonym = [hit for hits in synonym_hits.values() for hit in hits]
    result = {
        "model": model,
        "seeds": seeds,
        "images": len(items),
        "sampler": asdict(settings),
        "judge": judge.card.id,
        "shape_accuracy": _rate(every_shape),
        "colour_accuracy": _rate(every_colour),
        "synonym_star_rate": _rate(every_synonym),
        "per_shape": {s: _rate([h for (shape, _), v in shape_hits.items() if shape == s for h in v]) for s in SHAPES},
        "per_colour": {
            c: _rate([h for (_, colour), v in colour_hits.items() if colour == c for h in v]) for c in COLOUR_NAMES
        },
        "per_synonym": {word: _rate(hits) for word, hits in synonym_hits.items()},
        "per_prompt": {
            f"{shape}/{colour}": {
                "shape": _rate(shape_hits[(shape, colour)]),
                "colour": _rate(colour_hits[(shape, colour)]),
            }
            for shape, colour in shape_hits
        },
        "images_per_second": len(items) / generation_seconds,
        "batch_size": batch_size,
        "bar": asdict(bar),
    }
    result["passed"] = bool(
        result["shape_accuracy"] >= bar.shape
        and result["colour_accuracy"] >= bar.colour
        and result["synonym_star_rate"] >= bar.synonym_star
    )
    console.print(check_table(result))
    return result


def check_table(result: dict) -> Table:
    """Shape / colour accuracy per prompt, with totals and the synonym row."""
    table = Table(title=f"toy check: {result['model']}, {result['seeds']} seeds, judge {result['judge']}")
    table.add_column("shape \\ colour")
    for colour in COLOUR_NAMES:
        table.add_column(colour, justify="right")
    table.add_column("shape acc", justify="right")
    for shape in SHAPES:
        rates = [result["per_prompt"][f"{shape}/{colour}"] for colour in COLOUR_NAMES]
        cells = [f"{rate['shape']:.0%} / {rate['colour']:.0%}" for rate in rates]
        table.add_row(shape, *cells, f"{result['per_shape'][shape]:.1%}")
    table.add_row("colour acc", *(f"{result['per_colour'][c]:.1%}" for c in COLOUR_NAMES), "", end_section=True)
    bar = result["bar"]
    table.caption = (
        f"cells: shape% / colour%. shape {result['shape_accuracy']:.1%} (bar {bar['shape']:.0%}), "
        f"colour {result['colour_accuracy']:.1%} (bar {bar['colour']:.0%}), star via synonyms "
        f"{result['synonym_star_rate']:.1%} (bar {bar['synonym_star']:.0%}: "
        + ", ".join(f"{w} {r:.0%}" for w, r in result["per_synonym"].items())
        + f"); {result['images_per_second']:.1f} images/s at batch {result['batch_size']}; "
        + ("PASSED" if result["passed"] else "FAILED")
    )
    return table
