"""A run's configuration: the `RunConfig` dataclass, how it is assembled (defaults < YAML file < command
line), and its validation. `check_run_config` coerces every field to its type and checks its range before
any model loads, so ``limit: abc`` in a ``--config`` file or ``--strength 1.5`` is one clear error in the
first second, not a traceback after an hour of training.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
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
    """What FID compares with (`duobench.metrics.fid_reference`): ``base``, ``coco-val2014``, ``toy-shapes``, a
    folder of real images or a clean-fid ``.npz``; empty: the concept's ``fid_reference``."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Overrides of the concept's metric presets (prior_preservation, clip_score, fid)."""
    guard: str = "none"
    """A guard in front of or behind the evaluated model (`duobench ls guards`); its refusals count as
    defended, and its false refusals on the benign prompts are reported (`duobench.guards.base`)."""
    guard_options: dict[str, Any] = field(default_factory=dict)
    guidance: float | None = None
    """The classifier-free guidance scale of the attack-phase and pre-attack images, replacing each prompt row's
    own and the concept's; None keeps those. The attack itself still searches at the rows' guidance, and the
    benign images keep theirs (`--sweep guidance=...` draws DSR against it)."""
    threads: int | None = None
    """torch CPU threads. A CPU-trained artifact depends on them (see `duobench.methods.training_numerics`),
    so a run on a CPU records the count it used here, and a re-run of its config uses it again."""


NOT_REPRODUCIBILITY = ("out", "device", "batch_size")
"""Settings that change where or how fast a run is computed, not its numbers."""


def reproducible_config(config: RunConfig) -> dict[str, Any]:
    """The config a published row records (``run_config``): everything that can change its numbers."""
    return {key: value for key, value in asdict(config).items() if key not in NOT_REPRODUCIBILITY}


def metric_presets(concept: Concept, config: RunConfig) -> dict[str, str]:
    return {**METRIC_DEFAULTS, **concept.metrics, **config.metrics}


def method_options(concept: Concept, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The concept's defaults for this method (sized for its model family) under the user's options, with the
    classifier a method optimises against resolved and checked against the judge (`duobench.methods.with_scorer`)."""
    options = {**concept.method_options.get(method, {}), **overrides}
    if method in ("none", ""):
        return options
    from duobench.methods import with_scorer
    from duobench.registry import METHODS

    return with_scorer(METHODS.get(method), options, concept)


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
    if config.guidance is not None:
        try:
            config.guidance = float(config.guidance)
            if not 0.0 <= config.guidance < float("inf"):
                raise ValueError
        except (TypeError, ValueError):
            problems.append(f"guidance must be a finite number >= 0 (1 turns guidance off), got {config.guidance!r}")
    config.batch_size = str(config.batch_size)
    try:
        import torch

        resolve_batch_size(config.batch_size, torch.device("cpu"))
    except DuobenchError as error:
        problems.append(str(error).rstrip("."))
    for name in ("method_options", "attack_options", "guard_options", "metrics"):
        if not isinstance(getattr(config, name), dict):
            problems.append(f"{name} must be a mapping, got {getattr(config, name)!r}")
    for name in ("method", "attack", "guard", "concept", "model", "prompt_set", "fid_reference", "out"):
        if not isinstance(getattr(config, name), str):
            problems.append(f"{name} must be text, got {getattr(config, name)!r}")
    if problems:
        raise DuobenchError("Bad run configuration: " + "; ".join(problems) + ".")
    check_model_family(config.concept, config.model)
    return config


