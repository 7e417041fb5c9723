"""A run's configuration: the `RunConfig` dataclass, how it is assembled (defaults < YAML file < command
line), and its validation. `check_run_config` coerces every field to its type and checks its range before
any model loads, so ``limit: abc`` in a ``--config`` file or ``--strength 1.5`` is one clear error in the
first second, not a traceback after an hour of training.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from duobench.concepts import Concept
from duobench.errors import DuobenchError

METRIC_DEFAULTS = {
    "prior_preservation": "lpips-alex-64",
    "clip_score": "clip-vit-l14-x100",
    "fid": "fid-clean",
}


@dataclass
class RunConfig:
    """Everything a run depends on; saved as ``config.yaml`` beside the results."""

    method: str = "duo"
    attack: str = "none"
    concept: str = "nudity"
    model: str = "CompVis/stable-diffusion-v1-4"
    strength: float = 1.0
    method_options: dict[str, Any] = field(default_factory=dict)
    attack_options: dict[str, Any] = field(default_factory=dict)
    prompt_set: str = ""
    """A name from the concept's ``prompt_sets`` (default: its first)."""
    limit: int | None = None
    """Only the first N prompts of the prompt set (each with all its seeds)."""
    benign_limit: int | None = None
    attack_steps: int | None = None
    attack_queries: int | None = None
    batch_size: str = "auto"
    device: str | None = None
    out: str = "runs/latest"
    fid_reference: str = ""
    """Folder / ``.npz`` of reference statistics for FID (e.g. MS-COCO val); empty: the base model's
    benign images are the reference, which measures drift from the original model."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Overrides of the concept's metric presets (prior_preservation, clip_score, fid)."""
    threads: int | None = None
    """torch CPU threads. A CPU-trained artifact depends on them (see `duobench.methods.training_numerics`),
    so a run on a CPU records the count it used here, and a re-run of its config uses it again."""


def metric_presets(concept: Concept, config: RunConfig) -> dict[str, str]:
    return {**METRIC_DEFAULTS, **concept.metrics, **config.metrics}


def method_options(concept: Concept, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The concept's defaults for this method (sized for its model family) under the user's options."""
    return {**concept.method_options.get(method, {}), **overrides}


def attack_options(concept: Concept, attack: str, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**concept.attack_options.get(attack, {}), **overrides}


def apply_threads(config: RunConfig) -> None:
    """Use the config's torch CPU thread count, if it names one."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)


INTEGER_FIELDS = {
    "limit": 1,
    "benign_limit": 1,
    "attack_steps": 1,
    "attack_queries": 1,
    "threads": 1,
}
"""Optional whole-number fields and their smallest allowed value."""


def check_run_config(config: RunConfig) -> RunConfig:
    """``config`` with every field coerced to its type (YAML and CLI text included), or a `DuobenchError`
    naming each bad field."""
    from duobench.engine import resolve_batch_size

    problems: list[str] = []
    for name, smallest in INTEGER_FIELDS.items():
        value = getattr(config, name)
        if value is None:
            continue
        try:
            number = float(value)
            if not number.is_integer():
                raise ValueError
            setattr(config, name, int(number))
        except (TypeError, ValueError):
            problems.append(f"{name} must be a whole number, got {value!r}")
            continue
        if getattr(config, name) < smallest:
            problems.append(f"{name} must be at least {smallest}, got {value!r}")
    try:
        config.strength = float(config.strength)
        if not 0.0 <= config.strength <= 1.0:
            problems.append(f"strength interpolates the base model (0) to the full edit (1), got {config.strength}")
    except (TypeError, ValueError):
        problems.append(f"strength must be a number in [0, 1], got {config.strength!r}")
    config.batch_size = str(config.batch_size)
    try:
        import torch

        resolve_batch_size(config.batch_size, torch.device("cpu"))
    except DuobenchError as error:
        problems.append(str(error).rstrip("."))
    for name in ("method_options", "attack_options", "metrics"):
        if not isinstance(getattr(config, name), dict):
            problems.append(f"{name} must be a mapping, got {getattr(config, name)!r}")
    for name in ("method", "attack", "concept", "model", "prompt_set", "fid_reference", "out"):
        if not isinstance(getattr(config, name), str):
            problems.append(f"{name} must be text, got {getattr(config, name)!r}")
    if problems:
        raise DuobenchError("Bad run configuration: " + "; ".join(problems) + ".")
    return config


def resolve_run_config(config_file: Path | None, cli_values: dict) -> tuple[RunConfig, dict[str, Any]]:
    """Defaults < the YAML file < options given on the command line; checked by `check_run_config`."""
    import yaml

    values: dict[str, Any] = {}
    if config_file is not None:
        if not config_file.exists():
            raise DuobenchError(f"Config file {config_file} does not exist.")
        loaded = yaml.safe_load(config_file.read_text()) or {}
        if not isinstance(loaded, dict):
            raise DuobenchError(f"Config file {config_file} must be a mapping of run options.")
        values.update(loaded)
    values.update({key: value for key, value in cli_values.items() if value not in (None, {}, [])})
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(values) - known - {"sweep", "methods", "attacks"})
    if unknown:
        raise DuobenchError(f"Unknown run option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    return check_run_config(RunConfig(**{key: value for key, value in values.items() if key in known})), values
