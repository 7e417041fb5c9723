"""The unlearning-method contract, and training each configuration at most once.

A method is a few functions and a dataclass config, not a class hierarchy:

- ``config_cls``: a dataclass of hyper-parameters (defaults = the paper's); the concept fills the rest;
- ``train(config, pipe, concept, out_dir)``: erases ``concept`` starting from the base ``pipe`` and writes
  the artifact (safetensors + ``card.json``) into ``out_dir``; it must not leave ``pipe`` modified;
- ``apply(pipe, artifact_dir, strength)``: makes ``pipe`` generate as the unlearned model, ``strength`` in
  [0, 1] interpolating from the base model (0) to the full edit (1); the curve machinery sweeps it. It
  either edits the weights in place and returns ``None``, or returns a `duobench.generator.SamplingHook`
  for an inference-time defense (SLD's guidance, a negative prompt); the runner applies it as an
  `duobench.edits.Edit`;
- ``touches``: the model parts the edit changes (`duobench.edits.MODEL_PARTS`), which decide whose caches
  it invalidates: a method that leaves the text encoder alone shares Ring-A-Bell's prompts with the base.

Artifacts live under ``$DUOBENCH_HOME/artifacts/<method>/<key>/`` where the key hashes the method, its
config, the concept's content that training can read (`duobench.concepts.training_identity`: no comments,
descriptions, evaluation prompt sets, judges, metrics or attack options) and the base model's fingerprint:
the same configuration is never trained twice.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import Field, asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from duobench.concepts import Concept, training_identity
from duobench.errors import DuobenchError
from duobench.paths import duobench_home
from duobench.registry import METHODS

CARD_NAME = "card.json"


@dataclass(frozen=True)
class MethodSpec:
    """What a method registers: its config type and its two functions."""

    name: str
    config_cls: type
    train: Callable[..., None]
    apply: Callable[..., Any]
    description: str = ""
    touches: tuple[str, ...] = ("unet",)
    seed_fields: tuple[str, ...] = ()
    """Config fields that seed the method's randomness (noise, timesteps, training data). A leaderboard with
    training seeds sets them all to each seed in turn; empty for a deterministic method (UCE)."""
    scorer_field: str = ""
    """The config field naming the classifier (a `METRICS` judge preset) the method optimises against
    (ShieldDiff's reward, PNO's objective), "" for none. Left empty, it is filled with the concept's
    ``reward_judge`` (`method_options`), and a run refuses it when it is the evaluation judge (`scorer_name`)."""


def scorer_name(value: str, concept: Concept) -> str:
    """The classifier a method optimises against: ``value``, or the concept's ``reward_judge`` when empty.

    Refused when it is the concept's evaluation judge: a method trained or steered against the judge itself
    makes DSR measure the judge against its own target (reward hacking would pass for safety)."""
    name = value or concept.reward_judge
    if not name:
        raise DuobenchError(
            f"Concept {concept.name!r} names no reward_judge, the classifier a method optimises against; give "
            "the method one by option (a judge preset other than the evaluation judge), or add reward_judge "
            "to the concept file."
        )
    if name == concept.judge:
        raise DuobenchError(
            f"The method would optimise against {name!r}, the concept's evaluation judge: DSR would then score "
            "the method against its own target. Choose another classifier (e.g. "
            f"{concept.reward_judge or 'a second detector'!r}), or judge with another preset."
        )
    return name


def with_scorer(spec: MethodSpec, options: dict[str, Any], concept: Concept) -> dict[str, Any]:
    """``options`` with the method's scorer field resolved (`scorer_name`) and checked, so that the artifact
    key hashes the classifier actually used; unchanged for a method that optimises against none."""
    if not spec.scorer_field:
        return options
    return {**options, spec.scorer_field: scorer_name(str(options.get(spec.scorer_field) or ""), concept)}


def make_config(spec: MethodSpec, overrides: dict[str, Any] | None = None):
    """Build ``spec.config_cls`` from defaults plus ``overrides``, rejecting unknown keys by name.

    Options arrive as YAML/CLI text ("3e-4" is a string to YAML 1.1, 500 an int), so a numeric option is
    coerced to its field's type (`numeric_kind`: the default's, or the declared one of an optional field);
    that also gives beta=500 and beta=500.0 the same artifact key. A value the config itself rejects becomes
    a `DuobenchError` naming the method.
    """
    overrides = dict(overrides or {})
    known = {f.name: f for f in fields(spec.config_cls)}
    unknown = sorted(set(overrides) - set(known))
    if unknown:
        raise DuobenchError(
            f"Method {spec.name!r} has no option(s) {', '.join(unknown)}. Its options: {', '.join(sorted(known))}."
        )
    for name, value in overrides.items():
        kind = numeric_kind(known[name])
        if kind is not None and value is not None:
            overrides[name] = _number(spec.name, name, value, kind)
    try:
        return spec.config_cls(**overrides)
    except (TypeError, ValueError) as error:
        raise DuobenchError(f"Bad options for method {spec.name!r}: {error}") from error


def numeric_kind(field: Field) -> type | None:
    """``int`` or ``float`` for a numeric config field, judged by its default or, for an optional field whose
    default is None (``float | None``), by its declared type; None for any other field."""
    default = field.default
    if isinstance(default, bool):
        return None
    if isinstance(default, int | float):
        return type(default)
    declared = {part.strip() for part in str(field.type).split("|")}
    if declared & {"bool", "str"}:
        return None
    return float if "float" in declared else int if "int" in declared else None


def _number(method: str, name: str, value: Any, kind: type) -> int | float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise DuobenchError(f"Method {method!r} option {name} must be a number, got {value!r}.") from None
    if kind is int:
        if not number.is_integer():
            raise DuobenchError(f"Method {method!r} option {name} must be a whole number, got {value!r}.")
        return int(number)
    return number


def training_numerics(pipe) -> dict[str, Any]:
    """What besides the config decides a trained artifact's bits: on a CPU, torch's thread count (it sets
    the order of float sums, and the toy world's DUO training turns that into a different model: DSR 0.71
    with 2 threads, 0.45 with 1, same seeds). A GPU run's kernels do not depend on it."""
    import torch

    return {"cpu_threads": torch.get_num_threads()} if pipe.device.type == "cpu" else {}


