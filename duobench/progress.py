"""Progress of a long stage: done/total, elapsed time, ETA and the live number that matters.

    with track("DUO training", config.steps, unit="steps") as progress:
        for step in range(config.steps):
            ...
            progress.advance(loss=loss.item())

Where it shows, decided once per stage:

- **on a terminal** (stderr is a TTY): a rich bar with the description, done/total, elapsed time, ETA and the
  live values (``loss 0.1234``). A stage that starts inside another (one prompt's search inside an attack's
  prompt loop) gets a second bar, removed when it ends;
- **anywhere else** (a CI log, a file): a line through `logging` (logger ``duobench.progress``) when a stage
  starts, at every 10 % and at its end. A nested stage logs only a heartbeat every 5 minutes, so a log gets
  one line per tenth of the attack, not ten per prompt;
- **nowhere** when that logger is not enabled for INFO (``--quiet``, ``--log-level warning``, or a library
  user who never configured logging: duobench's modules never do), and on every rank but 0 under torchrun.

The CLI configures logging (`duobench.cli.configure_logging`); its log handler writes through `console`, the
console the bars use, so on a terminal log lines scroll above the bars instead of through them.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

from rich.console import Console

logger = logging.getLogger(__name__)
console = Console(stderr=True)

LOG_EVERY_PERCENT = 10
"""Without a terminal, a top-level stage logs a line each time it passes another tenth of its total."""
HEARTBEAT_SECONDS = 300.0
"""Without a terminal, any stage logs at least this often (a nested stage logs nothing else)."""

T = TypeVar("T")
Live = dict[str, Any]


class StageProgress:
    """One stage's progress: `advance` it, optionally with live values shown beside it."""

    def __init__(self, description: str, total: int, unit: str = "", mode: str = "off", depth: int = 0) -> None:
        self.description = description
        self.total = max(int(total), 0)
        self.unit = unit
        self.mode = mode  # "off", "bar" (rich) or "log" (logging lines)
        self.depth = depth
        self.done = 0
        self.live: Live = {}
        self.started = time.perf_counter()
        self._logged_at = self.started
        self._logged_tenths = 0
        self._task: Any = None

    @property
    def enabled(self) -> bool:
        return self.mode != "off"

    def advance(self, steps: int = 1, **live: Any) -> None:
        """``steps`` more done; ``live`` values (``loss=0.12``) replace the shown ones of the same name."""
        if self.mode == "off":
            return
        self.done += steps
        self.live.update(live)
        if self.mode == "bar":
            _bars.update(self._task, advance=steps, live=format_live(self.live))
        else:
            self._maybe_log()

    def show(self, **live: Any) -> None:
        """Update the live values without advancing."""
        self.advance(0, **live)

    def line(self) -> str:
        """The progress as one line: ``DUO training: 30/300 steps (10%), 0:00:12 elapsed, ETA 0:01:48, loss 0.69``."""
        elapsed = time.perf_counter() - self.started
        parts = [f"{self.description}: {self.done}/{self.total}" + (f" {self.unit}" if self.unit else "")]
        if self.total:
            parts[0] += f" ({100 * self.done // self.total}%)"
        parts.append(f"{clock(elapsed)} elapsed")
        if 0 < self.done < self.total:
            parts.append(f"ETA {clock(elapsed * (self.total - self.done) / self.done)}")
        if self.live:
            parts.append(format_live(self.live))
        return ", ".join(parts)

    def _maybe_log(self) -> None:
        now = time.perf_counter()
        tenths = self.done * (100 // LOG_EVERY_PERCENT) // self.total if self.total else 0
        due = now - self._logged_at >= HEARTBEAT_SECONDS
        if self.depth == 0 and tenths > self._logged_tenths and self.done < self.total:
            due = True
        self._logged_tenths = max(self._logged_tenths, tenths)
        if due:
            self._logged_at = now
            logger.info(self.line())

    def _start(self) -> None:
        if self.mode == "bar":
            self._task = _bars.add_task(self.description, total=self.total, unit=self.unit, live="")
        elif self.mode == "log" and self.depth == 0:
            logger.info("%s: started, %d %s", self.description, self.total, self.unit or "steps")

    def _finish(self, failed: bool) -> None:
        if self.mode == "bar" and self.depth > 0:
            _bars.remove_task(self._task)  # a nested stage's bar goes; its outer stage's stays on screen
        elif self.mode == "log" and (self.depth == 0 or self._logged_at != self.started):
            # a top-level stage always ends with a line; a nested one only if it logged a heartbeat
            logger.info(self.line() + (" (stopped)" if failed else ""))


def format_live(live: Live) -> str:
    """``{"loss": 0.123456, "best_fitness": 12}`` → ``loss 0.1235, best fitness 12``."""
    return ", ".join(f"{name.replace('_', ' ')} {_number(value)}" for name, value in live.items() if value is not None)


def _number(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def clock(seconds: float) -> str:
    """``83.2`` → ``0:01:23``, as rich shows elapsed time."""
    whole = int(max(seconds, 0.0))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


# The one rich Progress shared by every active stage (rich allows one live display at a time).
_lock = threading.Lock()
_bars: Any = None
_active = 0


def _mode(enabled: bool) -> str:
    from duobench.distributed import process_info

    if not enabled or not logger.isEnabledFor(logging.INFO) or not process_info().is_main:
        return "off"
    return "bar" if console.is_terminal else "log"


def _open_bars() -> None:
    global _bars
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    _bars = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[unit]}"),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        TextColumn("{task.fields[live]}"),
        console=console,
    )
    _bars.start()


@contextmanager
def track(description: str, total: int, *, unit: str = "", enabled: bool = True) -> Iterator[StageProgress]:
    """Show the progress of a stage of ``total`` steps while the block runs (see the module docstring for
    where); ``enabled=False`` gives a progress object that shows nothing."""
    global _active, _bars
    with _lock:
        mode = _mode(enabled)
        progress = StageProgress(description, total, unit, mode, depth=_active)
        if mode != "off":
            if mode == "bar" and _bars is None:
                _open_bars()
            _active += 1
            progress._start()
    failed = True
    try:
        yield progress
        failed = False
    finally:
        if mode != "off":
            with _lock:
                progress._finish(failed)
                progress.mode = "off"  # a stray advance after the stage ended shows nothing
                _active -= 1
                if _active == 0 and _bars is not None:
                    _bars.stop()
                    _bars = None


def track_each(
    items: Iterable[T],
    description: str,
    total: int,
    *,
    unit: str = "",
    live: Callable[[T], Live] | None = None,
) -> Iterator[T]:
    """Yield ``items``, advancing a `track` stage as each one arrives, with ``live(item)`` as its live values.

    The stage ends when the ``total``-th item arrives, before it is handed on, so a consumer that stops there
    (a ``zip`` with a list of ``total`` entries) leaves no bar behind.
    """
    iterator = iter(items)
    last: list[T] = []
    with track(description, total, unit=unit) as progress:
        for item in iterator:
            progress.advance(**(live(item) if live is not None else {}))
            if progress.enabled and progress.done >= total:
                last.append(item)
                break
            yield item
    yield from last
    yield from iterator