MODEL_FAMILIES = {
    "toy": "the toy shapes world (family toy)",
    "sd": "a Stable Diffusion checkpoint (family sd: an HF hub id, a diffusers folder or a .ckpt/.safetensors file)",
    "tiny-random": "the tiny random test pipeline (family tiny-random)",
    "sd3": "a Stable Diffusion 3 checkpoint (family sd3: sd3-medium, or an HF hub id naming stable-diffusion-3)",
    "tiny-random-sd3": "the tiny random SD3 test pipeline (family tiny-random-sd3)",
    "toy-sd3": "the SD3 toy model of the shapes world (family toy-sd3)",
}
"""The families `model_family` knows, as an error message describes them."""
FAMILY_EXAMPLE_MODEL = {"toy": "toy", "sd": "CompVis/stable-diffusion-v1-4", "sd3": "sd3-medium", "toy-sd3": "toy-sd3"}
ANY_CONCEPT_FAMILIES = ("tiny-random", "tiny-random-sd3")
"""Families every concept accepts: the tiny-random models have random weights and exist to exercise the SD1
and SD3 plumbing offline, so no concept is meaningful on them and none is more wrong than another."""


def model_family(model: str) -> str:
    """The family of a ``--model``, read from its name alone (nothing loads): ``toy``, ``toy-sd3``,
    ``tiny-random`` and ``tiny-random-sd3`` are their own; ``sd3-medium`` and hub ids naming
    ``stable-diffusion-3`` are ``sd3``; every other model (an HF hub id, a diffusers folder, a single-file
    checkpoint, a plugin's registered model) is ``sd``. Telling SD1.x from SD2.x without reading the weights
    would be a guess."""
    if model in ("toy", "toy-sd3", "tiny-random", "tiny-random-sd3"):
        return model
    return "sd3" if model == "sd3-medium" or "stable-diffusion-3" in model.lower() else "sd"


def concept_fits(concept: Concept, model: str) -> bool:
    family = model_family(model)
    return not concept.model_families or family in concept.model_families or family in ANY_CONCEPT_FAMILIES


def default_concept(model: str) -> str:
    """The concept of a run that names none: `RunConfig`'s default (nudity) when it fits ``model``, else the
    one built-in concept made for the model's family (``--model toy`` → star)."""
    from duobench.concepts import builtin_concepts, load_concept

    default = RunConfig().concept
    if concept_fits(load_concept(default), model):
        return default
    fitting = [name for name in builtin_concepts() if model_family(model) in load_concept(name).model_families]
    return fitting[0] if len(fitting) == 1 else default


def check_model_family(concept: Concept | str, model: str) -> None:
    """Refuse, before any model loads, a concept that is not made for the model's family (``--concept nudity
    --model toy`` would build "naked" image pairs from a shapes model for a quarter of an hour)."""
    from duobench.concepts import builtin_concepts, load_concept

    if isinstance(concept, str):
        try:
            concept = load_concept(concept)
        except DuobenchError:
            return  # an unknown or broken concept fails with its own message where it is loaded
    if concept_fits(concept, model):
        return
    family = model_family(model)
    fitting = [name for name in builtin_concepts() if family in load_concept(name).model_families]
    made_for = " or ".join(MODEL_FAMILIES.get(f, f"family {f}") for f in concept.model_families)
    fixes = []
    if fitting:
        omitted = " (or leave --concept out)" if default_concept(model) == fitting[0] else ""
        fixes.append(f"a concept made for this model: {' or '.join('--concept ' + n for n in fitting)}{omitted}")
    examples = [FAMILY_EXAMPLE_MODEL[f] for f in concept.model_families if f in FAMILY_EXAMPLE_MODEL]
    if examples:
        fixes.append(f"a model made for {concept.name!r}, such as --model {examples[0]}")
    raise DuobenchError(
        f"Concept {concept.name!r} is made for {made_for}, but --model {model} is "
        f"{MODEL_FAMILIES.get(family, f'family {family}')}. Use "
        + ("; or ".join(fixes) or "another concept or model")
        + ". A concept file lists the model families it is meaningful for under model_families."
    )


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
    if "concept" not in values and isinstance(values.get("model"), str):
        values["concept"] = default_concept(values["model"])  # --model toy alone runs the toy's own concept
    known = {f.name for f in fields(RunConfig)}
    unknown = sorted(set(values) - known - {"sweep", "methods", "attacks"})
    if unknown:
        raise DuobenchError(f"Unknown run option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}.")
    return check_run_config(RunConfig(**{key: value for key, value in values.items() if key in known})), values
