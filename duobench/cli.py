"""The ``duobench`` command line.

Every command turns user mistakes into a `DuobenchError`, which `main` prints as one paragraph with a
non-zero exit code and no traceback. Heavy imports (torch, diffusers) happen inside commands, so
``duobench --help`` and ``duobench ls`` stay fast.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

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


@app.callback()
def global_options(
    threads: int | None = typer.Option(
        None,
        envvar="DUOBENCH_THREADS",
        min=1,
        help="torch CPU threads (default: torch's, one per core). On a shared CPU, 1 avoids threads waiting "
        "on each other; results trained on a CPU can depend on it (float summation order).",
    ),
    quiet: bool = typer.Option(
        False, "--quiet", "-q", help="No progress and no info lines on stderr: warnings and errors only."
    ),
    log_level: str = typer.Option(
        "info",
        envvar="DUOBENCH_LOG_LEVEL",
        help="duobench's log level: debug, info, warning or error. Progress shows at info and below: a bar on "
        "a terminal, a log line every 10% elsewhere.",
    ),
) -> None:
    """duobench: erase a concept from a text-to-image model, attack it, measure what is left."""
    configure_logging("warning" if quiet else log_level)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by torchrun / accelerate launch
        from duobench.distributed import init_distributed

        info = init_distributed()  # pins this rank's GPU, so the default device "cuda" is this rank's
        console.quiet = not info.is_main  # one copy of every result line, from rank 0
    if threads is not None:
        import torch

        torch.set_num_threads(threads)


LOG_LEVELS = {"debug": 10, "info": 20, "warning": 30, "error": 40}
LOG_HANDLER = "duobench"


def configure_logging(level: str) -> None:
    """Send duobench's log records (and any library's warnings) to stderr; the one place logging is set up.

    Called once per command by the app callback; calling it again replaces its handler rather than adding a
    second one. On a terminal the handler writes through `duobench.progress.console`, so log lines scroll
    above the progress bars; elsewhere (CI, a file) it writes plain timestamped lines. Under torchrun, ranks
    other than 0 log warnings and errors only.
    """
    import logging

    from duobench.progress import console

    if level.lower() not in LOG_LEVELS:
        raise typer.BadParameter(f"choose one of {', '.join(LOG_LEVELS)}; got {level!r}", param_hint="--log-level")
    numeric = LOG_LEVELS[level.lower()]
    rank = int(os.environ.get("RANK", "0"))  # as duobench.distributed reads it, without importing torch here
    if rank != 0:
        numeric = max(numeric, logging.WARNING)
    if console.is_terminal:
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
        prefix = f"[rank {rank}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        handler.setFormatter(logging.Formatter(f"%(asctime)s %(levelname)s {prefix}%(message)s", "%H:%M:%S"))
    handler.set_name(LOG_HANDLER)
    if numeric > logging.INFO:  # --quiet: also the hub's and transformers' download / loading bars
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    root = logging.getLogger()
    for old in [h for h in root.handlers if h.get_name() == LOG_HANDLER]:
        root.removeHandler(old)
    root.addHandler(handler)
    logging.getLogger("duobench").setLevel(numeric)


@app.command("ls")
def list_registries(
    kind: str | None = typer.Argument(None, help="methods, attacks, metrics, models or concepts"),
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
        elif name == "metrics":
            table.add_column("card")
            table.add_column("kind")
            registry = ALL_REGISTRIES[name]
            for entry in registry.names():
                preset = registry.get(entry)
                card = getattr(preset, "card", None)
                table.add_row(entry, registry.describe(entry), card.id if card else "", getattr(preset, "kind", ""))
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
    limit: int | None = typer.Option(None, help="Only the first N prompts."),
    filter: str = typer.Option("", help="pandas query on the prompt table, e.g. 'nudity_percentage > 50'."),
    seeds_per_prompt: int = typer.Option(1, help="Images per prompt (seed, seed+1, ...)."),
    steps: int | None = typer.Option(None, help="Sampler steps (default: the model's)."),
    guidance: float | None = typer.Option(None, help="Override every row's guidance scale."),
    scheduler: str | None = typer.Option(None, help="pndm, ddim, lms, euler or dpm++."),
    use_row_resolution: bool = typer.Option(False, help="Use each row's width/height instead of native size."),
    cache_dir: Path | None = typer.Option(None, help="Image store (default $DUOBENCH_HOME/images)."),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (default: cuda when available)."),
    concept: str | None = typer.Option(None, help="Sample with this concept's protocol settings (its YAML)."),
    judge: str | None = typer.Option(
        None, help="Judge every image while generating, e.g. nudenet-duo or q16 (`duobench ls metrics`)."
    ),
) -> None:
    """Generate images for a prompt set into the resumable cache (one row per image in manifest.jsonl);
    with --judge, also judge them and write judgments.csv and judge_summary.json."""
    from dataclasses import replace

    from duobench.concepts import PromptSetSpec, load_concept
    from duobench.distributed import process_info, rank_device
    from duobench.models import default_sampler_settings, load_pipeline, pipeline_fingerprint
    from duobench.prompts import load_prompt_set, to_work_items

    info = process_info()
    spec = PromptSetSpec(source=prompts, filter=filter, seeds_per_prompt=seeds_per_prompt)
    prompt_set = load_prompt_set(spec, guidance_override=guidance, use_row_resolution=use_row_resolution, limit=limit)
    metric = _judge_metric(judge) if judge else None
    concept_data = load_concept(concept) if concept else None  # bad names fail before the model loads
    if concept_data is not None:
        from duobench.run_config import check_model_family

        check_model_family(concept_data, model)
    pipe = load_pipeline(model, device=device or (rank_device(info) if info.world_size > 1 else None))
    settings = default_sampler_settings(pipe, concept_data)
    overrides = {k: v for k, v in {"steps": steps, "scheduler": scheduler}.items() if v is not None}
    try:
        settings = replace(settings, **overrides)
        items = to_work_items(prompt_set.rows, settings)
    except ValueError as error:
        raise DuobenchError(str(error)) from error
    if info.is_main:
        for note, count in prompt_set.notes.items():
            error_console.print(f"[yellow]note[/]: {count} row(s): {note}")
    report, rows = _generate(pipe, pipeline_fingerprint(pipe), items, out, cache_dir, batch_size, metric)
    if metric is not None:
        from duobench.metrics.base import sync_state

        sync_state(metric)  # each rank judged its share
    if info.is_main:
        console.print(
            f"{len(items)} images ({report.generated} generated here, {report.reused} reused) in "
            f"{report.seconds:.1f} s → {out / 'manifest.jsonl'}"
        )
        if metric is not None:
            from duobench.report import write_judgments

            console.print(write_judgments(out, metric, rows))


def _is_main_rank() -> bool:
    """Whether this process writes the command's files: always, except on the ranks > 0 of a torchrun job."""
    return int(os.environ.get("RANK", "0")) == 0


