"""The engine's promises under hostile conditions: SIGKILL mid-run, and several processes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

N_PROMPTS = 24


def write_prompts(path: Path) -> Path:
    path.write_text("".join(f"prompt number {i}\n" for i in range(N_PROMPTS)))
    return path


def generate_command(prompts: Path, out: Path, store: Path, batch_size: int = 2) -> list[str]:
    return [
        sys.executable,
        "-m",
        "duobench.cli",
        "generate",
        "--model",
        "tiny-random",
        "--prompts",
        str(prompts),
        "--out",
        str(out),
        "--cache-dir",
        str(store),
        "--steps",
        "12",
        "--batch-size",
        str(batch_size),
        "--device",
        "cpu",
    ]


def manifest_rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_sigkill_mid_run_then_rerun_gives_every_item_once(tmp_path):
    prompts = write_prompts(tmp_path / "p.txt")
    out, store = tmp_path / "run", tmp_path / "store"
    process = subprocess.Popen(
        generate_command(prompts, out, store),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.time() + 120
    manifest = out / "manifest.jsonl"
    while time.time() < deadline:
        if manifest.exists() and manifest.read_text().count("\n") >= 4:
            break
        time.sleep(0.05)
    os.killpg(process.pid, signal.SIGKILL)
    process.wait()
    finished_before = manifest.read_text().count("\n")
    assert 4 <= finished_before < N_PROMPTS, "the kill must land mid-run for this test to mean anything"

    subprocess.run(generate_command(prompts, out, store), check=True, capture_output=True)
    rows = manifest_rows(out)
    keys = [row["key"] for row in rows]
    assert len(keys) == len(set(keys)) == N_PROMPTS
    assert sorted(row["item"]["prompt"] for row in rows) == sorted(f"prompt number {i}" for i in range(N_PROMPTS))
    for row in rows:
        with Image.open(row["path"]) as image:
            image.load()  # raises on a truncated PNG
    assert not list(store.rglob("*.tmp")), "no temporary file may survive into the final store"


def test_two_torchrun_processes_give_the_single_process_images(tmp_path):
    prompts = write_prompts(tmp_path / "p.txt")
    single_out, single_store = tmp_path / "single", tmp_path / "single-store"
    subprocess.run(generate_command(prompts, single_out, single_store, batch_size=8), check=True, capture_output=True)

    multi_out, multi_store = tmp_path / "multi", tmp_path / "multi-store"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    command = torchrun + generate_command(prompts, multi_out, multi_store, batch_size=3)[2:]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-2000:]

    single = {row["key"]: row for row in manifest_rows(single_out)}
    multi = {row["key"]: row for row in manifest_rows(multi_out)}
    assert single.keys() == multi.keys() and len(multi) == N_PROMPTS
    assert not list(multi_out.glob("manifest.rank*.jsonl")), "rank shards are merged and removed"
    for key in single:
        a = np.asarray(Image.open(single[key]["path"]), dtype=np.float64) / 255
        b = np.asarray(Image.open(multi[key]["path"]), dtype=np.float64) / 255
        assert np.abs(a - b).mean() <= 1 / 255
