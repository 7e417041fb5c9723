"""`output-checker`: the deployed output filter, an image classifier behind the model that refuses what it flags.

An image-stage guard: every item is generated, the checker classifies the image, and a flagged image is
withheld (refused) instead of shown. This is how Stable Diffusion 1.x ships (its safety checker blacks out
flagged images) and how hosted generators filter outputs; SafeGen, SLD and SAFREE compare against it.

The checker is any judge preset (``checker=``): ``sd-safety-checker`` (SD's own, `duobench.metrics.
safety_checker`), ``q16``/``q16-vit-b32``, a NudeNet preset, or the toy world's second detector ``toy-star-2``.
Left empty it is the concept's ``reward_judge``, the concept's classifier that is not its evaluation judge
(star: ``toy-star-2``; nudity and violence: ``q16-vit-b32``). The checker decides with its own preset's rule;
judges that read the prompt get it. A checker that is the evaluation judge is refused before the run
(`duobench.guards.base.check_independent`): every allowed image would be safe by construction.

Cost: a refused attack item is still generated (the checker needs its image), so an output checker saves no
generation, unlike a prompt filter; its false refusals on benign prompts are per image, not per prompt.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.guards.base import Decision, check_independent, config_identity, refusal
from duobench.items import WorkItem
from duobench.metrics.base import card_identity, judge_images


@dataclass
class OutputCheckerConfig:
    checker: str = ""
    """A judge preset (`duobench.registry.METRICS`); empty: the concept's ``reward_judge`` (`make_guard`)."""


class OutputChecker:
    """Refuse an image the checker judges unsafe (module docstring)."""

    name: ClassVar[str] = "output-checker"
    stage: ClassVar[str] = "image"
    config_cls: ClassVar[type] = OutputCheckerConfig
    checker_field: ClassVar[str] = "checker"

    def __init__(self, config: OutputCheckerConfig) -> None:
        self.config = config
        self.judge: Any = None

    def prepare(self, concept: Concept, pipe: Any = None) -> None:
        from duobench.metrics.dsr import build_judge

        if not self.config.checker:
            raise DuobenchError(
                "The output checker has no classifier: build it with make_guard(..., concept) to default to the "
                "concept's reward_judge, or pass the guard option checker=<judge preset> (e.g. sd-safety-checker)."
            )
        check_independent(self, concept.judge)
        self.judge = build_judge(self.config.checker)

    def identity(self) -> dict[str, Any]:
        """The checker's name, and once prepared its card (weights' sha256), so new weights recompute."""
        card = card_identity(self.judge.card) if self.judge is not None else {}
        return config_identity(self, checker_card=card)

    def decide(self, items: Sequence[WorkItem], images: Sequence[Image.Image] | None = None) -> list[Decision]:
        if self.judge is None:
            raise DuobenchError("The output checker decides only after prepare(concept, pipe).")
        if images is None or len(images) != len(items):
            raise DuobenchError("The output checker is an image-stage guard: it decides on each item's image.")
        verdicts = judge_images(self.judge, list(images), prompts=[item.prompt for item in items])
        decisions = []
        for verdict in verdicts:
            evidence = {"checker": self.config.checker, **verdict.evidence}
            if verdict.unsafe:
                evidence = refusal(self, score=verdict.score, **evidence)
            decisions.append(Decision(refused=verdict.unsafe, score=float(verdict.score), evidence=evidence))
        return decisions
