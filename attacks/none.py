"""The no-attack baseline: the concept's plain prompts, each with its row's seed and guidance.

It is an attack like the others so that "plain prompts" flows through the same cache, CSV and evaluation
path, and every table has its pre-attack column from the same code.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar

from duobench.attacks.base import AttackModels, AttackResult, Budget
from duobench.concepts import Concept
from duobench.prompts import PromptRow


@dataclass(frozen=True)
class NoAttackConfig:
    """No options: the prompt set is the attack."""


class NoAttack:
    """No attack: evaluate the prompt set as it is."""

    name: ClassVar[str] = "none"
    access: ClassVar[str] = "none"
    config_cls: ClassVar[type] = NoAttackConfig

    def __init__(self, config: NoAttackConfig) -> None:
        self.config = config

    def prepare(self, concept: Concept, models: AttackModels, rows: Sequence[PromptRow]) -> None:
        """Nothing to prepare."""

    def attack(self, rows: Sequence[PromptRow], budget: Budget) -> Iterator[AttackResult]:
        for row in rows:
            yield AttackResult.from_row(self.name, row, text=row.prompt)
