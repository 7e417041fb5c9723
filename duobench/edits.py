"""Edits, and the evaluated system: a base model plus an ordered chain of edits, sampled through one
`Generator`.

An *edit* is anything that changes the model under evaluation: a method's artifact at a strength (DUO's
LoRA, ESD's weight delta, SLD's guidance), an imported checkpoint (``external``), or what a model-changing
attack produced (``finetune``). Whoever registered the edit's name supplies ``apply(pipe, artifact,
strength)``: it either changes the pipeline's weights in place and returns ``None``, or returns a
`duobench.generator.SamplingHook` that the system's generator runs at inference. Chains compose in order
(a safety edit, then an attacker's fine-tune on top).

Identity. A system's fingerprint is the base model's weight fingerprint when the chain is empty, and
otherwise a hash of that fingerprint with each edit's identity (source, name, the artifact's content key,
strength): never a path, never a hash of edited weights, and the same for an edit that wraps the generator
as for one that rewrites weights. The default generator adds nothing, because without hooks it samples
exactly as the pipeline does. ``System.identity_for(parts)`` is the narrower identity of what one consumer
can see: a text-encoder attack depends only on the edits that touch the text encoder, so Ring-A-Bell's
prompts, found once, serve every method that leaves it alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from duobench.errors import DuobenchError
from duobench.generator import Generator, SamplingHook, generator_for
from duobench.stages import stable_hash

EDIT_SOURCES = ("method", "attack")
MODEL_PARTS = ("text_encoder", "unet", "vae", "conditioning", "guidance")
"""What an edit may declare it changes: weights of a component, the conditioning the generator builds
(embeddings, negative prompts), or the guidance step."""


@dataclass(frozen=True)
class Edit:
    """One change to the evaluated model. ``artifact`` is a folder whose name is its content key."""

    source: str
    name: str
    artifact: Path
    strength: float = 1.0
    touches: tuple[str, ...] = ("unet",)

    def __post_init__(self) -> None:
        if self.source not in EDIT_SOURCES:
            raise ValueError(f"edit source must be one of {EDIT_SOURCES}, got {self.source!r}")
        unknown = set(self.touches) - set(MODEL_PARTS)
        if unknown:
            raise ValueError(f"edit {self.name!r} declares unknown model parts {sorted(unknown)}")

    def identity(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "name": self.name,
            "artifact": Path(self.artifact).name,
            "strength": self.strength,
        }

    def _apply_function(self):
        from duobench.registry import ATTACKS, METHODS

        registry = METHODS if self.source == "method" else ATTACKS
        return registry.get(self.name).apply

    def apply(self, pipe) -> SamplingHook | None:
        """Edit ``pipe`` in place, or return the hook that edits its sampling."""
        return self._apply_function()(pipe, self.artifact, self.strength)

    def remove(self, pipe, hook: SamplingHook | None) -> None:
        """Undo `apply`: detach the hook, or apply the weights at strength 0 (the base model: bit for bit for
        a weight delta, a zero LoRA scale for a LoRA)."""
        if hook is not None:
            hook.remove()
        else:
            self._apply_function()(pipe, self.artifact, 0.0)


def method_edit(name: str, artifact: Path, strength: float) -> Edit:
    from duobench.registry import METHODS

    return Edit("method", name, Path(artifact), float(strength), tuple(METHODS.get(name).touches))


def chain_fingerprint(base_fingerprint: str, edits: Sequence[Edit]) -> str:
    if not edits:
        return base_fingerprint
    return stable_hash({"base": base_fingerprint, "edits": [edit.identity() for edit in edits]})


@dataclass
class System:
    """A loaded base model with a chain of edits applied: what is sampled, attacked and measured."""

    pipe: Any
    generator: Generator
    base_fingerprint: str
    edits: tuple[Edit, ...] = ()

    @property
    def fingerprint(self) -> str:
        """Keys every image this system makes (`duobench.items.WorkItem.key`)."""
        return chain_fingerprint(self.base_fingerprint, self.edits)

    def identity_for(self, parts: Sequence[str]) -> dict[str, Any]:
        """The base model plus the edits that touch any of ``parts``: what a consumer that sees only those
        parts depends on."""
        relevant = [edit.identity() for edit in self.edits if set(edit.touches) & set(parts)]
        return {"base": self.base_fingerprint, "edits": relevant}

    def coverage_notes(self) -> list[str]:
        """One line per inference-time edit that cannot defend some prompt forms (for the run summary)."""
        return [
            f"{name} does not apply to {', '.join(forms)} prompts"
            for name, forms in self.generator.uncovered_forms().items()
        ]


def build_system(pipe, base_fingerprint: str, edits: Sequence[Edit] = ()) -> System:
    """Apply ``edits`` in order to ``pipe`` (a fresh copy of the base model, which it then owns)."""
    hooks = []
    for edit in edits:
        hook = edit.apply(pipe)
        if hook is not None:
            hooks.append(hook)
    try:
        generator = generator_for(pipe, hooks)
    except DuobenchError:
        for hook in hooks:
            hook.remove()
        raise
    return System(pipe=pipe, generator=generator, base_fingerprint=base_fingerprint, edits=tuple(edits))


def as_system(model) -> System:
    """A `System` as it is, or a plain pipeline as the base model with no edits."""
    if isinstance(model, System):
        return model
    from duobench.models import pipeline_fingerprint

    return System(pipe=model, generator=generator_for(model), base_fingerprint=pipeline_fingerprint(model))
