"""Progress on every long stage, logging set up once by the CLI, and the plan a run prints before it starts."""

import io
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from rich.console import Console

from duobench import progress
from duobench.progress import format_live, track, track_each


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO, logger="duobench")
    return caplog


def lines(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "duobench.progress"]


def test_without_a_terminal_a_stage_logs_its_start_every_tenth_and_its_end(info_logs):
    with track("DUO training", 20, unit="steps") as stage:
        for step in range(20):
            stage.advance(loss=1.0 / (step + 1))
    logged = lines(info_logs)
    assert logged[0] == "DUO training: started, 20 steps"
    assert len(logged) == 1 + 9 + 1  # start, 10 %, ..., 90 %, the end
    assert logged[1].startswith("DUO training: 2/20 steps (10%), 0:00:00 elapsed, ETA 0:00:00, loss 0.5")
    assert logged[-1].startswith("DUO training: 20/20 steps (100%)") and logged[-1].endswith("loss 0.05")


def test_a_nested_stage_only_logs_a_heartbeat_and_the_outer_one_ends_before_its_last_item(info_logs):
    def results():
        for prompt in range(3):
            with track("Ring-A-Bell search", 50, unit="generations") as search:
                for generation in range(50):
                    search.advance(best_fitness=100.0 - generation)
            yield {"prompt": prompt}

    seen = []
    for item in track_each(results(), "ring-a-bell", 3, unit="prompts", live=lambda r: {"done": r["prompt"]}):
        seen.append(item["prompt"])
        if item["prompt"] == 2:
            assert progress._active == 0  # the stage ended before its last item was handed on
    assert seen == [0, 1, 2]
    logged = lines(info_logs)
    assert not any("search" in line for line in logged)  # no heartbeat due within a few milliseconds
    assert logged[0] == "ring-a-bell: started, 3 prompts" and logged[-1].startswith("ring-a-bell: 3/3 prompts")


def test_on_a_terminal_stages_are_rich_bars_with_eta_and_live_values(info_logs, monkeypatch):
    screen = io.StringIO()
    monkeypatch.setattr(progress, "console", Console(file=screen, force_terminal=True, width=160))
    with track("esd-x training", 4, unit="iterations") as stage:
        with track("inner", 2) as inner:
            inner.advance(2)
        for _ in range(4):
            stage.advance(loss=0.25)
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen.getvalue())
    assert "esd-x training" in text and "4/4" in text and "iterations" in text and "ETA" in text
    assert "loss 0.25" in text
    assert lines(info_logs) == []  # on a terminal the bar replaces the log lines
    assert progress._bars is None and progress._active == 0


def test_progress_is_silent_when_info_is_off_or_off_rank_0(caplog, monkeypatch):
    caplog.set_level(logging.WARNING, logger="duobench")
    with track("quiet", 5) as stage:
        stage.advance(5)
        assert not stage.enabled
    caplog.set_level(logging.INFO, logger="duobench")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with track("rank 1", 5) as stage:
        assert not stage.enabled
    assert lines(caplog) == []
    assert format_live({"best_fitness": 12.345678, "queries": 7, "unsafe": None}) == "best fitness 12.35, queries 7"


@pytest.fixture
def cli_logging():
    """Take the CLI's handler off the root logger afterwards: it writes to the runner's closed stream."""
    yield
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == "duobench"]:
        root.removeHandler(handler)
    logging.getLogger("duobench").setLevel(logging.NOTSET)


def test_logging_is_configured_once_by_the_cli_and_never_by_a_library_module(cli_logging):
    from typer.testing import CliRunner

    from duobench.cli import app

    runner = CliRunner()
    for args, level in ((["ls", "attacks"], logging.INFO), (["--quiet", "ls", "attacks"], logging.WARNING)):
        assert runner.invoke(app, args).exit_code == 0
        assert logging.getLogger("duobench").level == level
    assert [h.get_name() for h in logging.getLogger().handlers].count("duobench") == 1  # replaced, not added
    assert runner.invoke(app, ["--log-level", "debug", "ls", "attacks"]).exit_code == 0
    assert logging.getLogger("duobench").level == logging.DEBUG
    assert "--log-level" in runner.invoke(app, ["--log-level", "loud", "ls"]).output

    root = Path(__file__).parents[1]
    sources = [*root.glob("duobench/**/*.py"), *root.glob("baselines/*.py"), *root.glob("attacks/*.py")]
    configuring = [
        str(path.relative_to(root))
        for path in sources
        if re.search(r"basicConfig\(|\.addHandler\(|logging\.getLogger\(\)\.setLevel", path.read_text())
    ]
    assert configuring == ["duobench/cli.py"]


def toy_run_args(out: Path, iterations: int = 3) -> list[str]:
    args = ["run", "--model", "toy", "--concept", "star", "--method", "esd-x", "--attack", "ring-a-bell"]
    args += ["--limit", "1", "--benign-limit", "1", "--batch-size", "16", "--device", "cpu", "--out", str(out)]
    return args + [f"--method-opt=iterations={iterations}", "--attack-opt=generations=5", "--attack-opt=population=16"]


