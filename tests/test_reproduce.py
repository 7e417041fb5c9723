"""`duobench reproduce duo-paper` on the toy world: every figure and table of the report, from cached runs."""

import re
from pathlib import Path

import pytest

from duobench import reproduce
from duobench.errors import DuobenchError
from duobench.reproduce import PaperSetting, paper_setting, reproduce_duo_paper
from duobench.run_config import RunConfig
from duobench.stages import StageCache

STAR = Path(__file__).parents[1] / "duobench" / "concepts" / "star.yaml"


def test_the_paper_grid_on_the_toy_model_writes_every_figure_and_table(tmp_path, monkeypatch):
    # The star concept with a 10-step DUO, two β, one baseline at full strength: the report's shape, not
    # its numbers (the full toy report is in the README).
    concept = tmp_path / "star.yaml"
    concept.write_text(STAR.read_text().replace("steps: 300, micro_batch_pairs", "steps: 10, micro_batch_pairs"))
    monkeypatch.setitem(reproduce.SETTINGS, ("toy", "star"), PaperSetting("star", (5.0, 10.0), (5.0, 10.0)))
    monkeypatch.setattr(reproduce, "BASELINES", ("uce",))
    monkeypatch.setattr(reproduce, "BASELINE_STRENGTHS", (1.0,))
    config = RunConfig(model="toy", concept=str(concept), limit=1, benign_limit=2, attack_steps=2, device="cpu")
    stages = StageCache(tmp_path / "stages")
    report = reproduce_duo_paper(config, tmp_path / "report", ("ring-a-bell",), stages)

    text = (tmp_path / "report" / "report.md").read_text()
    for heading in ("## Fig. 4", "## Tables 1-2", "## Table 3", "## Fig. 9", "## Re-running one cell"):
        assert heading in text
    assert (tmp_path / "report" / "fig4.png").exists() and (tmp_path / "report" / "fig9.png").exists()
    assert [row["label"] for row in report.table_rows] == ["none", "duo β=5", "duo β=10", "uce"]
    assert "| duo β=5 |" in text and "square" in text and "triangle" in text  # close concepts, per model
    assert {point["method"] for point in report.ablation_points} == {"duo (base_lambda 0)", "duo (base_lambda 1e+06)"}
    # λ = 0 drops the output-preserving term: the model drifts further from the base on benign prompts.
    by_lambda = {(p["method"], p["value"]): p["prior_preservation"] for p in report.ablation_points}
    assert by_lambda["duo (base_lambda 0)", 5.0] < by_lambda["duo (base_lambda 1e+06)", 5.0]
    # Every cell's command re-runs it from its own folder's config.
    commands = re.findall(r"`duobench run --config (.+?)`", text)
    assert len(commands) == len(report.curve_points) + len(report.ablation_points) == 2 * 4 + 4
    assert all(Path(command).exists() for command in commands)

    again = reproduce_duo_paper(config, tmp_path / "report", ("ring-a-bell",), stages)  # all cached
    assert sum(point["images_generated"] for point in again.curve_points + again.ablation_points) == 0


def test_an_unsupported_setting_or_attack_is_refused_before_anything_runs(tmp_path):
    with pytest.raises(DuobenchError, match="nudity on an SD model"):
        paper_setting("toy", "nudity")
    with pytest.raises(DuobenchError, match="not among them"):
        reproduce_duo_paper(RunConfig(model="toy", concept="star"), tmp_path, ("p4d",))
    assert paper_setting("CompVis/stable-diffusion-v1-4", None).table_betas == (500.0, 250.0)
    with pytest.raises(DuobenchError, match="Table 4.*--sweep beta="):
        paper_setting("sd3-medium", None)