def _judge_metric(judge: str):
    """DSR over the generated images with ``judge``: its safe share and the unsafe rate, with a CI."""
    from duobench.metrics.dsr import DSR, build_judge

    return DSR(judge=build_judge(judge))


def _generate(pipe, fingerprint, items, out, cache_dir, batch_size, metric):
    from duobench.engine import generate_cached
    from duobench.judged_generation import generate_and_judge

    if metric is None:
        return generate_cached(pipe, fingerprint, items, out, cache_dir, batch_size, progress=True), []
    return generate_and_judge(pipe, fingerprint, items, out, metric, batch_size, cache_dir, progress=True)


def _int_list(text: str, option: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise DuobenchError(f"{option} takes comma-separated integers, e.g. 0,1,2; got {text!r}.") from error


def parse_options(pairs: list[str] | None) -> dict:
    """``["beta=500", "steps=10"]`` → ``{"beta": 500, "steps": 10}`` (values parsed as YAML scalars)."""
    import yaml

    options = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise DuobenchError(f"Option {pair!r} must look like key=value, e.g. beta=500.")
        options[key.strip().replace("-", "_")] = yaml.safe_load(value)
    return options


def extra_flag_options(args: list[str]) -> dict:
    """Method options written as flags after the known ones: ``--beta 500 --steps 10``."""
    pairs, index = [], 0
    while index < len(args):
        flag = args[index]
        if not flag.startswith("--") or index + 1 >= len(args):
            raise DuobenchError(f"Cannot read the method option {flag!r}; write method options as --name value.")
        pairs.append(f"{flag[2:]}={args[index + 1]}")
        index += 2
    return parse_options(pairs)


CONCEPT_HELP = "Concept name or YAML file (default: the model's own, star for --model toy; else nudity)."
RUN_HELP = {
    "method": "Unlearning method (`duobench ls methods`), or 'none' for the base model.",
    "attack": "Attack (`duobench ls attacks`); 'none' = the concept's plain prompts.",
}


@app.command()
def run(
    method: str | None = typer.Option(None, help=RUN_HELP["method"]),
    attack: str | None = typer.Option(None, help=RUN_HELP["attack"]),
    concept: str | None = typer.Option(None, help=CONCEPT_HELP),
    model: str | None = typer.Option(None, help="Model: registered name, HF id, folder or file."),
    strength: float | None = typer.Option(None, help="Method strength in [0, 1] (default 1)."),
    sweep: list[str] | None = typer.Option(
        None, help="Curve: strength=0,0.5,1, guidance=1,3,7.5 or any numeric method option (beta=250,500)."
    ),
    method_opt: list[str] | None = typer.Option(None, help="Method option key=value (repeatable)."),
    attack_opt: list[str] | None = typer.Option(None, help="Attack option key=value (repeatable)."),
    guard: str | None = typer.Option(None, help="A guard in front of or behind the model (`duobench ls guards`)."),
    guard_opt: list[str] | None = typer.Option(None, help="Guard option key=value (repeatable)."),
    prompt_set: str | None = typer.Option(None, help="Which of the concept's prompt sets."),
    limit: int | None = typer.Option(None, help="Only the first N prompts (x seeds)."),
    benign_limit: int | None = typer.Option(None, help="Only the first N benign prompts."),
    attack_steps: int | None = typer.Option(None, help="Attack budget: optimisation steps."),
    attack_queries: int | None = typer.Option(None, help="Attack budget: black-box queries."),
    fid_reference: str | None = typer.Option(
        None,
        help="FID reference: real images (a folder, a clean-fid .npz, coco-val2014, toy-shapes) or 'base' "
        "(drift from the base model's images, under its own card id). Default: the concept's.",
    ),
    guidance: float | None = typer.Option(
        None, help="Evaluate the attack and pre-attack images at this CFG scale (default: the prompt rows')."
    ),
    batch_size: str | None = typer.Option(None, help="Generation batch size or 'auto'."),
    device: str | None = typer.Option(None, help="cuda, cpu, ..."),
    out: Path | None = typer.Option(None, help="Output folder (default runs/latest)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with any of these options."),
) -> None:
    """Erase, attack, generate, judge, measure: one summary row (and a curve with --sweep)."""
    from duobench.report import print_summary
    from duobench.run_config import resolve_run_config

    run_config, values = resolve_run_config(
        config,
        {
            "method": method,
            "attack": attack,
            "concept": concept,
            "model": model,
            "strength": strength,
            "method_options": parse_options(method_opt),
            "attack_options": parse_options(attack_opt),
            "guard": guard,
            "guard_options": parse_options(guard_opt),
            "prompt_set": prompt_set,
            "limit": limit,
            "benign_limit": benign_limit,
            "attack_steps": attack_steps,
            "attack_queries": attack_queries,
            "fid_reference": fid_reference,
            "guidance": guidance,
            "batch_size": batch_size,
            "device": device,
            "out": str(out) if out else None,
            "sweep": sweep,
        },
    )
    sweeps = values.get("sweep") or []
    if not sweeps:
        from duobench.runner import run as run_once

        summary = run_once(run_config)
        print_summary([summary])
        if not _is_main_rank():
            return
        from duobench.browse import link_run_images

        counts = link_run_images(Path(run_config.out))
        console.print(f"results in {run_config.out}/ (summary.json, summary.csv, audit.parquet, contact_sheet.png)")
        console.print(f"images in {run_config.out}/images/: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
        return
    from duobench.curves import parse_sweep, write_curve
    from duobench.curves import sweep as run_sweep
    from duobench.stages import StageCache

    stages, points = StageCache(), []
    for spec in sweeps:
        knob, knob_values = parse_sweep(spec)
        points += run_sweep(run_config, knob, knob_values, stages)
    out_dir = Path(run_config.out)
    if not _is_main_rank():
        return
    write_curve(
        points,
        out_dir / "curve.csv",
        out_dir / "curve.png",
        title=f"{run_config.method} on {run_config.concept} ({run_config.model})",
    )
    print_summary(points)
    console.print(f"curve: {out_dir / 'curve.csv'} and {out_dir / 'curve.png'}")
    from duobench.browse import link_run_images

    for point in sorted({summary.parent for summary in out_dir.glob("*=*/summary.json")}):
        link_run_images(point)  # each curve point's images under <out>/<knob>=<value>/images/


@app.command()
def leaderboard(
    concept: str | None = typer.Option(None, help="Concept name or YAML file."),
    methods: str = typer.Option("none,duo,esd-u,uce,spm", help="Comma-separated methods ('none' = base model)."),
    attacks: str = typer.Option("none,ring-a-bell", help="Comma-separated attacks."),
    guards: str = typer.Option("none", help="Comma-separated guards: every cell once per guard ('none': unguarded)."),
    model: str | None = typer.Option(None, help="Model: registered name, HF id, folder or file."),
    limit: int | None = typer.Option(None, help="Only the first N prompts (x seeds)."),
    benign_limit: int | None = typer.Option(None, help="Only the first N benign prompts."),
    attack_steps: int | None = typer.Option(None, help="Attack budget: optimisation steps."),
    sweep: str | None = typer.Option(None, help="Also draw curves, e.g. strength=0,0.5,1."),
    folder: Path = typer.Option(Path("leaderboards"), help="Where the CSV and Markdown go."),
    out: Path | None = typer.Option(None, help="Run folders (default runs/leaderboard)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with run options."),
    check: Path | None = typer.Option(None, help="Verify a published CSV instead of running the grid."),
    training_seeds: str | None = typer.Option(
        None, help="Train each stochastic method once per seed, e.g. 0,1,2: rows per seed plus mean ± sd."
    ),
    shard: str | None = typer.Option(
        None,
        help="Run only shard i of n (i/n, from 0), as one job of a Slurm array or any scheduler; then --merge.",
    ),
    merge: bool = typer.Option(
        False, "--merge", help="Write the leaderboard from the cells the --shard jobs ran (no model loads)."
    ),
) -> None:
    """Run the (method x attack) grid and write leaderboards/<model>-<concept>.csv (+ .md), or --check one.
    Under torchrun every cell uses all ranks; on a cluster, --shard i/n jobs then one --merge."""
    from duobench.leaderboard import (
        check_leaderboard,
        leaderboard_path,
        merge_grid,
        parse_shard,
        run_grid,
        write_leaderboard,
    )
    from duobench.report import print_summary
    from duobench.run_config import resolve_run_config
    from duobench.stages import StageCache

    if check is not None:
        verdicts = check_leaderboard(check)
        failed = False
        for verdict in verdicts:
            status = (
                ("provenance: " + "; ".join(verdict["problems"]))
                if verdict["problems"]
                else (
                    ("recomputed: match" if verdict["matches"] else f"recomputed: MISMATCH {verdict['differences']}")
                    if verdict["recomputed"]
                    else verdict.get("note", "provenance ok")
                )
            )
            failed |= bool(verdict["problems"]) or verdict["matches"] is False
            console.print(f"{verdict['system']:>10} x {verdict['attack']:<14} {status}")
        recomputed = sum(bool(verdict["recomputed"]) for verdict in verdicts)
        matched = sum(verdict["matches"] is True for verdict in verdicts)
        console.print(f"{recomputed} of {len(verdicts)} rows recomputed, {matched} matched")
        if recomputed == 0:  # provenance alone proves nothing about the numbers
            error_console.print(
                "no row could be recomputed here (no method artifact present): nothing was checked", soft_wrap=True
            )
        raise typer.Exit(1 if failed or recomputed == 0 else 0)
    run_config, _ = resolve_run_config(
        config,
        {
            "concept": concept,
            "model": model,
            "limit": limit,
            "benign_limit": benign_limit,
            "attack_steps": attack_steps,
            "out": str(out or Path("runs/leaderboard")),
        },
    )
    stages = StageCache()
    method_list = [m.strip() for m in methods.split(",") if m.strip()]
    attack_list = [a.strip() for a in attacks.split(",") if a.strip()]
    guard_list = [g.strip() for g in guards.split(",") if g.strip()] or ["none"]
    seeds = _int_list(training_seeds, "--training-seeds") if training_seeds else None
    if shard and (merge or sweep):
        raise DuobenchError("--shard runs cells; --merge and --sweep come afterwards, in one process without --shard.")
    from dataclasses import replace

    from duobench.concepts import load_concept
    from duobench.leaderboard import shared_base

    csv_path = leaderboard_path(folder, run_config.model, load_concept(run_config.concept).name)
    if merge:
        rows, summaries = merge_grid(run_config, method_list, attack_list, seeds, guard_list)
        write_leaderboard(rows, csv_path)
        print_summary(summaries)
        console.print(f"leaderboard: {csv_path} and {csv_path.with_suffix('.md')} (merged from {len(rows)} cells)")
        return
    parts = parse_shard(shard) if shard else None
    base = shared_base(replace(run_config, method=method_list[0], attack=attack_list[0]))  # one load for all cells
    rows, summaries = run_grid(
        run_config, method_list, attack_list, stages, base, training_seeds=seeds, shard=parts, guards=guard_list
    )
    if parts:
        print_summary(summaries)
        console.print(
            f"shard {shard}: {len(rows)} cells in {run_config.out}/. When every shard is done, run the same "
            "command with --merge instead of --shard."
        )
        return
    if _is_main_rank():
        write_leaderboard(rows, csv_path)
    print_summary(summaries)
    if sweep:
        from duobench.curves import parse_sweep
        from duobench.leaderboard import write_grid_curves

        knob, values = parse_sweep(sweep)
        write_grid_curves(run_config, method_list, attack_list, seeds, knob, values, stages, csv_path, base)
    console.print(
        f"leaderboard: {csv_path} and {csv_path.with_suffix('.md')} "
        f"({sum(stages.hits.values())} cached stage results reused)"
    )


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def train(
    ctx: typer.Context,
    method: str = typer.Option(..., help="Method to train (`duobench ls methods`)."),
    concept: str | None = typer.Option(None, help=CONCEPT_HELP),
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", help="Base model."),
    device: str | None = typer.Option(None, help="cuda, cpu, ..."),
) -> None:
    """Train (or find already trained) a method's artifact; extra flags are method options (--beta 500)."""
    from duobench.concepts import load_concept
    from duobench.methods import train_or_load
    from duobench.models import load_pipeline, pipeline_fingerprint
    from duobench.run_config import check_model_family, default_concept, method_options

    concept_data = load_concept(concept or default_concept(model))
    check_model_family(concept_data, model)
    options = method_options(concept_data, method, extra_flag_options(list(ctx.args)))
    pipe = load_pipeline(model, device=device)
    artifact, config, trained = train_or_load(method, pipe, concept_data, pipeline_fingerprint(pipe), options)
    console.print(f"{'trained' if trained else 'already trained'}: {artifact} ({config})")


@app.command()
def attack(
    attack: str = typer.Option(..., "--attack", help="Attack (`duobench ls attacks`)."),
    concept: str | None = typer.Option(None, help=CONCEPT_HELP),
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", help="Base model."),
    method: str = typer.Option("none", help="Attack the model unlearned by this method ('none': the base)."),
    prompt_set: str | None = typer.Option(None, help="Which of the concept's prompt sets."),
    limit: int | None = typer.Option(None, help="Only the first N prompts."),
    steps: int | None = typer.Option(None, help="Budget: optimisation steps."),
    queries: int | None = typer.Option(None, help="Budget: black-box queries."),
    attack_opt: list[str] | None = typer.Option(None, help="Attack option key=value (repeatable)."),
    out: Path = typer.Option(Path("attack.csv"), help="CSV of adversarial prompts (+ token ids)."),
    device: str | None = typer.Option(None, help="cuda, cpu, ..."),
) -> None:
    """Compute an attack's adversarial prompts for a concept and write them as CSV (+ token ids); for a
    model-changing attack (finetune), train its edit and print where it is."""
    from duobench.attacks.base import Budget
    from duobench.attacks.run import produces, run_attack, run_edit_attack, write_attack_csv
    from duobench.metrics.dsr import build_judge
    from duobench.run_config import RunConfig, attack_options, check_run_config, default_concept
    from duobench.runner import prepare

    config = check_run_config(
        RunConfig(
            method=method,
            attack=attack,
            concept=concept or default_concept(model),
            model=model,
            device=device,
            prompt_set=prompt_set or "",
            limit=limit,
            attack_steps=steps,
            attack_queries=queries,
            attack_options=parse_options(attack_opt),
        )
    )
    context = prepare(config, show_plan=False)  # the run's plan would list images this command never makes
    arguments = (attack, context.concept, context.target, context.base, context.plan.prompt_set)
    budget = Budget(steps=steps, queries=queries)
    common = dict(
        judge=build_judge(context.concept.judge),
        options=attack_options(context.concept, attack, config.attack_options),
        settings=context.settings,
    )
    if produces(context.plan.attack) == "edit":
        edit = run_edit_attack(*arguments, budget, **common)
        console.print(f"{attack} edit of {method}: {edit.artifact}")
        return
    results = run_attack(*arguments, budget, **common)
    if _is_main_rank():
        write_attack_csv(results, out)
    console.print(f"{len(results)} adversarial prompts → {out}")


@app.command()
def validate(
    method: str | None = typer.Option(None, help=RUN_HELP["method"]),
    attack: str | None = typer.Option(None, help=RUN_HELP["attack"]),
    concept: str | None = typer.Option(None, help="Concept name or YAML file."),
    model: str | None = typer.Option(None, help="Model."),
    method_opt: list[str] | None = typer.Option(None, help="Method option key=value (repeatable)."),
    attack_opt: list[str] | None = typer.Option(None, help="Attack option key=value (repeatable)."),
    guard: str | None = typer.Option(None, help="A guard in front of or behind the model (`duobench ls guards`)."),
    guard_opt: list[str] | None = typer.Option(None, help="Guard option key=value (repeatable)."),
    prompt_set: str | None = typer.Option(None, help="Which of the concept's prompt sets."),
    limit: int | None = typer.Option(None, help="Only the first N prompts (x seeds)."),
    benign_limit: int | None = typer.Option(None, help="Only the first N benign prompts."),
    attack_steps: int | None = typer.Option(None, help="Attack budget: optimisation steps."),
    attack_queries: int | None = typer.Option(None, help="Attack budget: black-box queries."),
    fid_reference: str | None = typer.Option(None, help="FID reference, as for `duobench run`."),
    device: str | None = typer.Option(None, help="cuda, cpu, ... (the estimate's device)."),
    config: Path | None = typer.Option(None, "--config", help="YAML file with run options."),
) -> None:
    """Check a run configuration in seconds (model reachable, concept valid, prompts readable, metric weights
    present) before hours of GPU time are spent; then print the run's plan: images, trainings (cached or
    not), attack steps and an estimated time on this device, for the options of `duobench run` that decide it."""
    from duobench.run_config import resolve_run_config
    from duobench.validate import plan_workload, validate_run

    run_config, _ = resolve_run_config(
        config,
        {
            "method": method,
            "attack": attack,
            "concept": concept,
            "model": model,
            "method_options": parse_options(method_opt),
            "attack_options": parse_options(attack_opt),
            "guard": guard,
            "guard_options": parse_options(guard_opt),
            "prompt_set": prompt_set,
            "limit": limit,
            "benign_limit": benign_limit,
            "attack_steps": attack_steps,
            "attack_queries": attack_queries,
            "fid_reference": fid_reference,
            "device": device,
        },
    )
    checks = validate_run(run_config)
    table = Table(title="duobench validate")
    for column in ("check", "status", "detail"):
        table.add_column(column)
    for check in checks:
        table.add_row(check.name, "[green]ok[/]" if check.ok else "[red]FAIL[/]", check.detail)
    console.print(table)
    if not all(check.ok for check in checks):
        raise DuobenchError("validation failed: " + "; ".join(c.detail for c in checks if not c.ok))
    workload = plan_workload(run_config)
    plan = Table(title=f"plan: {run_config.model} on {workload.device}", caption=workload.note())
    for column in ("stage", "work", "estimate"):
        plan.add_column(column)
    for row in workload.rows():
        plan.add_row(*row)
    console.print(plan)


reproduce_app = typer.Typer(help="Reproduce a paper's evaluation through the normal cached stages.")


@reproduce_app.command("duo-paper")
def reproduce_duo_paper(
    model: str = typer.Option("CompVis/stable-diffusion-v1-4", help="Model: an SD model, or toy (CPU, star)."),
    concept: str | None = typer.Option(None, help="nudity or violence on SD; star on toy (the default there)."),
    attacks: str = typer.Option(
        "sneakyprompt,ring-a-bell,concept-inversion,unlearndiffatk", help="Which of the paper's attacks."
    ),
    limit: int | None = typer.Option(None, help="Only the first N prompts (x seeds)."),
    benign_limit: int | None = typer.Option(None, help="Only the first N benign prompts (and close-concept images)."),
    attack_steps: int | None = typer.Option(None, help="Attack budget: optimisation steps."),
    out: Path = typer.Option(Path("reports/duo-paper"), help="Report folder (report.md, figures, runs/)."),
    device: str | None = typer.Option(None, help="cuda, cpu, ..."),
) -> None:
    """The DUO paper's Fig. 4 (DSR vs prior preservation per attack), Tables 1-3 (FID, CLIP score,
    close-concept LPIPS) and Fig. 9 (the base_lambda ablation), beside its published values where stated."""
    from duobench.reproduce import paper_setting, reproduce_duo_paper
    from duobench.run_config import RunConfig, check_run_config

    setting = paper_setting(model, concept)  # an unsupported combination fails before anything loads
    config = check_run_config(
        RunConfig(
            model=model,
            concept=concept or setting.concept,
            limit=limit,
            benign_limit=benign_limit,
            attack_steps=attack_steps,
            device=device,
        )
    )
    chosen = tuple(a.strip() for a in attacks.split(",") if a.strip())
    report = reproduce_duo_paper(config, out, chosen)
    console.print(f"report: {out / 'report.md'} ({len(report.curve_points) + len(report.ablation_points)} runs)")


def _mount_subcommands() -> None:
    from duobench.duo.cli import duo_app
    from duobench.toy.cli import toy_app

    app.add_typer(toy_app, name="toy")
    app.add_typer(duo_app, name="duo")
    app.add_typer(reproduce_app, name="reproduce")


_mount_subcommands()


USAGE_ERROR = next(cls for cls in typer.BadParameter.__mro__ if cls.__name__ == "ClickException")
"""Click's base class for usage errors (bad option value, unknown command). Newer typer raises its own
vendored copy of click's classes, older typer click's, so take the class from typer itself."""


def main() -> None:
    try:
        # Outside standalone mode click returns a command's `typer.Exit` code instead of exiting with it.
        code = app(standalone_mode=False)
    except DuobenchError as error:
        error_console.print(f"[bold red]error[/]: {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Abort:
        error_console.print("aborted")
        sys.exit(130)
    except USAGE_ERROR as error:
        error.show()
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        error_console.print("interrupted: finished images are kept; re-run the same command to resume")
        sys.exit(130)
    if isinstance(code, int) and code:
        sys.exit(code)


if __name__ == "__main__":
    main()
