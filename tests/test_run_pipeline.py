"""`duobench run` / `leaderboard` end to end in the toy world: two methods x two attacks, cached stages,
provenance, the curve, the published-CSV check, and SIGKILL at any stage."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from duobench.curves import sweep, write_curve
from duobench.leaderboard import (
    LEADERBOARD_COLUMNS,
    check_leaderboard,
    provenance_problems,
    reproducible_config,
    run_grid,
    write_leaderboard,
)
from duobench.run_config import RunConfig, resolve_run_config
from duobench.stages import StageCache

RING_A_BELL_TOY = {"k": 8, "population": 32, "generations": 8}


def toy_config(out: Path, **overrides) -> RunConfig:
    values = dict(
        model="toy",
        concept="star",
        method="none",
        attack="none",
        limit=2,
        benign_limit=6,
        batch_size="16",
        device="cpu",
        out=str(out),
        attack_options=RING_A_BELL_TOY,
    )
    values.update(overrides)
    return RunConfig(**values)


@pytest.fixture(scope="module")
def toy_base():
    from duobench.models import load_pipeline

    return load_pipeline("toy", device="cpu")


def test_grid_leaderboard_curve_and_cache(tmp_path, toy_base):
    config = toy_config(tmp_path / "runs")
    stages = StageCache(tmp_path / "stages")
    # ring-a-bell's options only apply to ring-a-bell; 'none' ignores them.
    rows, summaries = run_grid(config, ["none", "uce"], ["none", "ring-a-bell"], stages, base=toy_base)
    csv_path = write_leaderboard(rows, tmp_path / "toy-star.csv")

    frame = pd.read_csv(csv_path)
    assert list(frame.columns) == list(LEADERBOARD_COLUMNS)
    assert len(frame) == 4
    for _, row in frame.iterrows():
        assert provenance_problems(row.to_dict()) == []
        assert 0.0 <= row["dsr_ci_low"] <= row["dsr"] <= row["dsr_ci_high"] <= 1.0
        assert row["card_judge"].startswith("toy-star@")
        assert row["n_prompts"] == 2 and row["n_seeds"] == 20  # 2 star prompts x 20 seeds
    uce_row = frame[(frame["method"] == "uce")].iloc[0]
    assert len(uce_row["checkpoint_sha256"]) == 64
    assert json.loads(uce_row["method_config"])  # the method's full config travels with the row
    assert json.loads(uce_row["run_config"])["threads"] == 1  # a CPU run records the threads it trained with
    # A row's run_config, saved as a file, is a `duobench run --config` file that re-creates the run.
    (tmp_path / "row.json").write_text(uce_row["run_config"])
    rerun_config, _ = resolve_run_config(tmp_path / "row.json", {"out": str(tmp_path / "rerun")})
    assert reproducible_config(rerun_config) == json.loads(uce_row["run_config"])
    assert (tmp_path / "toy-star.md").read_text().count("| uce |") == 2
    for method in ("none", "uce"):
        for attack in ("none", "ring-a-bell"):
            run_dir = tmp_path / "runs" / f"{method}__{attack}"
            assert {"summary.json", "summary.csv", "audit.parquet", "config.yaml", "contact_sheet.png"} <= {
                path.name for path in run_dir.iterdir()
            }

    # Second time: every stage is a cache hit and nothing is generated.
    again = StageCache(tmp_path / "stages")
    _, second = run_grid(config, ["none", "uce"], ["none", "ring-a-bell"], again, base=toy_base)
    assert sum(s["images_generated"] for s in second) == 0
    assert again.misses.total() == 0 and again.hits.total() > 0
    assert [s["dsr"] for s in second] == [s["dsr"] for s in summaries]

    # The published CSV checks out: provenance complete and every row's judge and metrics, computed again
    # from the stored images (not read from the stage cache), give the same numbers.
    check_stages = StageCache(tmp_path / "check-stages")
    verdicts = check_leaderboard(csv_path, stages=check_stages)
    assert all(v["problems"] == [] and v["recomputed"] and v["matches"] for v in verdicts)
    assert check_stages.misses["judge"] == 4

    # A curve: strength sweep of UCE under Ring-A-Bell, written as CSV and PNG.
    points = sweep(replace(config, method="uce", attack="ring-a-bell"), "strength", [0.0, 1.0], again, base=toy_base)
    write_curve(points, tmp_path / "curve.csv", tmp_path / "curve.png")
    curve = pd.read_csv(tmp_path / "curve.csv")
    assert list(curve["value"]) == [0.0, 1.0]
    assert (tmp_path / "curve.png").stat().st_size > 1000


def test_training_seeds_give_one_row_per_training_and_their_spread(tmp_path, toy_base):
    config = toy_config(tmp_path / "runs", method_options={"iterations": 2})
    rows, _ = run_grid(config, ["none", "esd-x"], ["none"], StageCache(tmp_path / "stages"), toy_base, [0, 1])
    assert [(row["method"], row["training_seed"]) for row in rows] == [("none", None), ("esd-x", 0), ("esd-x", 1)]
    esd = [row for row in rows if row["method"] == "esd-x"]
    assert [json.loads(row["method_config"])["seed"] for row in esd] == [0, 1]
    assert esd[0]["checkpoint_sha256"] != esd[1]["checkpoint_sha256"]  # two trainings, not one reused

    csv_path = write_leaderboard(rows, tmp_path / "toy-star.csv")
    spread = pd.read_csv(tmp_path / "toy-star-seeds.csv")
    esd_spread = spread[spread["method"] == "esd-x"].iloc[0]
    assert esd_spread["n_trainings"] == 2
    assert esd_spread["prior_preservation_mean"] == pytest.approx(
        (esd[0]["prior_preservation"] + esd[1]["prior_preservation"]) / 2
    )
    assert esd_spread["prior_preservation_sd"] == pytest.approx(
        abs(esd[0]["prior_preservation"] - esd[1]["prior_preservation"]) / 2**0.5
    )
    # Two trainings: the t interval of the mean is mean ± t(0.975, 1) · sd / √2, with t(0.975, 1) = 12.706.
    half = 12.7062047 * esd_spread["prior_preservation_sd"] / 2**0.5
    assert esd_spread["prior_preservation_ci_high"] == pytest.approx(esd_spread["prior_preservation_mean"] + half)
    assert pd.isna(spread[spread["method"] == "none"].iloc[0]["dsr_sd"])  # one training: no spread
    lines = csv_path.with_suffix(".md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| method | attack | n |"))
    esd_cells = dict(zip(*[[cell.strip() for cell in line.split("|")] for line in (header, lines[-1])], strict=True))
    assert (esd_cells["method"], esd_cells["n"]) == ("esd-x", "2")
    assert esd_cells["FID"].startswith(f"{esd_spread['fid_mean']:.2f} ± ")
    assert esd_cells["CLIP score"].startswith(f"{esd_spread['clip_score_mean']:.3f} ± ")
    assert all(verdict["problems"] == [] for verdict in check_leaderboard(csv_path, recompute=False))


def test_every_seed_field_is_a_config_field():
    from dataclasses import fields

    from duobench.registry import METHODS

    for name in METHODS.names():
        spec = METHODS.get(name)
        assert set(spec.seed_fields) <= {f.name for f in fields(spec.config_cls)}, name
    assert METHODS.get("duo").seed_fields == ("seed", "data_seed") and METHODS.get("uce").seed_fields == ()


def test_tampered_leaderboard_row_is_caught(tmp_path):
    frame = pd.DataFrame([{column: "" for column in LEADERBOARD_COLUMNS}])
    frame.loc[0, "method"] = "uce"
    frame.loc[0, "card_judge"] = "toy-star"
    problems = provenance_problems(frame.iloc[0].to_dict())
    assert "checkpoint_sha256 is empty" in problems and "git_commit is empty" in problems


def _run_command(out: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "duobench.cli",
        "run",
        "--model",
        "toy",
        "--concept",
        "star",
        "--method",
        "uce",
        "--attack",
        "ring-a-bell",
        "--limit",
        "2",
        "--benign-limit",
        "6",
        "--batch-size",
        "16",
        "--device",
        "cpu",
        "--out",
        str(out),
    ] + [f"--attack-opt={key}={value}" for key, value in RING_A_BELL_TOY.items()]


def test_sigkill_at_any_stage_then_rerun_gives_the_uninterrupted_result(tmp_path):
    reference_home, killed_home = tmp_path / "home-a", tmp_path / "home-b"
    subprocess.run(
        _run_command(tmp_path / "a"),
        check=True,
        capture_output=True,
        env={**os.environ, "DUOBENCH_HOME": str(reference_home)},
    )
    reference = json.loads((tmp_path / "a" / "summary.json").read_text())

    env = {**os.environ, "DUOBENCH_HOME": str(killed_home)}
    for delay in (4.0, 9.0, 14.0):  # during model loading/training, attack, generation or metrics
        process = subprocess.Popen(
            _run_command(tmp_path / "b"),
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        time.sleep(delay)
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    subprocess.run(_run_command(tmp_path / "b"), check=True, capture_output=True, env=env)
    resumed = json.loads((tmp_path / "b" / "summary.json").read_text())
    for key in ("dsr", "dsr_ci", "prior_preservation", "clip_score", "fid", "n_prompts", "checkpoint_sha256"):
        assert resumed[key] == reference[key], key
