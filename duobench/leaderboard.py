"""Leaderboards: the (method x attack) grid as a CSV with provenance, a Markdown rendering, and a checker.

Every row carries what is needed to reproduce it: the metric card ids, n prompts x seeds, the method's
config, the checkpoint's sha256, the duobench version, the git commit and the full run configuration
(``run_config``). ``duobench leaderboard --check FILE`` verifies those columns and re-computes every row
whose artifacts are present (with every stage cached, a row re-computes in seconds).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, fields, replace
from pathlib import Path
from typing import Any

from duobench.cache import atomic_write_bytes
from duobench.errors import DuobenchError
from duobench.report import SUMMARY_COLUMNS, flat_row
from duobench.runner import RunConfig, method_options, run
from duobench.stages import StageCache

LEADERBOARD_COLUMNS = (*SUMMARY_COLUMNS, "run_config")
PROVENANCE_COLUMNS = (
    "card_dsr",
    "card_judge",
    "card_prior_preservation",
    "card_clip_score",
    "card_fid",
    "n_prompts",
    "n_seeds",
    "method_config",
    "checkpoint_sha256",
    "duobench_version",
    "git_commit",
    "run_config",
)
COMPARED = ("dsr", "dsr_ci_low", "dsr_ci_high", "prior_preservation", "clip_score", "fid")
# Settings that change where or how fast a row is computed, not its numbers.
NOT_REPRODUCIBILITY = ("out", "device", "batch_size")


def model_slug(model: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", Path(model).name or model).strip("-")


def leaderboard_path(folder: Path, model: str, concept: str) -> Path:
    return folder / f"{model_slug(model)}-{concept}.csv"


def reproducible_config(config: RunConfig) -> dict[str, Any]:
    return {key: value for key, value in asdict(config).items() if key not in NOT_REPRODUCIBILITY}


def leaderboard_row(summary: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    return {**flat_row(summary), "run_config": json.dumps(reproducible_config(config), sort_keys=True)}


def run_grid(
    base_config: RunConfig,
    methods: list[str],
    attacks: list[str],
    stages: StageCache | None = None,
    base=None,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Every (method, attack) run, reusing every cached stage; returns (leaderboard rows, summaries)."""
    stages = stages or StageCache()
    rows, summaries = [], []
    for method in methods:
        for attack in attacks:
            config = replace(
                base_config,
                method=method,
                attack=attack,
                out=str(Path(base_config.out) / f"{method}__{attack}"),
            )
            summary = run(config, stages, base)
            summaries.append(summary)
            rows.append(leaderboard_row(summary, config))
    return rows, summaries


def write_leaderboard(rows: list[dict[str, Any]], csv_path: Path) -> Path:
    """The CSV and its Markdown rendering beside it (same stem, ``.md``)."""
    import pandas as pd

    frame = pd.DataFrame(rows, columns=list(LEADERBOARD_COLUMNS))
    atomic_write_bytes(csv_path, frame.to_csv(index=False).encode())
    atomic_write_bytes(csv_path.with_suffix(".md"), markdown(frame).encode())
    return csv_path


def markdown(frame) -> str:
    lines = [
        "| method | attack | DSR [95% CI] | pre-attack DSR | prior preservation | FID | CLIP score | n | cards |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for _, row in frame.iterrows():
        cards = ", ".join(str(row[f"card_{name}"]) for name in ("judge", "prior_preservation", "fid", "clip_score"))
        lines.append(
            f"| {row['method']} | {row['attack']} | {row['dsr']:.3f} [{row['dsr_ci_low']:.3f}, "
            f"{row['dsr_ci_high']:.3f}] | {_fmt(row['dsr_pre_attack'])} | {_fmt(row['prior_preservation'])} | "
            f"{_fmt(row['fid'], '.2f')} | {_fmt(row['clip_score'])} | {row['n_prompts']}x{row['n_seeds']} | "
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


def _fmt(value: Any, spec: str = ".3f") -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if number != number else format(number, spec)


def provenance_problems(row: dict[str, Any]) -> list[str]:
    """What is missing or malformed in one row's provenance columns."""
    problems = []
    for column in PROVENANCE_COLUMNS:
        value = row.get(column)
        if value is None or (isinstance(value, float) and value != value) or str(value).strip() == "":
            if column == "checkpoint_sha256" and row.get("method") == "none":
                continue
            problems.append(f"{column} is empty")
    sha = str(row.get("checkpoint_sha256") or "")
    if row.get("method") != "none" and sha and not re.fullmatch(r"[0-9a-f]{64}", sha):
        problems.append("checkpoint_sha256 is not a sha256 hex digest")
    for column in ("method_config", "run_config"):
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
    """One verdict per row: provenance problems, and whether the re-computed numbers match."""
    import pandas as pd

    if not csv_path.exists():
        raise DuobenchError(f"Leaderboard file {csv_path} does not exist.")
    frame = pd.read_csv(csv_path)
    missing = [column for column in LEADERBOARD_COLUMNS if column not in frame.columns]
    if missing:
        raise DuobenchError(f"{csv_path} lacks the columns {', '.join(missing)}; it is not a duobench leaderboard.")
    verdicts = []
    for _, series in frame.iterrows():
        row = series.to_dict()
        verdict = {
            "method": row["method"],
            "attack": row["attack"],
            "problems": provenance_problems(row),
            "recomputed": False,
            "matches": None,
        }
        if recompute and not verdict["problems"]:
            verdict.update(_recompute(row, tolerance, stages))
        verdicts.append(verdict)
    return verdicts


def _recompute(row: dict[str, Any], tolerance: float, stages: StageCache | None) -> dict[str, Any]:
    """Re-run a row if its method artifact is present (never trains: a check must not cost GPU hours)."""
    known = {f.name for f in fields(RunConfig)}
    config = RunConfig(**{k: v for k, v in json.loads(row["run_config"]).items() if k in known})
    if config.method != "none" and not _artifact_present(config):
        return {"recomputed": False, "note": "method artifact not present here; provenance checked only"}
    import tempfile

    config = replace(config, out=tempfile.mkdtemp(prefix="duobench-check-"))
    summary = run(config, stages)
    fresh = flat_row(summary)
    differences = {}
    for column in COMPARED:
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
    from duobench.methods import CARD_NAME, artifact_dir, config_key, make_config
    from duobench.models import load_pipeline, pipeline_fingerprint
    from duobench.registry import METHODS

    spec = METHODS.get(config.method)
    concept = load_concept(config.concept)
    method_config = make_config(spec, method_options(concept, config.method, config.method_options))
    fingerprint = pipeline_fingerprint(load_pipeline(config.model, device=config.device))
    return (
        artifact_dir(config.method, config_key(config.method, method_config, concept, fingerprint)) / CARD_NAME
    ).exists()
