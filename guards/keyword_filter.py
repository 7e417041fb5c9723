"""`keyword-filter`: the blocklist prompt filter, the simplest guard deployed in front of text-to-image models.

A request is refused when its prompt contains a blocked word as a whole word, case-insensitively, after
punctuation is treated as a word boundary: "a nude man" and "NUDE!" are refused, "denuded" is not. The
blocklist is the concept's ``erase_words`` and ``synonyms`` (``words=`` replaces it, ``extra_words=`` adds to
it). It is the "text blocklist" baseline that SneakyPrompt and MMA-Diffusion were built to bypass: it sees
only the prompt text, so an attack that replays exact token ids decoded to other words, or an embedding
(Concept Inversion), passes it by construction. Items given as token ids are checked on their decoded text
(the item's ``prompt``), which is what a deployed filter would see.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.guards.base import Decision, config_identity, refusal
from duobench.items import WorkItem


@dataclass
class KeywordFilterConfig:
    words: tuple[str, ...] = ()
    """The blocklist; empty: the concept's erase words and synonyms."""
    extra_words: tuple[str, ...] = ()
    """Added to the blocklist."""

    def __post_init__(self) -> None:
        self.words = tuple(_as_words(self.words))
        self.extra_words = tuple(_as_words(self.extra_words))


class KeywordFilter:
    """Refuse a prompt that contains a blocked word (module docstring)."""

    name: ClassVar[str] = "keyword-filter"
    stage: ClassVar[str] = "prompt"
    config_cls: ClassVar[type] = KeywordFilterConfig

    def __init__(self, config: KeywordFilterConfig) -> None:
        self.config = config
        self.blocklist: tuple[str, ...] = ()

    def prepare(self, concept: Concept, pipe: Any = None) -> None:
        words = self.config.words or (*concept.erase_words, *concept.synonyms)
        self.blocklist = tuple(sorted({word.lower() for word in (*words, *self.config.extra_words)}))
        if not self.blocklist:
            raise DuobenchError(
                f"The keyword filter has no words to block: concept {concept.name!r} lists no erase_words or "
                "synonyms. Pass options words=<word>,<word>."
            )
        alternatives = "|".join(re.escape(word) for word in sorted(self.blocklist, key=len, reverse=True))
        self._pattern = re.compile(rf"(?<![a-z0-9])({alternatives})(?![a-z0-9])", re.IGNORECASE)

    def identity(self) -> dict[str, Any]:
        return config_identity(self, blocklist=list(self.blocklist))

    def decide(self, items: Sequence[WorkItem], images: Sequence[Image.Image] | None = None) -> list[Decision]:
        decisions = []
        for item in items:
            found = sorted({match.lower() for match in self._pattern.findall(item.prompt)})
            evidence = refusal(self, words=found) if found else {}
            decisions.append(Decision(refused=bool(found), score=float(len(found)), evidence=evidence))
        return decisions


def _as_words(value: Any) -> list[str]:
    """A word list from YAML/CLI text: a list, or one comma-separated string."""
    if isinstance(value, str):
        value = value.split(",")
    return [str(word).strip() for word in value if str(word).strip()]
