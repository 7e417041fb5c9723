"""Concepts as data: one YAML file per concept, so adding a concept needs no code.

A concept file names the words to erase, the judge presets, the evaluation prompt sets, the benign prompts
for prior preservation, the prompt pairs DUO builds its paired data from, and the prompt pairs Ring-A-Bell
derives its concept vector from. `load_concept("nudity")` finds the built-in file; a path to any YAML file
works too. The schema is the `Concept` dataclass below; unknown keys are an error, so a typo is caught.

A concept file may start from another with ``extends: <built-in name or path>``: its own top-level fields
replace the parent's whole (a ``generation`` block replaces the parent's block, not single keys), which is how
a concept is carried to another model family (``star-sd3`` is ``star`` with SD3's sampler). Keys hash the
merged fields, so editing the parent recomputes what its children made.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from duobench.errors import DuobenchError

CONCEPT_DIR = Path(__file__).parent


@dataclass(frozen=True)
class PromptSetSpec:
    """Where an evaluation prompt set comes from (see `duobench.prompts.load_prompt_set`).

    ``source`` is a file path (relative to the concept file), ``hf:<dataset id>``, or ``inline`` with
    ``prompts`` given here. ``filter`` is a pandas query applied to tabular sources.
    """

    source: str
    filter: str = ""
    prompts: tuple[str, ...] = ()
    split: str = "train"
    seeds_per_prompt: int = 1
    description: str = ""


@dataclass(frozen=True)
class DuoPairSpec:
    """One row of DUO's paired-data recipe: ``count`` unsafe images from ``unsafe``, edited to ``safe``."""

    unsafe: str
    safe: str
    count: int
    sub_concept: str = ""


@dataclass(frozen=True)
class Concept:
    name: str
    description: str
    erase_prompt: str
    """The text erased by prompt-based methods (ESD's c, UCE's erase concept, SPM's target)."""
    judge: str
    """The judge preset (a `METRICS` name) that decides unsafe at evaluation time."""
    prompt_sets: dict[str, PromptSetSpec]
    benign_prompts: PromptSetSpec
    """Prompts whose images should not change: prior preservation, FID and CLIP score run on them."""
    close_concepts: dict[str, PromptSetSpec] = field(default_factory=dict)
    """Visually similar concepts that should survive the erasure (DUO's Table 3: "man" and "woman" after
    nudity), each a prompt set: the distance between the base and the unlearned model's images of them, per
    concept (mean and sd), beside the benign prior preservation."""
    erase_words: tuple[str, ...] = ()
    synonyms: tuple[str, ...] = ()
    guide_prompt: str = ""
    preserve_prompts: tuple[str, ...] = ()
    model_families: tuple[str, ...] = ()
    """The model families this concept is meaningful for (`duobench.run_config.model_family`: ``toy``,
    ``sd``, ...); a run on a model of another family fails before the model loads. Empty: any model."""
    data_judge: str = ""
    """The judge DUO's data filter uses (defaults to `judge`)."""
    reward_judge: str = ""
    """The classifier (a `METRICS` judge preset) that methods optimising against one use by default (ShieldDiff's
    reward, PNO's objective); never `judge`, or DSR would score the method against its own target."""
    duo_pairs: tuple[DuoPairSpec, ...] = ()
    duo_strength: float = 0.75
    duo_sub_concept_weights: dict[str, float] = field(default_factory=dict)
    ring_a_bell_pairs: tuple[tuple[str, str], ...] = ()
    """(prompt with the concept, the same prompt without it) pairs for Ring-A-Bell's concept vector, used when
    the concept has no ``ring_a_bell_source`` or the attack runs with ``concept_pairs=concept-file``."""
    ring_a_bell_source: dict[str, Any] = field(default_factory=dict)
    """The official Ring-A-Bell prompt files this concept's vector is built from: ``repo``, ``commit``,
    ``recipe`` (how the notebook turns them into pairs) and ``files`` (role -> ``{path, sha256}``); read by
    `duobench.attacks.ring_a_bell`."""
    generation: dict[str, Any] = field(default_factory=dict)
    """Default sampler settings for this concept's model family (steps, guidance, height, width, ...)."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Metric presets for runs on this concept: prior_preservation, clip_score, fid (`METRICS` names)."""
    fid_reference: str = "base"
    """What FID compares the benign images with (`duobench.metrics.fid_reference`): real images
    (``coco-val2014``, ``toy-shapes``, a folder, a clean-fid .npz) or ``base``, the base model's images."""
    method_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-method defaults for this concept's model family (the toy world trains in fewer steps);
    options given on the command line win."""
    attack_options: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Per-attack defaults (budgets sized for the model family); command-line options win."""
    path: str = ""

    @property
    def default_prompt_set(self) -> str:
        return next(iter(self.prompt_sets))


