"""A registered system's config built from its defaults and a user's options, with errors that name them."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from duobench.errors import DuobenchError


def build_config(kind: str, name: str, config_cls: type, options: dict[str, Any] | None = None) -> Any:
    """``config_cls(**options)``; an unknown option, or a value the config rejects, is a `DuobenchError`
    naming the ``kind`` ("Attack", "Guard"), ``name`` and its options. (Methods coerce numeric text too:
    `duobench.methods.make_config`.)"""
    options = dict(options or {})
    known = {f.name for f in fields(config_cls)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise DuobenchError(
            f"{kind} {name!r} has no option(s) {', '.join(unknown)}. Its options: {', '.join(sorted(known))}."
        )
    try:
        return config_cls(**options)
    except (TypeError, ValueError) as error:
        raise DuobenchError(f"Bad options for {kind.lower()} {name!r}: {error}") from error
