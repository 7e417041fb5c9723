"""Leaderboards: the (method x attack) grid as a CSV with provenance, a Markdown rendering, and a checker.

Every row carries what is needed to reproduce it: the metric card ids, n prompts x seeds, the method's
config, the checkpoint's sha256, the duobench version, the git commit and the full run configuration
(``run_config``). ``duobench leaderboard --check FILE`` verifies those columns and re-computes every row
whose method artifact is present: images come from the content-addressed store (or are generated), and
every judge and metric is computed again from them, not read from the stage cache.
"""

from __future__ import annotations

import json
import re
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from duobench.cache import atomic_write_bytes
from duobench.errors import DuobenchError
from duobench.report import PROVENANCE_COLUMNS, SUMMARY_COLUMNS, flat_row, format_number
from duobench.run_config import RunConfig, apply_threads, method_options, reproducible_config
from duobench.runner import run
from duobench.stages import StageCache

LEADERBOARD_COLUMNS = (*SUMMARY_COLUMNS, "training_seed", "run_config")
SEED_SPREAD_METRICS = ("dsr", "dsr_pre_attack", "prior_preservation", "fid", "clip_score")
"""In the order of the Markdown spread table's columns."""
LATER_COLUMNS = (
    "close_prior_preservation",
    "close_concepts",
    "guard",
    "false_refusal_rate",
    "false_refusal_ci_low",
    "false_refusal_ci_high",
    "n_benign_refused",
)
"""Columns added after leaderboards were first published: a CSV made before them is still checked."""
COMPARED = ("dsr", "dsr_ci_low", "dsr_ci_high", "prior_preservation", "clip_score", "fid")
COMPARED_WHEN_PUBLISHED = ("close_prior_preservation", "false_refusal_rate")
"""Numbers a row has only for some runs (close concepts, a guard) or only in newer leaderboards: checked when
the published row has one."""


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or model).strip("-")


def leaderboard_path(folder: Path, model: str, concept: str) -> Path:
    return folder / f"{model_slug(model)}-{concept}.csv"


def guard_name(row: Any) -> str:
    """The row's guard, ``"none"`` for a row without one (an empty cell, or a CSV from before guards)."""
    guard = row.get("guard")
    return guard if isinstance(guard, str) and guard else "none"


def system_label(row: Any) -> str:
    """The evaluated system as a leaderboard names it: the method, then `` + <guard>`` when a guard stands
    in front of or behind it."""
    guard = guard_name(row)
    return row["method"] if guard == "none" else f"{row['method']} + {guard}"


def leaderboard_row(summary: dict[str, Any], config: RunConfig, training_seed: int | None = None) -> dict[str, Any]:
    return {
        **flat_row(summary),
        "training_seed": training_seed,
        "run_config": json.dumps(reproducible_config(config), sort_keys=True),
    }


def seeded_method_options(
    method: str, options: dict[str, Any], training_seeds: list[int] | None
) -> list[tuple[int | None, dict[str, Any]]]:
    """``(training seed, method options)`` per replicate: every seed field of the method set to the seed.

    A method without seed fields (the base model, UCE's closed form) is deterministic and runs once.
    """
    from duobench.registry import METHODS

    seed_fields = () if method == "none" else METHODS.get(method).seed_fields
    if not training_seeds or not seed_fields:
        return [(None, options)]
    return [(seed, {**options, **dict.fromkeys(seed_fields, seed)}) for seed in training_seeds]


Cell = tuple[int | None, RunConfig]
"""A grid cell: (training seed or None, the cell's run configuration)."""