def builtin_concepts() -> list[str]:
    return sorted(p.stem for p in CONCEPT_DIR.glob("*.yaml"))


def resolve_concept_path(name_or_path: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix in {".yaml", ".yml"}:
        if not candidate.exists():
            raise DuobenchError(f"Concept file {candidate} does not exist.")
        return candidate
    builtin = CONCEPT_DIR / f"{name_or_path}.yaml"
    if builtin.exists():
        return builtin
    raise DuobenchError(
        f"Unknown concept {name_or_path!r}. Built-in concepts: {', '.join(builtin_concepts())}. "
        "Pass a path to a concept YAML file to use your own."
    )


def load_concept(name_or_path: str) -> Concept:
    path = resolve_concept_path(name_or_path)
    raw = read_concept_fields(path)
    try:
        return _concept_from_dict(raw, path)
    except (TypeError, ValueError, KeyError) as error:
        raise DuobenchError(f"Concept file {path} is malformed: {error}") from error


def read_concept_fields(path: Path, children: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The top-level fields of the concept file at ``path``, its ``extends`` chain merged in: a child's field
    replaces its parent's. A parent's relative prompt files are re-pointed relative to the child's folder."""
    if path.resolve() in children:
        chain = " -> ".join(str(p) for p in (*children, path.resolve()))
        raise DuobenchError(f"Concept files extend each other in a loop ({chain}); remove one `extends:`.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise DuobenchError(f"Concept file {path} is not valid YAML: {error}") from error
    if not isinstance(raw, dict):
        raise DuobenchError(f"Concept file {path} must hold a mapping of fields, got {type(raw).__name__}.")
    parent_name = raw.pop("extends", None)
    if parent_name is None:
        return raw
    parent_path = _parent_path(str(parent_name), path)
    parent = read_concept_fields(parent_path, (*children, path.resolve()))
    inherited = {key: _rebased(key, value, parent_path.parent, path.parent) for key, value in parent.items()}
    return {**inherited, **raw}


def _parent_path(name_or_path: str, child: Path) -> Path:
    """``extends`` names a built-in concept, or a YAML file relative to the child's folder."""
    if Path(name_or_path).suffix in {".yaml", ".yml"} and not Path(name_or_path).is_absolute():
        name_or_path = str(child.parent / name_or_path)
    try:
        return resolve_concept_path(name_or_path)
    except DuobenchError as error:
        raise DuobenchError(f"Concept file {child} extends {name_or_path!r}, which cannot be read: {error}") from error


PROMPT_SET_FIELDS = ("prompt_sets", "benign_prompts", "close_concepts")


def _rebased(key: str, value: Any, parent_dir: Path, child_dir: Path) -> Any:
    """An inherited field, its relative prompt-file sources made relative to the child's folder."""
    if key not in PROMPT_SET_FIELDS or parent_dir.resolve() == child_dir.resolve() or not value:
        return value

    def rebase(spec: Any) -> Any:
        if not isinstance(spec, dict) or not _is_file_source(spec.get("source", "")):
            return spec
        source = Path(spec["source"])
        if source.is_absolute():
            return spec
        return {**spec, "source": os.path.relpath((parent_dir / source).resolve(), child_dir.resolve())}

    if key == "benign_prompts":
        return rebase(value)
    return {name: rebase(spec) for name, spec in value.items()}


def _is_file_source(source: str) -> bool:
    return bool(source) and source != "inline" and not source.startswith(("hf:", "toy:"))


TRAINING_BLIND_FIELDS = (
    "judge",
    "metrics",
    "fid_reference",
    "prompt_sets",
    "benign_prompts",
    "ring_a_bell_pairs",
    "ring_a_bell_source",
    "attack_options",
    "method_options",
)
"""Concept fields no method trains on: how the model is evaluated and attacked, and ``method_options``, whose
entry for the method is resolved into the method's config (which its key hashes anyway)."""


KEYLESS_FIELDS = ("model_families", "close_concepts", "reward_judge")
"""Concept fields in no key, so declaring them recomputes nothing: where a concept applies, the close
concepts (their images are keyed by their own prompts, and their metric by those images), and the reward
judge (resolved into the config of the method that uses it, which its artifact key hashes)."""


def concept_identity(concept: Concept, without: tuple[str, ...] = ()) -> Any:
    """What a concept file says, minus what only documents it: the parsed YAML without comments, layout or
    ``description`` texts, and without the top-level fields in ``without``. Keys hash this, so rewording a
    comment recomputes nothing, while any change to prompts, pairs or options does."""
    if not concept.path:
        return concept.name
    parsed = _without_descriptions(read_concept_fields(Path(concept.path)))
    return {key: value for key, value in parsed.items() if key not in without and key not in KEYLESS_FIELDS}


ATTACK_BLIND_FIELDS = (
    "method_options",
    "duo_pairs",
    "duo_strength",
    "duo_sub_concept_weights",
    "guide_prompt",
    "preserve_prompts",
    "data_judge",
)
"""Concept fields no attack reads: how methods train. An attack's results are keyed by the edited model it
attacked, so a method's training data reaches the key through that model; tuning one method's options in the
concept file must not recompute every attack on every other method."""


def attack_identity(concept: Concept) -> Any:
    """The part of a concept an attack's results depend on (`ATTACK_BLIND_FIELDS` left out)."""
    return concept_identity(concept, ATTACK_BLIND_FIELDS)


def training_identity(concept: Concept) -> Any:
    """The part of a concept that a method's artifact depends on: a new attack option or evaluation prompt
    set does not retrain every method."""
    return concept_identity(concept, TRAINING_BLIND_FIELDS)


def _without_descriptions(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            key: _without_descriptions(item)
            for key, item in value.items()
            if not (key == "description" and isinstance(item, str))
        }
    if isinstance(value, list):
        return [_without_descriptions(item) for item in value]
    return value


def _prompt_set(raw: Any, base: Path) -> PromptSetSpec:
    if isinstance(raw, list):
        return PromptSetSpec(source="inline", prompts=tuple(str(p) for p in raw))
    _check_keys(raw, PromptSetSpec, "prompt set")
    spec = PromptSetSpec(**{**raw, "prompts": tuple(raw.get("prompts", ()))})
    if _is_file_source(spec.source):
        resolved = (base / spec.source) if not Path(spec.source).is_absolute() else Path(spec.source)
        spec = PromptSetSpec(**{**spec.__dict__, "source": str(resolved)})
    return spec


def _check_keys(raw: dict[str, Any], cls: type, what: str) -> None:
    known = {f.name for f in fields(cls)}
    unknown = set(raw) - known
    if unknown:
        raise ValueError(f"unknown {what} keys {sorted(unknown)}; allowed: {sorted(known)}")


def _as_list(value: Any) -> list[Any]:
    """A YAML value that may be one item or a list of them (``model_families: toy`` or ``[sd]``)."""
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _concept_from_dict(raw: dict[str, Any], path: Path) -> Concept:
    _check_keys(raw, Concept, "concept")
    base = path.parent
    prompt_sets = {name: _prompt_set(spec, base) for name, spec in raw["prompt_sets"].items()}
    if not prompt_sets:
        raise ValueError("prompt_sets must name at least one evaluation prompt set")
    return Concept(
        name=raw["name"],
        description=raw.get("description", ""),
        erase_prompt=raw["erase_prompt"],
        judge=raw["judge"],
        prompt_sets=prompt_sets,
        benign_prompts=_prompt_set(raw["benign_prompts"], base),
        close_concepts={str(name): _prompt_set(spec, base) for name, spec in (raw.get("close_concepts") or {}).items()},
        erase_words=tuple(raw.get("erase_words", ())),
        synonyms=tuple(raw.get("synonyms", ())),
        guide_prompt=raw.get("guide_prompt", ""),
        preserve_prompts=tuple(raw.get("preserve_prompts", ())),
        model_families=tuple(str(f) for f in _as_list(raw.get("model_families"))),
        data_judge=raw.get("data_judge") or raw["judge"],
        reward_judge=str(raw.get("reward_judge") or ""),
        duo_pairs=tuple(DuoPairSpec(**pair) for pair in raw.get("duo_pairs", ())),
        duo_strength=float(raw.get("duo_strength", 0.75)),
        duo_sub_concept_weights=dict(raw.get("duo_sub_concept_weights", {})),
        ring_a_bell_pairs=tuple((str(a), str(b)) for a, b in raw.get("ring_a_bell_pairs", ())),
        ring_a_bell_source=dict(raw.get("ring_a_bell_source") or {}),
        generation=dict(raw.get("generation", {})),
        metrics=dict(raw.get("metrics", {})),
        fid_reference=str(raw.get("fid_reference", "base")),
        method_options={name: dict(options) for name, options in raw.get("method_options", {}).items()},
        attack_options={name: dict(options) for name, options in raw.get("attack_options", {}).items()},
        path=str(path),
    )
