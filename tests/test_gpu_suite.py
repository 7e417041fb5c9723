"""benchmarks/gpu_suite.py: the CPU smoke run prints every figure and passes its gradient checks; the GPU peak
table matches device names as whole words; the step hook sees zero and non-finite gradients."""

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
FIGURES = (
    "generation",
    "unet_mfu",
    "duo_training",
    "ring_a_bell",
    "esd_training",
    "spm_training",
    "gradient_unlearndiffatk",
    "gradient_concept_inversion",
    "gradient_p4d",
)


@pytest.fixture(scope="module")
def gpu_suite():
    """The script as a module (it imports its sibling benchmark scripts by name)."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        import gpu_suite

        yield gpu_suite
    finally:
        sys.path.remove(str(BENCHMARKS))


def test_tiny_cpu_run_prints_every_figure_and_passes(tmp_path):
    figures_path = tmp_path / "figures.json"
    command = [sys.executable, str(BENCHMARKS / "gpu_suite.py"), "--device", "cpu", "--tiny", "--threads", "1"]
    run = subprocess.run(
        [*command, "--json", str(figures_path)],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600,
    )
    assert run.returncode == 0, run.stdout + run.stderr[-4000:]
    header, *lines = run.stdout.splitlines()
    for part in ("device cpu", "torch ", "diffusers ", "dtype float32", "gradient checks bfloat16"):
        assert part in header
    printed = {line.split()[0]: line for line in lines}
    assert list(printed) == list(FIGURES), run.stdout
    for name in ("generation", "ring_a_bell"):
        assert re.search(r": \d+\.\d+x$", printed[name]), printed[name]
    assert "MFU n/a" in printed["unet_mfu"]
    for name in ("duo_training", "esd_training", "spm_training"):
        assert re.search(r"\d+\.\d+ steps/s .*peak memory n/a", printed[name]), printed[name]
    for name in FIGURES[-3:]:
        assert printed[name].split()[1] == "ok", printed[name]
    written = json.loads(figures_path.read_text())
    assert written["environment"]["device"] == "cpu" and list(written["figures"]) == list(FIGURES)
    assert all(written["figures"][name]["ok"] for name in FIGURES[-3:])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("NVIDIA H100 80GB HBM3", 989.4),
        ("NVIDIA H100 PCIe", 756.5),
        ("NVIDIA A100-SXM4-80GB", 312.0),
        ("NVIDIA A10", 125.0),
        ("NVIDIA A10G", None),
        ("NVIDIA L40S", 362.1),
        ("NVIDIA L4", 121.0),
        ("NVIDIA GeForce RTX 4090", 165.2),
        ("Tesla T4", None),
    ],
)
def test_dense_peak_matches_whole_words(gpu_suite, name, expected):
    peak = gpu_suite.dense_bf16_peak(name)
    assert (peak[1] if peak else None) == expected


def test_step_hook_reports_each_steps_gradient(gpu_suite):
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with gpu_suite.optimiser_steps(torch.device("cpu"), gradients=True) as steps:
        for gradient in (torch.tensor([3.0, 4.0, 0.0]), torch.zeros(3), torch.tensor([math.nan, 0.0, 0.0])):
            weight.grad = gradient
            optimizer.step()
    optimizer.step()  # outside the block: not recorded
    norms = [step["grad_norm"] for step in steps]
    assert norms[:2] == [5.0, 0.0] and math.isnan(norms[2])
    assert gpu_suite.gradient_ok([5.0], [0.3])
    assert not gpu_suite.gradient_ok([0.0], [0.3]) and not gpu_suite.gradient_ok([math.nan], [0.3])
    assert not gpu_suite.gradient_ok([5.0], [math.inf]) and not gpu_suite.gradient_ok([], [])
