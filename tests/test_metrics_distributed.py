"""FID and DSR states merged over a real 2-process gloo group equal the single-process numbers."""

import json
import socket

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from duobench.metrics.base import MetricCard, Verdict, sync_state
from duobench.metrics.dsr import DSR
from duobench.metrics.fid import FID_CLEAN

FEATURE_DIM = 6
N_IMAGES = 20


class MeanColourFeatures(torch.nn.Module):
    """Deterministic features without weights: channel means and standard deviations (clean-fid contract)."""

    def forward(self, x):
        return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3))], dim=1) / 255.0


class RedJudge:
    card = MetricCard("red", 1, "test judge", "tests", params={"dsr_convention": "cumulative"})

    def judge(self, images):
        return [Verdict(unsafe=np.asarray(im)[..., 0].mean() > 127, score=0.0) for im in images]


def workload():
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)) for _ in range(N_IMAGES)]
    images = [im if i % 3 else Image.new("RGB", (24, 24), (200, 10, 10)) for i, im in enumerate(images)]
    items = [
        {"prompt": f"prompt {i % 7}", "seed": i, "phase": "pre-attack" if i < 6 else "attack"} for i in range(N_IMAGES)
    ]
    return images, items


def build_metrics(reference):
    fid = FID_CLEAN(reference=reference, feature_extractor=MeanColourFeatures(), feature_dim=FEATURE_DIM, device="cpu")
    return fid, DSR(judge=RedJudge())


def results(fid, dsr) -> dict:
    return {
        "fid": fid.compute(),
        "dsr": dsr.compute(),
        "rows": sorted(json.dumps(r) for r in dsr.audit_rows()),
    }


def write_reference(folder) -> str:
    """Reference features in clean-fid's KID statistics format, so FID and KID both have a reference."""
    path = folder / "reference.npz"
    np.savez(path, feats=np.random.default_rng(1).random((15, FEATURE_DIM)).astype(np.float32))
    return str(path)


def run_rank(rank: int, world_size: int, port: int, out: str, reference: str) -> None:
    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    images, items = workload()
    fid, dsr = build_metrics(reference)
    mine = list(range(rank, N_IMAGES, world_size))  # interleaved shards, uneven batch sizes
    for start in range(0, len(mine), 4):
        batch = mine[start : start + 4]
        fid.update([images[i] for i in batch])
        dsr.update([images[i] for i in batch], [items[i] for i in batch])
    sync_state(fid)
    sync_state(dsr)
    if rank == 0:
        with open(out, "w") as handle:
            json.dump(results(fid, dsr), handle)
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_two_process_merge_equals_single_process(tmp_path):
    images, items = workload()
    reference = write_reference(tmp_path)
    fid, dsr = build_metrics(reference)
    fid.update(images)
    dsr.update(images, items)
    single = json.loads(json.dumps(results(fid, dsr)))

    out = tmp_path / "rank0.json"
    mp.spawn(run_rank, args=(2, free_port(), str(out), reference), nprocs=2, join=True)
    merged = json.loads(out.read_text())

    assert merged["fid"]["fid"] == pytest.approx(single["fid"]["fid"], rel=1e-9)
    assert merged["fid"]["kid"] == pytest.approx(single["fid"]["kid"], rel=1e-9)
    assert merged["fid"]["n_images"] == N_IMAGES
    assert merged["dsr"] == single["dsr"]
    assert merged["rows"] == single["rows"]
    assert single["dsr"]["n_images_pre_attack"] == 6 and single["dsr"]["dsr_convention"] == "cumulative"
