"""DSR-vs-prior-preservation curves: sweep a method's knob, one point per value, drawn per attack.

``--sweep strength=0,0.25,0.5,0.75,1`` sweeps the inference-time strength (LoRA scale, weight
interpolation, adapter multiplier): training happens once. ``--sweep beta=250,500,1000`` (or any numeric
method option, e.g. DUO's ``base_lambda=0,1e6`` for the output-preserving term's ablation) trains one artifact
per value, each cached by its config hash. ``--sweep guidance=1,3,7.5`` evaluates the attack and pre-attack
images at each classifier-free guidance scale; its figure draws DSR against the guidance scale, since the
benign images, and so prior preservation, do not change with it.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

from duobench.errors import DuobenchError
from duobench.report import PROVENANCE_COLUMNS, flat_row
from duobench.run_config import RunConfig, reproducible_config
from duobench.runner import run
from duobench.stages import StageCache

CURVE_COLUMNS = (
    "method",
    "attack",
    "knob",
    "value",
    "dsr",
    "dsr_ci_low",
    "dsr_ci_high",
    "prior_preservation",
    "fid",
    "clip_score",
    *PROVENANCE_COLUMNS,
)


def parse_sweep(spec: str) -> tuple[str, list[float]]:
    """``"strength=0,0.5,1"`` → ``("strength", [0.0, 0.5, 1.0])``."""
    name, _, values = spec.partition("=")
    try:
        parsed = [float(value) for value in values.split(",") if value.strip()]
    except ValueError:
        parsed = []
    if not name.strip() or not parsed:
        raise DuobenchError(f"--sweep {spec!r} must look like 'strength=0,0.25,0.5' (a knob and numbers).")
    return name.strip(), parsed


def config_at(config: RunConfig, knob: str, value: float) -> RunConfig:
    """The run configuration of one curve point, with its own output folder: ``strength`` (the method's
    inference-time strength), ``guidance`` (the evaluation images' classifier-free guidance) or any numeric
    option of the method (``beta``, ``base_lambda``, ...: one trained artifact per value)."""
    out = str(Path(config.out) / f"{knob}={value:g}")
    if knob in ("strength", "guidance"):
        return replace(config, out=out, **{knob: value})
    number = int(value) if float(value).is_integer() else value
    return replace(config, method_options={**config.method_options, knob: number}, out=out)


def sweep(
    config: RunConfig, knob: str, values: list[float], stages: StageCache | None = None, base=None
) -> list[dict[str, Any]]:
    stages = stages or StageCache()
    points = []
    for value in values:
        point_config = config_at(config, knob, value)
        summary = run(point_config, stages, base)
        run_config = json.dumps(reproducible_config(point_config), sort_keys=True)
        points.append({**summary, "knob": knob, "value": value, "run_config": run_config})
    return points


def curve_rows(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One CSV row per point: its numbers and the same provenance columns as a leaderboard row."""
    rows = []
    for point in points:
        flat = {**flat_row(point), "run_config": point["run_config"]}
        rows.append(
            {
                **{column: flat.get(column) for column in CURVE_COLUMNS},
                "knob": point["knob"],
                "value": point["value"],
            }
        )
    return rows


def write_grid_figure(rows: list[dict[str, Any]], png_path: Path, title: str = "") -> None:
    """A leaderboard as a figure: one panel per attack, DSR against prior preservation; a colour per method
    and a marker per guard, named in one legend under the panels (labels beside the points overlapped
    wherever systems meet, as they do at DSR 1). Each training (seed) is a small dot; a system's mean over
    its trainings is a large marker with the range of its trainings' DSR intervals (one training: its own
    interval) as the error bar."""
    import pandas as pd

    from duobench.leaderboard import system_label

    frame = pd.DataFrame(rows)
    frame["system"] = [system_label(row) for row in rows]
    style = system_styles(rows)
    attacks = list(dict.fromkeys(frame["attack"]))
    figure, axes = _panels(len(attacks))
    handles = {}
    for axis, attack in zip(axes, attacks, strict=True):
        for system, group in frame[frame["attack"] == attack].groupby("system", sort=False):
            colour, marker = style[system]
            x, y = group["prior_preservation"].astype(float), group["dsr"].astype(float)
            axis.scatter(x, y, s=12, alpha=0.45, color=colour, marker=marker)
            low, high = group["dsr_ci_low"].astype(float).min(), group["dsr_ci_high"].astype(float).max()
            errors = [[y.mean() - low], [high - y.mean()]]
            handles[system] = axis.errorbar(
                x.mean(), y.mean(), yerr=errors, marker=marker, ms=7, capsize=3, color=colour, alpha=0.85
            )
        _label(axis, f"attack: {attack}", "prior preservation (1 - distance)")
    systems = [system for system in dict.fromkeys(frame["system"]) if system in handles]
    guards = len({marker for _, marker in style.values()})
    columns = min(len(systems), guards if guards > 1 else 6)
    legend = figure.legend([handles[s] for s in systems], systems, loc="lower center", ncol=columns, fontsize=8)
    legend.get_frame().set_linewidth(0)
    legend_rows = -(-len(systems) // columns)
    _save(figure, png_path, title, bottom=(0.2 * legend_rows + 0.1) / figure.get_size_inches()[1])


GUARD_MARKERS = ("o", "s", "^", "D", "v", "P", "X")
"""A grid's guards in order: the first (no guard, in a grid) is a circle, then one marker per guard."""


def system_styles(rows: list[dict[str, Any]]) -> dict[str, tuple[str, str]]:
    """Each system's (colour, marker) in a grid figure: a colour per method, a marker per guard."""
    from duobench.leaderboard import guard_name, system_label

    methods = list(dict.fromkeys(row["method"] for row in rows))
    guards = list(dict.fromkeys(guard_name(row) for row in rows))
    colours = dict(zip(methods, method_colours(len(methods)), strict=True))
    markers = {guard: GUARD_MARKERS[n % len(GUARD_MARKERS)] for n, guard in enumerate(guards)}
    return {system_label(row): (colours[row["method"]], markers[guard_name(row)]) for row in rows}


def method_colours(count: int) -> list[str]:
    """``count`` distinguishable colours: tab10's ten, then tab20's light twins of them."""
    import matplotlib

    tab20 = matplotlib.colormaps["tab20"].colors
    order = [2 * n for n in range(10)] + [2 * n + 1 for n in range(10)]
    return [matplotlib.colors.to_hex(tab20[order[n % 20]]) for n in range(count)]


def _panels(count: int, columns: int = 4):
    """A figure with ``count`` panels, at most ``columns`` per row; returns (figure, the panels in order)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = -(-count // columns)
    width = min(count, columns)
    figure, axes = plt.subplots(rows, width, figsize=(4.5 * width, 4 * rows), squeeze=False)
    panels = [axis for row in axes for axis in row]
    for axis in panels[count:]:
        axis.set_visible(False)
    return figure, panels[:count]


def _label(axis, title: str, xlabel: str) -> None:
    axis.set_title(title)
    axis.set_xlabel(xlabel)
    axis.set_ylabel("defense success rate")
    axis.set_ylim(-0.02, 1.02)
    axis.grid(alpha=0.3)


def _save(figure, png_path: Path, title: str, bottom: float = 0.0) -> None:
    import io

    import matplotlib.pyplot as plt

    from duobench.cache import atomic_write_bytes

    if title:
        figure.suptitle(title)
    figure.tight_layout(rect=(0, bottom, 1, 1))
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120)
    plt.close(figure)
    atomic_write_bytes(png_path, buffer.getvalue())


def write_curve(points: list[dict[str, Any]], csv_path: Path, png_path: Path, title: str = "") -> None:
    """The curve as CSV and as a PNG: one panel per attack, one line per method, CI bars on DSR."""
    import pandas as pd

    from duobench.cache import atomic_write_bytes

    frame = pd.DataFrame(curve_rows(points), columns=list(CURVE_COLUMNS))
    atomic_write_bytes(csv_path, frame.to_csv(index=False).encode())
    attacks = list(dict.fromkeys(frame["attack"]))
    figure, axes = _panels(len(attacks), columns=len(attacks))
    guidance_only = set(frame["knob"]) == {"guidance"}
    for axis, attack in zip(axes, attacks, strict=True):
        for (method, knob), group in frame[frame["attack"] == attack].groupby(["method", "knob"], sort=False):
            x = "value" if knob == "guidance" else "prior_preservation"
            group = group.sort_values(x)
            errors = [group["dsr"] - group["dsr_ci_low"], group["dsr_ci_high"] - group["dsr"]]
            axis.errorbar(group[x], group["dsr"], yerr=errors, marker="o", capsize=3, label=method)
            for _, point in group.iterrows():
                axis.annotate(
                    f"{point['value']:g}",
                    (point[x], point["dsr"]),
                    fontsize=7,
                    textcoords="offset points",
                    xytext=(3, 3),
                )
        xlabel = "classifier-free guidance scale" if guidance_only else "prior preservation (1 - distance)"
        _label(axis, f"attack: {attack}", xlabel)
        axis.legend(fontsize=8)
    _save(figure, png_path, title)
