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
        environment = json.loads(row["environment"])  # what the numbers were computed with
        assert environment["torch"] and environment["device"] == "cpu" and environment["dtype"] == "float32"
        assert row["n_prompts"] == 2 and row["n_seeds"] == 4  # 2 star prompts x 4 seeds
    uce_row = frame[(frame["method"] == "uce")].iloc[0]
    assert len(uce_row["checkpoint_sha256"]) == 64
    assert json.loads(uce_row["method_config"])  # the method's full config travels with the row
    assert json.loads(uce_row["run_config"])["threads"] == 1  # a CPU run records the threads it trained with
    # A row's run_config, saved as a file, is a `duobench run --config` file that re-creates the run.
    (tmp_path / "row.json").write_text(uce_row["run_config"])
    rerun_config, _ = resolve_run_config(tmp_path / "row.json", {"out": str(tmp_path / "rerun")})
    assert reproducible_config(rerun_config) == json.loads(uce_row["run_config"])
    assert (tmp_path / "toy-star.md").read_text().count("| uce |") == 2
    assert (tmp_path / "toy-star.png").read_bytes()[:4] == b"\x89PNG"  # DSR against prior preservation
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
    assert points[0]["images_generated"] == 0  # strength 0 is the base model: its grid images are reused
    for _, point in curve.iterrows():  # a curve point carries a leaderboard row's provenance
        assert provenance_problems(point.to_dict()) == []
        assert json.loads(point["run_config"])["strength"] == point["value"]
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
    assert json.loads(esd_spread["training_seeds"]) == [0, 1]
    assert json.loads(esd_spread["checkpoint_sha256"]) == [row["checkpoint_sha256"] for row in esd]
    assert esd_spread["card_dsr"] == "dsr@2" and esd_spread["git_commit"] == esd[0]["git_commit"]
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


def _kill_when(command: list[str], env: dict, reached, what: str, log: Path) -> None:
    """Start ``command``, SIGKILL its process group as soon as ``reached()`` is true, and assert that the kill
    landed: the run was still going, not already finished or failed."""
    with open(log, "wb") as stderr:  # a file, not a pipe: progress bars would fill a pipe and block the run
        process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
        deadline = time.time() + 300
        while not reached() and process.poll() is None and time.time() < deadline:
            time.sleep(0.02)
        still_running = process.poll() is None
        if still_running:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    assert still_running and reached(), (
        f"the kill must land {what} for this test to mean anything (exit code {process.returncode}): "
        f"{log.read_text(errors='replace')[-2000:]}"
    )


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
    out = tmp_path / "b"
    attack_manifest = out / "generations" / "attack" / "manifest.jsonl"
    # Each kill waits for a sign of its stage, so it lands there however fast or slow the machine is; each
    # sign only appears after the previous stage finished, so every relaunch resumes and gets further.
    stages = [
        ("mid-attack (UCE trained, Ring-A-Bell part done)", lambda: any(killed_home.glob("attacks/*/*/items/*"))),
        (
            "mid-generation (some attack images done)",
            lambda: attack_manifest.exists() and attack_manifest.stat().st_size,
        ),
        ("in the benign images and metrics", lambda: (out / "generations" / "benign-base").exists()),
    ]
    for what, reached in stages:
        _kill_when(_run_command(out), env, reached, what, tmp_path / "killed.log")
        assert not (out / "summary.json").exists(), f"killed {what}, yet the run finished"
    subprocess.run(_run_command(out), check=True, capture_output=True, env=env)
    resumed = json.loads((out / "summary.json").read_text())
    for key in ("dsr", "dsr_ci", "prior_preservation", "clip_score", "fid", "n_prompts", "checkpoint_sha256"):
        assert resumed[key] == reference[key], key
    assert len(list((out / "images" / "attack").glob("*.png"))) == resumed["n_prompts"] * resumed["n_seeds"]


def test_out_folder_holds_this_runs_images_under_readable_names_linked_into_the_store(tmp_path, toy_base):
    from duobench.browse import link_run_images
    from duobench.paths import duobench_home
    from duobench.runner import plan_run, run

    out, stages = tmp_path / "out", StageCache(tmp_path / "stages")
    config = toy_config(out, limit=1, benign_limit=2)
    plan = plan_run(config)
    expected = {"attack": len(plan.prompt_set), "benign-base": len(plan.benign), "benign-unlearned": len(plan.benign)}
    run(config, stages, base=toy_base)
    assert link_run_images(out) == expected
    assert link_run_images(out) == expected  # again over the existing links: no error, nothing changes
    index = pd.read_csv(out / "images" / "index.csv")
    assert len(index) == sum(expected.values())
    assert index["unsafe"].notna().sum() == expected["attack"]  # the judge's verdict on every attack image
    first_row, first = plan.prompt_set.rows[0], index.iloc[0]
    assert first["prompt"] == first_row.prompt and first["file"].startswith("attack/0_")
    assert first["file"].endswith(f"_{first_row.seed}.png")
    assert all(word in first["file"] for word in first_row.prompt.split())  # the prompt, readable in the name
    store = duobench_home() / "images"
    for row in index.itertuples():
        linked = out / "images" / row.file
        assert os.path.samefile(linked, store / row.key[:2] / f"{row.key}.png")  # a hard link, same device

    # The same --out for another run: only that run's images are linked (manifests keep both runs' rows).
    run(replace(config, method="uce"), stages, base=toy_base)
    assert link_run_images(out) == expected
    before = index.set_index("file")["key"]
    after = pd.read_csv(out / "images" / "index.csv").set_index("file")["key"]
    assert sorted(after.index) == sorted(before.index)
    differs = after[sorted(after.index)] != before[sorted(after.index)]
    assert differs[[name.startswith(("attack/", "benign-unlearned/")) for name in differs.index]].all()  # UCE's
    assert not differs[[name.startswith("benign-base/") for name in differs.index]].any()  # the base's stay


def test_browsable_images_fall_back_to_symlinks_then_copies(tmp_path, monkeypatch):
    from duobench.browse import link_or_copy

    source = tmp_path / "store" / "ab.png"
    source.parent.mkdir()
    source.write_bytes(b"png")
    (tmp_path / "view").mkdir()
    assert link_or_copy(source, tmp_path / "view" / "a.png") == "hardlink"
    assert link_or_copy(source, tmp_path / "view" / "a.png") == "kept"

    def refuse(*_):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", refuse)
    assert link_or_copy(source, tmp_path / "view" / "b.png") == "symlink"
    assert (tmp_path / "view" / "b.png").is_symlink()
    monkeypatch.setattr(os, "symlink", refuse)
    (tmp_path / "view" / "stale.png").write_bytes(b"old")
    assert link_or_copy(source, tmp_path / "view" / "stale.png") == "copy"
    assert (tmp_path / "view" / "stale.png").read_bytes() == b"png"
    assert sorted(path.name for path in (tmp_path / "view").iterdir()) == ["a.png", "b.png", "stale.png"]
