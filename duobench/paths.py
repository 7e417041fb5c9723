"""Where duobench keeps its caches: ``$DUOBENCH_HOME`` (default ``~/.cache/duobench``)."""

from __future__ import annotations

import os
from pathlib import Path


def duobench_home() -> Path:
    """The root of every cache duobench writes outside a run's ``--out`` folder."""
    return Path(os.environ.get("DUOBENCH_HOME", Path.home() / ".cache" / "duobench")).expanduser()
