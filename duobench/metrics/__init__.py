"""Judges and metrics: streaming, mergeable, pinned presets with metric cards.

Every registered entry in `duobench.registry.METRICS` is a `MetricPreset`: ``METRICS.get(name).card`` is
its card (no weights loaded), ``METRICS.get(name)(**kwargs)`` builds the judge or metric.
"""

from __future__ import annotations