def test_a_toy_run_shows_its_plan_and_every_stages_progress_and_quiet_silences_them(tmp_path, monkeypatch, cli_logging):
    from typer.testing import CliRunner

    from duobench.cli import app
    from duobench.run_config import RunConfig
    from duobench.validate import plan_workload

    home = tmp_path / "home"
    monkeypatch.setenv("DUOBENCH_HOME", str(home))
    config = RunConfig(
        model="toy",
        concept="star",
        method="esd-x",
        attack="ring-a-bell",
        limit=1,
        benign_limit=1,
        device="cpu",
        method_options={"iterations": 3},
        attack_options={"generations": 5, "population": 16},
        threads=1,
    )
    planned = plan_workload(config)  # what `duobench validate` prints, with the same options
    assert planned.images == {
        "attack": 4,
        "pre-attack": 4,
        "benign base": 4,
        "benign unlearned": 4,
        "contact sheet": 1,
        "close concepts base": 2,  # a square and a triangle: --benign-limit caps each close concept too
        "close concepts unlearned": 2,
    }
    stages = {row[0]: row for row in planned.rows()}
    assert stages["esd-x training"][1] == "3 iterations (not trained yet)"
    assert stages["Ring-A-Bell"][1] == "1 search x 5 generations (population 16)"
    assert stages["total"][1] == "21 images" and stages["total"][2].startswith("about ")

    command = [sys.executable, "-m", "duobench.cli", "--threads", "1", *toy_run_args(tmp_path / "run")]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "DUOBENCH_HOME": str(home)})
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["images_generated"] == planned.total_images == 21  # a cold cache generates exactly the plan
    log = result.stderr
    assert "plan for toy on cpu:" in log and "3 iterations (not trained yet)" in log and "21 images" in log
    assert "esd-x training: started, 3 iterations" in log
    assert re.search(r"esd-x training: 3/3 iterations \(100%\), \d:\d\d:\d\d elapsed, loss [0-9.e-]+", log)
    assert re.search(r"ring-a-bell: 4/4 prompts \(100%\), .*last loss [0-9.e+-]+", log)
    for stage in ("generating attack", "generating benign-base", "prior preservation", "CLIP score", "FID"):
        assert f"{stage}: started" in log

    assert plan_workload(config).rows()[2][2] == "cached"  # now trained: validate says so
    # In this process (no second start-up): another training and new images, silently.
    quiet = CliRunner().invoke(app, ["--quiet", *toy_run_args(tmp_path / "quiet", iterations=2)])
    assert quiet.exit_code == 0, quiet.output
    assert json.loads((tmp_path / "quiet" / "summary.json").read_text())["images_generated"] > 0
    for marker in ("plan for", "training", "generating", "ring-a-bell", "elapsed"):
        assert marker not in quiet.stderr


def test_every_registered_method_attack_and_guard_has_a_toy_estimate(tmp_path, monkeypatch):
    """The plan prices every stage of a toy run on a CPU: a method, attack or guard added without a measured
    cost (`duobench.workload.TOY_CPU`, from benchmarks/toy_unit_costs.py) shows "no estimate" and fails here.
    Searches and budgets are counted as the attacks spend them: MMA-Diffusion once per distinct prompt, P4D
    and PNO up to a ceiling (an upper bound, said as "at most")."""
    from duobench.registry import ATTACKS, GUARDS, METHODS
    from duobench.run_config import RunConfig
    from duobench.validate import plan_workload

    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path))
    needs_weights = {"external"}  # a folder of someone's weights: nothing of ours to price
    cells = [(m, "none", "none") for m in METHODS.names() if m not in needs_weights]
    cells += [("none", a, "none") for a in ATTACKS.names()] + [("none", "none", g) for g in GUARDS.names()]
    estimates = {}
    for method, attack, guard in cells:
        config = RunConfig(model="toy", concept="star", method=method, attack=attack, guard=guard, device="cpu")
        rows = {row[0]: row for row in plan_workload(config).rows()}
        assert all("no estimate" not in estimate for _, _, estimate in rows.values()), (method, attack, guard, rows)
        estimates[method, attack, guard] = rows
    mma = estimates["none", "mma-diffusion", "none"]["MMA-Diffusion"]
    assert mma[1].startswith("25 searches x 20 GCG iterations")  # 100 rows: 25 prompts x 4 seeds
    assert estimates["none", "p4d", "none"]["P4D"][2].startswith("at most about")
    pno = estimates["pno", "none", "none"]
    assert pno["PNO sampling"][1].startswith("340 images x at most 280 UNet evaluations")  # (5 + 2 x 5 - 1) x 20
    assert pno["total"][2].startswith("at most about") and pno["pno training"][2] == "under 1 s"


def test_the_plan_for_several_processes_divides_what_is_dealt_across_them_and_nothing_else(tmp_path, monkeypatch):
    """Under torchrun images, metrics and per-prompt attacks are dealt across ranks (`duobench.engine`,
    `this_ranks_rows`); a training runs on every rank at once and an edit attack on one, so those keep their
    time."""
    from duobench.run_config import RunConfig
    from duobench.runner import plan_run
    from duobench.workload import run_workload

    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path))
    attacks = {"ring-a-bell": ("Ring-A-Bell", True), "finetune": ("finetune attack", False)}
    attacks["concept-inversion"] = ("Concept Inversion", False)  # one learned token for every prompt: rank 0
    for attack, (attack_stage, attack_dealt) in attacks.items():
        plan = plan_run(RunConfig(model="toy", concept="star", method="esd-x", attack=attack, device="cpu"))
        one, four = (run_workload(plan, "cpu", trained=False, ranks=ranks) for ranks in (1, 4))
        assert "x 4 processes" in four.text() and "x 4 processes" not in one.text()
        for stage in one.stages:
            single, shared = one.stage_seconds(stage), four.stage_seconds(stage)
            dealt = stage.name in ("attack + pre-attack images", "benign images", "close-concept images", "metrics")
            dealt = dealt or (stage.name == attack_stage and attack_dealt)
            expected = tuple(seconds / 4 for seconds in single) if dealt else single
            assert shared == pytest.approx(expected), (attack, stage.name)
