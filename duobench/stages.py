"""Cached pipeline stages: a JSON result per (stage, inputs) so a repeated run does no model work.

A stage's key hashes everything its result depends on (image keys, metric card ids, configs). Results are
written atomically; the counters let tests and users see what a run reused. Two processes that need the
same result at once compute it once: the first holds the result's lock while it computes, the second waits
and reads it (`duobench.locks.exclusive_unless_distributed`: inside a torchrun process group the job's ranks
keep their own protocol and take no lock).
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from duobench.cache import atomic_write_bytes
from duobench.locks import exclusive_unless_distributed
from duobench.paths import duobench_home


def stable_hash(payload: Any, length: int = 16) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:length]


class StageCache:
    """``cache.run("judge", payload, compute)`` returns the stored result or computes and stores it."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = Path(root) if root is not None else duobench_home() / "stages"
        self.hits: Counter = Counter()
        self.misses: Counter = Counter()

    def path(self, stage: str, payload: Any) -> Path:
        return self.root / stage / f"{stable_hash(payload)}.json"

    def run(self, stage: str, payload: Any, compute: Callable[[], Any]) -> Any:
        path = self.path(stage, payload)
        if path.exists():
            self.hits[stage] += 1
            return json.loads(path.read_text())
        with exclusive_unless_distributed(path, f"computing the {stage} stage {path.stem}"):
            if path.exists():  # computed by another process while this one waited
                self.hits[stage] += 1
                return json.loads(path.read_text())
            self.misses[stage] += 1
            result = compute()
            atomic_write_bytes(path, json.dumps(result, sort_keys=True, default=str).encode())
        return result
