"""Curves over any knob: a method option (one artifact per value) and the evaluation's guidance scale."""

import json
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from duobench.curves import config_at, sweep, system_styles, write_curve, write_grid_figure
from duobench.errors import DuobenchError
from duobench.run_config import RunConfig, check_run_config
from duobench.stages import StageCache


def toy(out: Path, **overrides) -> RunConfig:
    values = dict(model="toy", concept="star", limit=1, benign_limit=2, batch_size="16", device="cpu", out=str(out))
    return RunConfig(**{**values, **overrides})


@pytest.fixture(scope="module")
def toy_base():
    from duobench.models import load_pipeline

    return load_pipeline("toy", device="cpu")


def manifest_guidance(run_dir: Path, phase: str) -> set[float]:
    rows = (run_dir / "generations" / phase / "manifest.jsonl").read_text().splitlines()
    return {json.loads(row)["item"]["guidance"] for row in rows}


def test_a_method_option_sweep_trains_one_artifact_per_value(tmp_path, toy_base):
    config = toy(tmp_path / "runs", method="uce")
    points = sweep(config, "erase_scale", [0.0, 1.0], StageCache(tmp_path / "stages"), toy_base)
    assert [point["method_config"]["erase_scale"] for point in points] == [0.0, 1.0]
    assert points[0]["checkpoint_sha256"] != points[1]["checkpoint_sha256"]
    assert points[1]["dsr"] > points[0]["dsr"]  # UCE with no erase scale leaves the stars
    assert json.loads(points[1]["run_config"])["method_options"] == {"erase_scale": 1}
    with pytest.raises(DuobenchError, match="no_such_option"):
        sweep(config, "no_such_option", [1.0], StageCache(tmp_path / "stages"), toy_base)


def test_a_guidance_sweep_changes_only_the_evaluated_images(tmp_path, toy_base):
    config = toy(tmp_path / "runs", method="none", attack="none")
    points = sweep(config, "guidance", [1.0, 7.5], StageCache(tmp_path / "stages"), toy_base)
    low, high = (Path(config_at(config, "guidance", value).out) for value in (1.0, 7.5))
    assert manifest_guidance(low, "attack") == {1.0} and manifest_guidance(high, "attack") == {7.5}
    # The benign images keep the prompt set's guidance: the same images, so the same prior preservation.
    assert manifest_guidance(low, "benign-base") == manifest_guidance(high, "benign-base") != {1.0}
    assert points[0]["prior_preservation"] == points[1]["prior_preservation"]
    assert points[0]["dsr"] != points[1]["dsr"]  # the base model draws stars far less often without guidance
    assert [json.loads(point["run_config"])["guidance"] for point in points] == [1.0, 7.5]
    write_curve(points, tmp_path / "curve.csv", tmp_path / "curve.png")
    assert (tmp_path / "curve.png").stat().st_size > 0


@pytest.mark.parametrize("value", [-1, "high", float("inf")])
def test_a_bad_guidance_is_refused(tmp_path, value):
    with pytest.raises(DuobenchError, match="guidance must be a finite number"):
        check_run_config(replace(toy(tmp_path), guidance=value))


def test_close_concepts_report_the_distance_to_the_base_models_images_per_concept(tmp_path, toy_base):
    from duobench.runner import run

    stages = StageCache(tmp_path / "stages")
    none = run(toy(tmp_path / "none", method="none", benign_limit=3), stages, toy_base)
    uce = run(toy(tmp_path / "uce", method="uce", benign_limit=3), stages, toy_base)
    # The star concept's close concepts: squares and triangles, capped like the benign set (3 images each).
    assert list(uce["close_concepts"]) == ["square", "triangle"]
    assert all(entry["n"] == 3 for entry in uce["close_concepts"].values())
    assert none["close_concepts"]["square"] == {"distance_mean": 0.0, "distance_sd": 0.0, "n": 3}
    assert none["close_prior_preservation"] == 1.0
    entries = uce["close_concepts"].values()
    assert all(entry["distance_mean"] > 0 and entry["distance_sd"] >= 0 for entry in entries)
    mean = sum(entry["distance_mean"] for entry in entries) / 2  # equal n: the overall mean of the distances
    assert uce["close_prior_preservation"] == pytest.approx(1 - mean)
    rows = pd.read_csv(tmp_path / "uce" / "summary.csv")
    assert json.loads(rows["close_concepts"][0]) == json.loads(json.dumps(uce["close_concepts"]))


def test_a_grid_figure_tells_every_system_apart(tmp_path):
    """Eleven methods behind four guards (the size of the toy grids): no two systems share a colour and a
    marker, a method keeps its colour behind every guard, and the figure is written."""
    methods = ["none", "duo", "esd-u", "esd-x", "uce", "spm", "sld", "sd-np", "safree", "safegen", "sdd"]
    guards = ["none", "keyword-filter", "latent-guard", "output-checker"]
    rows = [
        {
            "method": m,
            "guard": g,
            "attack": a,
            "prior_preservation": 0.9,
            "dsr": 1.0,
            "dsr_ci_low": 0.96,
            "dsr_ci_high": 1.0,
        }
        for m in methods
        for g in guards
        for a in ("none", "p4d")
    ]
    styles = system_styles(rows)
    assert len(styles) == len(methods) * len(guards)
    assert len(set(styles.values())) == len(styles)
    assert {styles[f"duo + {g}"][0] for g in guards[1:]} == {styles["duo"][0]}
    write_grid_figure(rows, tmp_path / "grid.png", title="grid")
    assert (tmp_path / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
