"""`duobench run` and `duobench leaderboard` on several processes give the one-process numbers (toy world).

Two torchrun ranks on the CPU (gloo) split the images, the judging, the metrics and Ring-A-Bell's prompts;
`leaderboard --shard i/n` jobs plus `--merge` split a grid into ordinary processes. Every comparison is
against one process with the same thread count (a CPU training depends on it) and its own, empty
DUOBENCH_HOME, so nothing is shared between the runs compared.
"""

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from duobench.errors import DuobenchError
from duobench.leaderboard import grid_cells, merge_grid, parse_shard, shard_cells
from duobench.run_config import RunConfig

DUOBENCH = [sys.executable, "-m", "duobench.cli", "--threads", "1"]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
TOY = ["--model", "toy", "--concept", "star", "--limit", "2", "--benign-limit", "6"]
RING_A_BELL = ["--attack-opt", "k=8", "--attack-opt", "population=32", "--attack-opt", "generations=8"]
EXACT = ("dsr", "dsr_ci", "dsr_pre_attack", "prior_preservation", "clip_score", "n_prompts", "n_seeds", "n_benign")
EXACT += ("images_generated", "images_reused", "checkpoint_sha256", "method_config", "attack_config", "edits")


def duobench(arguments: list[str], home: Path, processes: int = 1) -> subprocess.CompletedProcess:
    command = (TORCHRUN + DUOBENCH[2:] if processes == 2 else DUOBENCH) + arguments
    environment = {**os.environ, "DUOBENCH_HOME": str(home), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, capture_output=True, text=True, env=environment, timeout=900)
    assert result.returncode == 0, result.stdout[-1500:] + result.stderr[-3000:]
    return result


def assert_same_numbers(one: dict, two: dict) -> None:
    for key in EXACT:
        assert one[key] == two[key], key
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-6)  # float64 sums merged in another order


def test_run_on_two_processes_gives_the_one_process_numbers(tmp_path):
    run = ["run", *TOY, "--method", "uce", "--attack", "ring-a-bell", *RING_A_BELL, "--batch-size", "16"]
    single = duobench([*run, "--out", str(tmp_path / "one")], tmp_path / "home-one")
    result = duobench([*run, "--out", str(tmp_path / "two")], tmp_path / "home-two", processes=2)

    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert_same_numbers(one, two)
    assert two["environment"]["processes"] == 2 and "processes" not in one["environment"]
    # 16 judged, 2 x 24 benign, 2 x 12 close-concept and 2 contact-sheet base images, each made once by a rank.
    assert two["images_generated"] == 90 and two["n_prompts"] == 2
    # Every image's verdict and per-image metric, in the same order (image paths differ: two stores).
    audit_one = pd.read_parquet(tmp_path / "one" / "audit.parquet").drop(columns=["image", "base_image"])
    audit_two = pd.read_parquet(tmp_path / "two" / "audit.parquet").drop(columns=["image", "base_image"])
    pd.testing.assert_frame_equal(audit_one, audit_two, check_exact=False, rtol=1e-6)
    assert result.stdout.count("duobench results") == 1, "rank 0 alone prints the results"
    # Ring-A-Bell's 2 prompts x 4 seeds: one prompt per rank (rank 0 reports its own 4 rows).
    assert "ring-a-bell: started, 8 prompts" in single.stderr
    assert "ring-a-bell: started, 4 prompts" in result.stderr
    assert len(list((tmp_path / "home-two" / "attacks" / "ring-a-bell").glob("*/items/*.json"))) == 8


def test_leaderboard_on_two_processes_and_as_shards_gives_the_one_process_rows(tmp_path):
    grid = ["leaderboard", *TOY, "--methods", "none,uce", "--attacks", "none", "--folder"]
    duobench([*grid, str(tmp_path / "one"), "--out", str(tmp_path / "runs-one")], tmp_path / "home-one")
    duobench([*grid, str(tmp_path / "two"), "--out", str(tmp_path / "runs-two")], tmp_path / "home-two", processes=2)
    sharded = [*grid, str(tmp_path / "shards"), "--out", str(tmp_path / "runs-shards")]
    for shard in ("1/2", "0/2"):  # any order, each an ordinary process
        output = duobench([*sharded, "--shard", shard], tmp_path / "home-shards").stdout
        assert "--merge" in output
    assert not (tmp_path / "shards").exists(), "a shard writes no leaderboard"
    duobench([*sharded, "--merge"], tmp_path / "home-shards")

    frames = [pd.read_csv(tmp_path / name / "toy-star.csv") for name in ("one", "two", "shards")]
    numbers = ["method", "attack", "dsr", "dsr_ci_low", "dsr_ci_high", "prior_preservation", "clip_score", "n_prompts"]
    for frame in frames[1:]:
        assert len(frame) == 2
        pd.testing.assert_frame_equal(frames[0][numbers], frame[numbers], check_exact=False, rtol=1e-9)
        assert list(frame["fid"]) == pytest.approx(list(frames[0]["fid"]), rel=1e-6)
        assert list(frame["checkpoint_sha256"].fillna("")) == list(frames[0]["checkpoint_sha256"].fillna(""))
        run_config = [json.loads(text) for text in frame["run_config"]]
        assert run_config == [json.loads(text) for text in frames[0]["run_config"]]


def config(tmp_path: Path) -> RunConfig:
    return RunConfig(model="toy", concept="star", out=str(tmp_path))


def test_shards_deal_whole_trainings_and_cover_the_grid_once(tmp_path):
    cells = grid_cells(config(tmp_path), ["none", "duo", "uce"], ["none", "ring-a-bell"], training_seeds=[0, 1])
    assert len(cells) == 2 + 2 * 2 + 2  # none and uce once, duo per seed; two attacks each
    shards = [shard_cells(cells, index, 3) for index in range(3)]
    assert sorted(c.out for shard in shards for _, c in shard) == sorted(c.out for _, c in cells)
    for shard in shards:  # a training's attacks stay together: no shard waits on another's training
        trainings = {(c.method, seed) for seed, c in shard}
        assert all(sum((c.method, s) == unit for s, c in shard) == 2 for unit in trainings)
    # Fewer trainings than shards: single cells are dealt, so no shard is idle.
    two = grid_cells(config(tmp_path), ["uce"], ["none", "ring-a-bell"])
    assert [len(shard_cells(two, index, 2)) for index in range(2)] == [1, 1]


@pytest.mark.parametrize("text", ["2/2", "a/2", "-1/2", "1", "0/0"])
def test_a_bad_shard_is_refused_with_its_form(text):
    with pytest.raises(DuobenchError, match=r"i/n with 0 <= i < n"):
        parse_shard(text)


def test_merge_names_the_cells_still_missing_and_a_folder_of_another_run(tmp_path):
    base = config(tmp_path)
    cells = grid_cells(base, ["none", "uce"], ["none"])
    finished = Path(cells[0][1].out)
    finished.mkdir(parents=True)
    (finished / "summary.json").write_text("{}")
    other = replace(cells[0][1], limit=3)  # the folder holds a run with other options
    from dataclasses import asdict

    import yaml

    (finished / "config.yaml").write_text(yaml.safe_dump(asdict(other)))
    with pytest.raises(DuobenchError) as error:
        merge_grid(base, ["none", "uce"], ["none"])
    message = str(error.value)
    assert "2 of 2 cells" in message and "uce__none: not run yet" in message
    assert "none__none: holds a run of another configuration" in message and "--shard i/n" in message