def grid_cells(
    base_config: RunConfig,
    methods: list[str],
    attacks: list[str],
    training_seeds: list[int] | None = None,
    guards: list[str] | None = None,
) -> list[Cell]:
    """``(training seed, run config)`` of every cell, in the leaderboard's row order; with ``guards``, every
    (method, attack) cell once per guard (``none``: unguarded)."""
    return [
        (
            seed,
            replace(
                base_config,
                method=method,
                attack=attack,
                guard=guard,
                method_options=options,
                out=cell_out(base_config, method, attack, seed, guard),
            ),
        )
        for method in methods
        for seed, options in seeded_method_options(method, base_config.method_options, training_seeds)
        for guard in guards or [base_config.guard]
        for attack in attacks
    ]


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` → ``(i, n)``, shards counted from 0 (a Slurm array's ``$SLURM_ARRAY_TASK_ID`` with
    ``--array=0-<n-1>``)."""
    index, _, count = text.partition("/")
    try:
        i, n = int(index), int(count)
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise DuobenchError(f"--shard {text!r} must be i/n with 0 <= i < n, e.g. 0/4 for the first of four shards.")
    return i, n


def shard_cells(cells: list[Cell], index: int, count: int) -> list[Cell]:
    """Shard ``index`` of ``count``'s cells. The unit dealt round-robin is a training (a method and its
    training seed, with all its attacks), so that no two shards wait on one training's lock; with fewer
    trainings than shards, single cells are dealt instead."""
    units: dict[tuple[str, int | None], list[Cell]] = {}
    for seed, config in cells:
        units.setdefault((config.method, seed), []).append((seed, config))
    groups = list(units.values()) if len(units) >= count else [[cell] for cell in cells]
    return [cell for n, group in enumerate(groups) if n % count == index for cell in group]


def run_grid(
    base_config: RunConfig,
    methods: list[str],
    attacks: list[str],
    stages: StageCache | None = None,
    base=None,
    training_seeds: list[int] | None = None,
    shard: tuple[int, int] | None = None,
    guards: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (method, training seed, attack) run, reusing every cached stage; returns (leaderboard rows,
    summaries). With ``training_seeds`` each stochastic method is trained once per seed, so the spread of
    its numbers across trainings can be reported beside the within-run interval over prompts. With
    ``shard=(i, n)`` only shard i's cells run (`shard_cells`); `merge_grid` then collects every shard's.

    Every cell shares one loaded base model (``base``, else loaded once after the first cell's plan has
    checked the configuration): edits are applied to it and removed again, never kept."""
    stages = stages or StageCache()
    cells = grid_cells(base_config, methods, attacks, training_seeds, guards)
    if shard is not None:
        cells = shard_cells(cells, *shard)
    base = base if base is not None or not cells else shared_base(cells[0][1])
    rows, summaries = [], []
    for seed, config in cells:
        summary = run(config, stages, base)
        summaries.append(summary)
        rows.append(leaderboard_row(summary, config, seed))
    return rows, summaries


def merge_grid(
    base_config: RunConfig,
    methods: list[str],
    attacks: list[str],
    training_seeds: list[int] | None = None,
    guards: list[str] | None = None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The rows and summaries of a grid whose cells ran elsewhere (``--shard`` jobs), read from the cells'
    run folders without loading a model. A cell whose folder is missing, or holds a run of another
    configuration, is named in the error with the shard that runs it."""
    cells = grid_cells(base_config, methods, attacks, training_seeds, guards)
    rows, summaries, problems = [], [], []
    for seed, config in cells:
        folder = Path(config.out)
        summary_file, config_file = folder / "summary.json", folder / "config.yaml"
        if not (summary_file.exists() and config_file.exists()):
            problems.append(f"{folder.name}: not run yet")
            continue
        stored = _stored_run_config(config_file, config)
        if stored is None:
            problems.append(f"{folder.name}: holds a run of another configuration")
            continue
        summary = json.loads(summary_file.read_text())
        summaries.append(summary)
        rows.append(leaderboard_row(summary, stored, seed))
    if problems:
        shown = "; ".join(problems[:8]) + (f"; and {len(problems) - 8} more" if len(problems) > 8 else "")
        raise DuobenchError(
            f"Cannot merge the leaderboard: {len(problems)} of {len(cells)} cells are missing ({shown}). Run "
            "every shard first (`duobench leaderboard --shard i/n` for each i, with the same options and --out), "
            "then --merge."
        )
    return rows, summaries


def _stored_run_config(config_file: Path, expected: RunConfig) -> RunConfig | None:
    """The run configuration a cell's run folder recorded (``config.yaml``), or None when it is not
    ``expected``'s run. The thread count counts only when ``expected`` names one (a run records the count
    it used)."""
    from duobench.run_config import resolve_run_config

    stored, _ = resolve_run_config(config_file, {})
    wanted, found = reproducible_config(expected), reproducible_config(stored)
    if expected.threads is None:
        wanted.pop("threads"), found.pop("threads")
    return stored if wanted == found else None


def cell_out(config: RunConfig, method: str, attack: str, seed: int | None, guard: str = "none") -> str:
    """A grid cell's run folder: ``<out>/<method>__<attack>[__seed<N>][__guard-<guard>]``."""
    suffix = ("" if seed is None else f"__seed{seed}") + ("" if guard == "none" else f"__guard-{guard}")
    return str(Path(config.out) / f"{method}__{attack}{suffix}")


def shared_base(config: RunConfig):
    """The base model for many runs of one model, loaded once, after ``config``'s plan passed (bad input
    fails before the model loads)."""
    from duobench.distributed import main_process_first
    from duobench.models import load_pipeline
    from duobench.runner import plan_run

    with main_process_first():  # downloads once; the other ranks then find them
        plan_run(config)
    return load_pipeline(config.model, device=config.device)


def write_grid_curves(
    config: RunConfig,
    methods: list[str],
    attacks: list[str],
    training_seeds: list[int] | None,
    knob: str,
    values: list[float],
    stages: StageCache,
    csv_path: Path,
    base=None,
) -> Path:
    """A sweep of ``knob`` for every (method, attack) of the grid, drawn beside the leaderboard
    (``<stem>-curve.csv`` and ``.png``). It follows each method's first training seed: no extra training."""
    from duobench.curves import sweep, write_curve
    from duobench.distributed import process_info

    points = []
    for method in (m for m in methods if m != "none"):
        _, options = seeded_method_options(method, config.method_options, training_seeds)[0]
        for attack in attacks:
            cell = replace(
                config,
                method=method,
                attack=attack,
                method_options=options,
                out=str(Path(config.out) / f"curve-{method}__{attack}"),
            )
            points += sweep(cell, knob, values, stages, base)
    curve = csv_path.with_name(csv_path.stem + "-curve.csv")
    if process_info().is_main:
        write_curve(points, curve, curve.with_suffix(".png"), title=f"{config.concept} on {config.model}")
    return curve


def across_training_seeds(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (method, attack): mean, sample standard deviation and a 95% Student-t interval of the
    mean of each headline number over the training seeds (spread and interval empty with one training),
    then the members' provenance: the training seeds and checkpoint sha256s as JSON lists (in the same
    order; each row of the leaderboard CSV has the rest of its run), and every other provenance column
    the members share (distinct values joined by "; ").

    The interval treats trainings as the random unit, the way the DSR's interval treats prompts: two
    methods whose intervals overlap widely are not told apart by this many trainings.
    """
    import numpy as np
    from scipy import stats

    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault((system_label(row), row["attack"]), []).append(row)
    spread = []
    for (_, attack), members in groups.items():
        guard = members[0].get("guard")
        entry: dict[str, Any] = {"method": members[0]["method"], "guard": guard, "attack": attack}
        entry["n_trainings"] = len(members)
        for metric in SEED_SPREAD_METRICS:
            values = np.array([_number(row.get(metric)) for row in members], dtype=np.float64)
            mean, n = float(np.mean(values)), len(values)
            sd = float(np.std(values, ddof=1)) if n > 1 else None
            half = float(stats.t.ppf(0.975, n - 1) * sd / np.sqrt(n)) if sd is not None else None
            entry[f"{metric}_mean"], entry[f"{metric}_sd"] = mean, sd
            entry[f"{metric}_ci_low"] = mean - half if half is not None else None
            entry[f"{metric}_ci_high"] = mean + half if half is not None else None
        entry["training_seeds"] = json.dumps([_seed(row.get("training_seed")) for row in members])
        entry["checkpoint_sha256"] = json.dumps([row.get("checkpoint_sha256") or "" for row in members])
        for column in (c for c in PROVENANCE_COLUMNS if c not in PER_TRAINING_COLUMNS):
            entry[column] = "; ".join(dict.fromkeys(str(row.get(column)) for row in members))
        spread.append(entry)
    return spread


PER_TRAINING_COLUMNS = ("checkpoint_sha256", "method_config", "run_config")
"""Provenance that differs between a method's trainings; the seeds CSV lists the sha256s, and the leaderboard
CSV has each training's configs."""


def _seed(value: Any) -> int | None:
    number = _number(value)
    return None if number != number else int(number)


def _number(value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def write_leaderboard(rows: list[dict[str, Any]], csv_path: Path) -> Path:
    """The CSV, its Markdown rendering and its figure beside it (same stem, ``.md``, ``.png``: DSR against
    prior preservation per attack); with several trainings per method, also ``<stem>-seeds.csv``, the mean and
    spread over training seeds (in the Markdown too)."""
    import pandas as pd

    from duobench.curves import write_grid_figure

    frame = pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS))
    text = markdown(frame)
    atomic_write_bytes(csv_path, frame.to_csv(index=False).encode())
    if frame["training_seed"].notna().any():
        spread = across_training_seeds(rows)
        atomic_write_bytes(seeds_path(csv_path), pd.DataFrame(spread).to_csv(index=False).encode())
        text += "\n" + spread_markdown(spread)
    atomic_write_bytes(csv_path.with_suffix(".md"), text.encode())
    write_grid_figure(rows, csv_path.with_suffix(".png"), title=csv_path.stem)
    return csv_path


def seeds_path(csv_path: Path) -> Path:
    return csv_path.with_name(csv_path.stem + "-seeds.csv")


def spread_markdown(spread: list[dict[str, Any]]) -> str:
    lines = [
        "Across training seeds (mean ± sample sd over n trainings):",
        "",
        "| method | attack | n | DSR | pre-attack DSR | prior preservation | FID | CLIP score |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for entry in spread:
        cells = [_mean_sd(entry, metric) for metric in SEED_SPREAD_METRICS]
        label = system_label(entry)
        lines.append(f"| {label} | {entry['attack']} | {entry['n_trainings']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _mean_sd(entry: dict[str, Any], metric: str) -> str:
    digits = ".2f" if metric == "fid" else ".3f"
    mean, sd = format_number(entry[f"{metric}_mean"], digits), entry[f"{metric}_sd"]
    return mean if sd is None or mean == "-" else f"{mean} ± {format_number(sd, digits)}"


def _false_refusals(row) -> str:
    """A guarded row's false-refusal rate with its interval (``-`` for a row without a guard)."""
    import pandas as pd

    if pd.isna(row.get("false_refusal_rate")):
        return "-"
    rate = format_number(row["false_refusal_rate"])
    if pd.isna(row.get("false_refusal_ci_low")):
        return rate
    return f"{rate} [{format_number(row['false_refusal_ci_low'])}, {format_number(row['false_refusal_ci_high'])}]"


def markdown(frame) -> str:
    import pandas as pd

    guarded = "false_refusal_rate" in frame.columns and frame["false_refusal_rate"].notna().any()
    refusals_header = " false refusals [95% CI] |" if guarded else ""
    lines = [
        "| method | attack | training seed | DSR [95% CI] | pre-attack DSR | prior preservation | FID | CLIP score "
        f"|{refusals_header} n | cards |",
        "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if guarded else ""),
    ]
    for _, row in frame.iterrows():
        cards = ", ".join(str(row[f"card_{name}"]) for name in ("judge", "prior_preservation", "fid", "clip_score"))
        seed = "-" if pd.isna(row["training_seed"]) else int(row["training_seed"])
        refusals = f" {_false_refusals(row)} |" if guarded else ""
        lines.append(
            f"| {system_label(row)} | {row['attack']} | {seed} | {row['dsr']:.3f} [{row['dsr_ci_low']:.3f}, "
            f"{row['dsr_ci_high']:.3f}] | {format_number(row['dsr_pre_attack'])} | "
            f"{format_number(row['prior_preservation'])} | {format_number(row['fid'], '.2f')} | "
            f"{format_number(row['clip_score'])} |{refusals} {row['n_prompts']}x{row['n_seeds']} | "
            f"{cards} |"
        )
    first = frame.iloc[0] if len(frame) else None
    if first is not None:
        lines += [
            "",
            f"duobench {first['duobench_version']}, commit `{first['git_commit']}`, model "
            f"`{first['model']}`, concept `{first['concept']}`.",
        ]
    return "\n".join(lines) + "\n"


def provenance_problems(row: dict[str, Any]) -> list[str]:
    """What is missing or malformed in one row's provenance columns."""
    problems = []
    for column in PROVENANCE_COLUMNS:
        value = row.get(column)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            if column == "checkpoint_sha256" and row.get("method") == "none":
                continue
            if column == "git_commit" and str(row.get("duobench_version") or "").strip():
                continue  # an installed release, not a source checkout: traced by its version
            problems.append(f"{column} is empty")
    sha = str(row.get("checkpoint_sha256") or "")
    if row.get("method") != "none" and sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        problems.append("checkpoint_sha256 is not a sha256 hex digest")
    for column in ("method_config", "run_config", "environment"):
        try:
            json.loads(str(row.get(column)))
        except json.JSONDecodeError:
            problems.append(f"{column} is not JSON")
    for column in (c for c in PROVENANCE_COLUMNS if c.startswith("card_")):
        if row.get(column) and "@" not in str(row[column]):
            problems.append(f"{column} {row[column]!r} is not a card id (name@version)")
    return problems


def check_leaderboard(
    csv_path: Path, recompute: bool = True, tolerance: float = 1e-6, stages: StageCache | None = None
) -> list[dict[str, Any]]:
    """One verdict per row: provenance problems, and whether the re-computed numbers match.

    ``stages`` defaults to an empty cache of this check's own, so judging and metrics really run again.
    """
    import tempfile

    import pandas as pd

    if not csv_path.exists():
        raise DuobenchError(f"Leaderboard file {csv_path} does not exist.")
    frame = pd.read_csv(csv_path)
    missing = [column for column in LEADERBOARD_COLUMNS if column not in frame.columns and column not in LATER_COLUMNS]
    if missing:
        raise DuobenchError(f"{csv_path} lacks the columns {', '.join(missing)}; it is not a duobench leaderboard.")
    stages = stages or StageCache(Path(tempfile.mkdtemp(prefix="duobench-check-stages-")))
    bases: dict[str, Any] = {}  # one loaded base model per model the rows name
    verdicts = []
    for _, series in frame.iterrows():
        row = series.to_dict()
        verdict = {
            "method": row["method"],
            "system": system_label(row),
            "attack": row["attack"],
            "problems": provenance_problems(row),
            "recomputed": False,
            "matches": None,
        }
        if recompute and not verdict["problems"]:
            verdict.update(_recompute(row, tolerance, stages, bases))
        verdicts.append(verdict)
    return verdicts


def _recompute(row: dict[str, Any], tolerance: float, stages: StageCache, bases: dict[str, Any]) -> dict[str, Any]:
    """Re-run a row if its method artifact is present (never trains: a check must not cost GPU hours)."""
    known = {f.name for f in fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in json.loads(row["run_config"]).items() if k in known})
    if config.method != "none" and not _artifact_present(config):
        return {"recomputed": False, "note": "method artifact not present here; provenance checked only"}
    import tempfile

    config = replace(config, out=tempfile.mkdtemp(prefix="duobench-check-"))
    if config.model not in bases:
        bases[config.model] = shared_base(config)
    summary = run(config, stages, bases[config.model])
    fresh = flat_row(summary)
    differences = {}
    import pandas as pd

    published = [column for column in COMPARED_WHEN_PUBLISHED if not pd.isna(row.get(column))]
    for column in (*COMPARED, *published):
        old, new = row.get(column), fresh.get(column)
        if _differs(old, new, tolerance):
            differences[column] = {"published": old, "recomputed": new}
    if fresh["checkpoint_sha256"] != (row.get("checkpoint_sha256") if row["method"] != "none" else ""):
        if row["method"] != "none":
            differences["checkpoint_sha256"] = {
                "published": row["checkpoint_sha256"],
                "recomputed": fresh["checkpoint_sha256"],
            }
    return {"recomputed": True, "matches": not differences, "differences": differences}


def _differs(old: Any, new: Any, tolerance: float) -> bool:
    try:
        old_number, new_number = float(old), float(new)
    except (TypeError, ValueError):
        return str(old) != str(new)
    if old_number != old_number and new_number != new_number:
        return False
    return abs(old_number - new_number) > tolerance


def _artifact_present(config: RunConfig) -> bool:
    from duobench.concepts import load_concept
    from duobench.methods import CARD_NAME, artifact_dir, config_key, make_config, training_numerics
    from duobench.models import load_pipeline, pipeline_fingerprint
    from duobench.registry import METHODS

    spec = METHODS.get(config.method)
    concept = load_concept(config.concept)
    method_config = make_config(spec, method_options(concept, config.method, config.method_options))
    apply_threads(config)
    pipe = load_pipeline(config.model, device=config.device)
    key = config_key(config.method, method_config, concept, pipeline_fingerprint(pipe), training_numerics(pipe))
    return (artifact_dir(config.method, key) / CARD_NAME).exists()
