"""Judges and metrics: streaming, mergeable, pinned presets with metric cards."""
