"""Bad input gets one paragraph naming the problem and the fix, a non-zero exit, and no traceback."""

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "duobench.cli", *args], capture_output=True, text=True)


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["generate", "--model", "tiny-random", "--prompts", "/no/such/file.csv", "--out", "OUT"],
            "does not exist",
        ),
        (
            ["generate", "--model", "tiny-randm", "--prompts", "PROMPTS", "--out", "OUT"],
            "Did you mean 'tiny-random'",
        ),
        (
            ["generate", "--model", "CompVis/stable-diffusion-v1-4", "--prompts", "PROMPTS", "--out", "OUT"],
            "Provide it in one of these ways",
        ),
        (["generate", "--model", "tiny-random", "--prompts", "BADCSV", "--out", "OUT"], "no 'prompt' column"),
        (["ls", "nonsense"], "Unknown registry"),
        (["run", "--model", "toy", "--concept", "nudity", "--out", "OUT"], "Use a concept made for this model"),
        (["run", "--config", "CONFIG", "--out", "OUT"], "limit must be a whole number, got 'abc'"),
    ],
)
def test_errors_are_one_paragraph_without_traceback(tmp_path, args, expected):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("text\nhello\n")
    config = tmp_path / "config.yaml"
    config.write_text("model: toy\nlimit: abc\n")
    substitutions = {
        "PROMPTS": str(prompts),
        "OUT": str(tmp_path / "out"),
        "BADCSV": str(bad_csv),
        "CONFIG": str(config),
    }
    result = run_cli(*[substitutions.get(arg, arg) for arg in args])
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert expected in " ".join(result.stderr.split())
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "--limit", "many"], "Invalid value for '--limit'"),
        (["nosuch"], "No such command"),
        (["--threads", "0", "ls"], "--threads"),
    ],
)
def test_usage_errors_are_short_without_traceback(args, expected):
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert expected in result.stderr
    assert len(result.stderr.strip().splitlines()) <= 4


def test_help_and_ls_work():
    assert run_cli("--help").returncode == 0
    listing = run_cli("ls", "models")
    assert listing.returncode == 0 and "tiny-random" in listing.stdout


def test_a_leaderboard_check_that_recomputes_nothing_fails(tmp_path):
    """Provenance alone proves nothing: with no method artifact here, --check exits non-zero and says so."""
    import pandas as pd

    from duobench.paths import duobench_home

    published = pd.read_csv("leaderboards/toy-star.csv")
    duo_rows = tmp_path / "duo-only.csv"
    published[published.method == "duo"].head(1).to_csv(duo_rows, index=False)
    result = run_cli("leaderboard", "--check", str(duo_rows))
    assert result.returncode == 1, result.stdout + result.stderr
    assert "0 of 1 rows recomputed" in result.stdout
    assert "nothing was checked" in result.stderr
    assert not (duobench_home() / "artifacts" / "duo").exists() or not any(
        (duobench_home() / "artifacts" / "duo").iterdir()
    )