def config_key(
    method: str, config: Any, concept: Concept, base_fingerprint: str, numerics: dict[str, Any] | None = None
) -> str:
    """The artifact key: same method + config + concept content + base weights + numerics (`training_numerics`)
    ⇒ same artifact."""
    payload = {
        "method": method,
        "numerics": numerics or {},
        "config": asdict(config) if is_dataclass(config) else config,
        "concept": training_identity(concept),
        "base": base_fingerprint,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def artifact_dir(method: str, key: str) -> Path:
    return duobench_home() / "artifacts" / method / key


def train_or_load(
    method: str,
    pipe,
    concept: Concept,
    base_fingerprint: str,
    overrides: dict[str, Any] | None = None,
    root: Path | None = None,
) -> tuple[Path, Any, bool]:
    """Return ``(artifact_dir, config, trained_now)``, training only when no finished artifact exists.

    Two processes that need the same artifact at once train it once: the first takes the artifact's lock
    (`duobench.locks.exclusive_for_job`) and trains, the second waits ("waiting for another process
    training <method> <key> …") and then loads what the first wrote. Training writes into a staging folder
    of its own (``.<key>.partial-<host>-<pid>``), renamed into place when complete: an interrupted training
    never leaves a half-written artifact that a later run would trust, and where the lock cannot exclude (a
    node-local flock on NFS) the first rename wins and the other process keeps it.

    Under a process group every rank calls this together, as before: rank 0 takes the lock for the job and
    decides (by broadcast) whether the artifact exists, all ranks train together into rank 0's staging
    folder, and rank 0 renames it between two barriers.
    """
    from duobench.distributed import barrier, process_info
    from duobench.locks import exclusive_for_job, from_main_rank, owner_tag

    spec: MethodSpec = METHODS.get(method)
    config = make_config(spec, overrides)
    key = config_key(method, config, concept, base_fingerprint, training_numerics(pipe))
    final = (root / method / key) if root is not None else artifact_dir(method, key)
    if from_main_rank((final / CARD_NAME).exists()):
        return final, config, False
    main = process_info().is_main
    with exclusive_for_job(final, f"training {method} {key}"):
        if from_main_rank((final / CARD_NAME).exists()):  # trained by another process while this one waited
            return final, config, False
        staging = final.with_name(f".{final.name}.partial-{from_main_rank(owner_tag())}")
        if main:
            _remove_abandoned_staging(final)
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        barrier()
        try:
            spec.train(config, pipe, concept, staging)
            barrier()
            if main:  # every rank trained together; one of them moves the artifact into place
                if not (staging / CARD_NAME).exists():
                    raise RuntimeError(f"method {method!r} finished training without writing {CARD_NAME}")
                _publish(staging, final)
        finally:
            if main:
                shutil.rmtree(staging, ignore_errors=True)
        barrier()
    return final, config, True


def _publish(staging: Path, final: Path) -> None:
    """Rename ``staging`` to ``final``; a finished ``final`` already there (another process trained it
    where the lock could not exclude) is kept, and ``staging`` is left for the caller to remove."""
    if (final / CARD_NAME).exists():
        return
    if final.exists():  # a folder without its card is not an artifact: an older version's leftover
        shutil.rmtree(final)
    try:
        staging.rename(final)
    except OSError:
        if not (final / CARD_NAME).exists():  # not another process winning the race: a real failure
            raise


def _remove_abandoned_staging(final: Path) -> None:
    """Staging folders of this artifact left by killed processes on this host (an SD-sized artifact is
    gigabytes), and the shared ``<key>.partial`` of earlier versions; called under the artifact's lock."""
    from duobench.locks import owner_gone

    prefix = f".{final.name}.partial-"
    for leftover in final.parent.glob(prefix + "*"):
        if owner_gone(leftover.name[len(prefix) :]):
            shutil.rmtree(leftover, ignore_errors=True)
    shutil.rmtree(final.with_name(final.name + ".partial"), ignore_errors=True)


def write_card(out_dir: Path, method: str, config: Any, concept: Concept, **extra: Any) -> None:
    """The small JSON config card every artifact carries beside its weights."""
    card = {
        "method": method,
        "config": asdict(config) if is_dataclass(config) else config,
        "concept": concept.name,
        **extra,
    }
    (out_dir / CARD_NAME).write_text(json.dumps(card, indent=2, sort_keys=True, default=str))


def read_card(artifact: Path, what: str = "a method") -> dict[str, Any]:
    """The artifact's card; a folder without one is not ``what`` artifact, which is said plainly."""
    try:
        return json.loads((Path(artifact) / CARD_NAME).read_text())
    except FileNotFoundError as error:
        raise DuobenchError(f"{artifact} is not {what} artifact: it has no {CARD_NAME}.") from error


def apply_lora_artifact(pipe, artifact_dir: Path, strength: float, method: str) -> None:
    """``apply`` of a method whose artifact is LoRA adapters named on its card (DUO, ShieldDiff): load them at
    scale ``strength`` in [0, 1], 0 the base model and 1 the trained one (`duobench.lora.apply_loras`)."""
    from duobench.lora import apply_loras

    if not 0.0 <= strength <= 1.0:
        raise DuobenchError(f"{method} strength is a LoRA scale in [0, 1], got {strength}.")
    card = read_card(artifact_dir, f"a {method}")
    apply_loras(pipe, artifact_dir, card["loras"], strength, prefix=method.lower())
