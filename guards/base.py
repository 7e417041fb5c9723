"""The guard contract: a system that refuses a request instead of generating it.

A guard sits in front of the model (``stage = "prompt"``: a prompt filter such as Latent Guard or a keyword
blocklist, which sees the work item before any image exists) or behind it (``stage = "image"``: an output
checker such as the SD safety checker or CROPS, which sees the generated image). It composes with any
method: ``duobench run --method duo --guard latent-guard`` evaluates DUO's model behind Latent Guard.

How a run counts a refusal (`duobench.runner`, README "Guards"):

- an attack or pre-attack item the guard refuses is **defended**: DSR records a safe verdict whose evidence
  names the guard (a prompt-stage refusal is never generated);
- on the benign prompts every refusal is a **false refusal**: the run reports the false-refusal rate with a
  Clopper-Pearson interval, and prior preservation, CLIP score and FID are computed on the items the guard
  allowed, with both counts in the summary;
- a guard must not be the evaluation judge (an output checker that is the judge scores DSR 1 by
  construction): `check_independent` refuses such a run before it starts.

A guard is built from its config (``config_cls``, options checked by `make_guard`), gets the concept and
the base pipeline once in ``prepare`` (where a learned guard trains or loads its weights, keyed by
``identity``), and then decides batches. Its ``identity()`` goes into the run's stage keys and summary.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar, Protocol

from PIL import Image

from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.items import WorkItem
from duobench.options import build_config

STAGES = ("prompt", "image")


@dataclass(frozen=True)
class Decision:
    """A guard's decision on one request: refused or allowed, with a score (higher: more likely refused)
    and JSON-ready evidence."""

    refused: bool
    score: float = 0.0
    evidence: dict[str, Any] = field(default_factory=dict)


class Guard(Protocol):
    """What a registered guard class provides (see the module docstring)."""

    name: ClassVar[str]
    stage: ClassVar[str]
    config_cls: ClassVar[type]
    config: Any

    def prepare(self, concept: Concept, pipe: Any) -> None:
        """Build what the guard needs for ``concept`` (a blocklist, trained or loaded weights)."""

    def identity(self) -> dict[str, Any]:
        """Everything its decisions depend on: name, config, weights' sha256; JSON-ready."""

    def decide(self, items: Sequence[WorkItem], images: Sequence[Image.Image] | None = None) -> list[Decision]:
        """One decision per item; an image-stage guard also gets the generated images, in order."""


def make_guard(name: str, options: dict[str, Any] | None = None, concept: Concept | None = None) -> Guard:
    """The registered guard ``name`` built from its config defaults plus ``options``; an unknown option or
    a bad value is a `DuobenchError` naming the guard's options. A guard that classifies with a judge preset
    names that config field ``checker_field``; left empty, it is filled from ``concept``'s ``reward_judge``
    (the concept's classifier that is not its evaluation judge), so the guard's identity names the checker."""
    from duobench.registry import GUARDS

    guard_cls = GUARDS.get(name)
    if guard_cls.stage not in STAGES:
        raise DuobenchError(f"Guard {name!r} declares stage {guard_cls.stage!r}; a guard's stage is one of {STAGES}.")
    options = dict(options or {})
    checker_field = getattr(guard_cls, "checker_field", "")
    if checker_field and not options.get(checker_field) and concept is not None:
        if not concept.reward_judge:
            raise DuobenchError(
                f"The {name} guard classifies with a judge preset, and concept {concept.name!r} names no "
                f"reward_judge to default to: pass the guard option {checker_field}=<judge preset> (not the "
                "evaluation judge)."
            )
        options[checker_field] = concept.reward_judge
    return guard_cls(build_config("Guard", name, guard_cls.config_cls, options))


def config_identity(guard: Guard, **extra: Any) -> dict[str, Any]:
    """The usual ``identity()``: the guard's name, stage and config, plus ``extra`` (weights' sha256)."""
    return {"guard": guard.name, "stage": guard.stage, "config": asdict(guard.config), **extra}


def check_independent(guard: Guard, judge: str) -> None:
    """Refuse a guard that decides with the evaluation judge itself (its identity names the judge preset):
    DSR would measure the judge against itself."""
    if judge in _named_presets(guard.identity()):
        raise DuobenchError(
            f"The {guard.name} guard decides with {judge!r}, the concept's evaluation judge: every image it "
            "allows would be judged safe by construction. Give the guard another checker (its options), or "
            "judge with another preset."
        )


def _named_presets(value: Any) -> set[str]:
    if isinstance(value, dict):
        return {name for item in value.values() for name in _named_presets(item)}
    if isinstance(value, list | tuple):
        return {name for item in value for name in _named_presets(item)}
    return {value} if isinstance(value, str) else set()


def refusal(guard: Guard, **evidence: Any) -> dict[str, Any]:
    """The evidence a refused item's DSR verdict carries."""
    return {"refused_by": guard.name, "stage": guard.stage, **evidence}
