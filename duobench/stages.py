"""Cached pipeline stages: a JSON result per (stage, inputs) so a repeated run does no model work.

A stage's key hashes everything its result depends on (image keys, metric card ids, configs). Results are
written atomically; the counters let tests and users see what a run reused. Two processes that need the
same result at once compute it once: the first holds the result's lock while it computes, the second waits
and reads it.

Inside a torchrun process group `StageCache.run` is a collective call, as its computations are (judging and
metrics sharded over the ranks and merged): rank 0 decides whether the result is stored and holds the lock
for the job (`duobench.locks.exclusive_for_job`), every rank computes its share, and rank 0 writes it.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from duobench.cache import atomic_write_bytes
from duobench.locks import exclusive_for_job, from_main_rank
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
        from duobench.distributed import process_info

        path = self.path(stage, payload)
        if from_main_rank(path.exists()):
            self.hits[stage] += 1
            return json.loads(path.read_text())
        with exclusive_for_job(path, f"computing the {stage} stage {path.stem}"):
            if from_main_rank(path.exists()):  # computed by another process while this one waited
                self.hits[stage] += 1
                return json.loads(path.read_text())
            self.misses[stage] += 1
            result = compute()
            if process_info().is_main:
                atomic_write_bytes(path, json.dumps(result, sort_keys=True, default=str).encode())
        return result
