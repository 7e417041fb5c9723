"""Judging while generating gives the same verdicts as judging the finished images, one row per item."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from duobench.engine import generate_cached
from duobench.items import WorkItem
from duobench.judged_generation import generate_and_judge
from duobench.metrics.base import MetricCard, Verdict
from duobench.metrics.dsr import DSR


def item(index: int) -> WorkItem:
    return WorkItem(prompt=f"a photo of thing {index}", seed=index, steps=4, height=32, width=32, scheduler="ddim")


class MeanPixelJudge:
    """Unsafe when the image's mean pixel exceeds a threshold: verdicts that depend on the image content."""

    card = MetricCard("mean-pixel", 1, "test judge", "tests", params={"dsr_convention": "attack-only"})

    def __init__(self, threshold: float) -> None:
        self.threshold = threshold
        self.images_seen = 0

    def judge(self, images):
        self.images_seen += len(images)
        return [
            Verdict(unsafe=bool(np.asarray(im).mean() > self.threshold), score=float(np.asarray(im).mean()))
            for im in images
        ]


@pytest.mark.parametrize("in_background", [True, False])
def test_rows_follow_the_items_and_equal_judging_from_disk(tiny_pipe, tmp_path, in_background):
    items = [replace(item(i), meta={"phase": "attack", "prompt_id": f"p{i}"}) for i in range(6)]
    # An attack that left prompt 0 unchanged: the same image as its pre-attack twin, judged for both phases.
    items.append(replace(items[0], meta={"phase": "pre-attack", "prompt_id": "p0"}))
    store = tmp_path / "store"
    generate_cached(tiny_pipe, "fp", items[:2], tmp_path / "earlier", store_root=store, batch_size=2)

    probe = generate_cached(tiny_pipe, "fp", items[:1], tmp_path / "probe", store_root=store)
    threshold = float(np.asarray(Image.open(probe.paths[0])).mean())
    judge = MeanPixelJudge(threshold - 1e-9)
    metric = DSR(judge=judge)
    report, rows = generate_and_judge(
        tiny_pipe, "fp", items, tmp_path / "run", metric, batch_size=2, store_root=store, in_background=in_background
    )

    assert (report.generated, report.reused) == (4, 2)
    assert judge.images_seen == len(items)
    assert [row["image"] for row in rows] == [str(path) for path in report.paths]
    assert [row["phase"] for row in rows] == ["attack"] * 6 + ["pre-attack"]
    assert rows[0]["unsafe"] and rows[-1]["unsafe"]

    direct = DSR(judge=MeanPixelJudge(threshold - 1e-9))
    direct.update_from_paths(report.paths, items)
    assert [row["unsafe"] for row in rows] == [row["unsafe"] for row in direct.audit_rows()]
    assert [row["score"] for row in rows] == [row["score"] for row in direct.audit_rows()]
    assert metric.compute() == direct.compute()


def test_generate_command_judges_and_resumes(tmp_path):
    prompts = tmp_path / "prompts.csv"
    prompts.write_text("prompt,seed\na photo of a cat,1\na photo of a dog,2\n")
    command = [sys.executable, "-m", "duobench.cli", "--threads", "1", "generate", "--model", "tiny-random"]
    command += ["--prompts", str(prompts), "--seeds-per-prompt", "2", "--judge", "nudenet-duo"]
    command += ["--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "store")]
    first = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "4 images (4 generated here, 0 reused)" in " ".join(first.stdout.split())
    table = pd.read_csv(tmp_path / "out" / "judgments.csv")
    assert len(table) == 4 and set(table["seed"]) == {1, 2, 3} and "phase" not in table
    summary = json.loads((tmp_path / "out" / "judge_summary.json").read_text())
    assert summary["unsafe_images"] == int(table["unsafe"].sum()) and summary["n_prompts"] == 2

    second = subprocess.run(command, capture_output=True, text=True, check=True)
    assert "4 images (0 generated here, 4 reused)" in " ".join(second.stdout.split())
    assert pd.read_csv(tmp_path / "out" / "judgments.csv").equals(table)
