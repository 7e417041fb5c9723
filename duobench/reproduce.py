"""`duobench reproduce duo-paper`: the DUO paper's evaluation as one command, through the normal cached stages.

What the paper (Park et al., NeurIPS 2024) reports, and what this runs for it (`../shared/research/duo.md`
sections 5-6):

- **Fig. 4**, DSR against prior preservation under SneakyPrompt, Ring-A-Bell, Concept Inversion and (NeurIPS
  version) UnlearnDiffAtk: DUO at several β, ESD, UCE and SPM. The paper's baseline points come from
  hyper-parameters it does not list; here each baseline is drawn at strengths 0.5 and 1 (weight
  interpolation / LoRA scale), so each method is a short curve. The paper publishes no per-point values.
- **Tables 1-2**, FID and CLIP score on COCO captions for the base model, ESD, UCE, SPM and DUO at two β
  (nudity 500 and 250, violence 1000 and 500), from the runs without an attack.
- **Table 3**, the distance (LPIPS on SD) between the base and the unlearned model's images of visually
  similar concepts, mean ± sd (`duobench.metrics.benign.close_concept_metrics`; the concept's
  ``close_concepts``).
- **Fig. 9**, the output-preserving term's ablation: DUO with ``base_lambda`` 0 against 1e6 under
  Ring-A-Bell, at each β.

Published values are printed beside ours only where a source states them. The FID and CLIP values come from
third-party forks quoting the paper's tables (duo.md section 6.3): they are marked unverified, and the
baselines' rows are unknown. On ``--model toy`` (concept ``star``) nothing is published: the report says so;
DUO's β is the toy analogue (the star concept trains DUO at β 5, where the paper's β 500 does nothing), and
the close concepts are the two shapes nearest to a star (see ``star.yaml``).

Every number comes from `duobench.runner.run` through the stage cache, so a second invocation recomputes
nothing, and every run folder holds the ``config.yaml`` that re-runs it alone (listed in the report).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from duobench.errors import DuobenchError
from duobench.run_config import RunConfig

PAPER_ATTACKS = ("sneakyprompt", "ring-a-bell", "concept-inversion", "unlearndiffatk")
BASELINES = ("esd-u", "uce", "spm")
BASELINE_STRENGTHS = (0.5, 1.0)
ABLATION_LAMBDAS = (0.0, 1e6)
UNVERIFIED = "third-party quote of the paper's table (duo.md §6.3), unverified"


@dataclass(frozen=True)
class PaperSetting:
    """The paper's grid for one concept on one model family."""

    concept: str
    betas: tuple[float, ...]
    """DUO's β points of Fig. 4 (and of the λ ablation)."""
    table_betas: tuple[float, ...]
    """The two β of Tables 1-2."""
    published: dict[str, dict[str, float]] = field(default_factory=dict)
    """Row label → {"fid": ..., "clip_score": ...}: values a source states (`UNVERIFIED`)."""
    note: str = ""


SETTINGS: dict[tuple[str, str], PaperSetting] = {
    ("sd", "nudity"): PaperSetting(
        "nudity",
        betas=(250.0, 500.0, 1000.0),
        table_betas=(500.0, 250.0),
        published={
            "none": {"fid": 13.52, "clip_score": 30.95},
            "duo β=500": {"fid": 13.65, "clip_score": 30.88},
            "duo β=250": {"fid": 13.59, "clip_score": 30.84},
        },
    ),
    ("sd", "violence"): PaperSetting(
        "violence",
        betas=(500.0, 1000.0, 2000.0),
        table_betas=(1000.0, 500.0),
        published={"none": {"fid": 13.52, "clip_score": 30.95}, "duo β=1000": {"fid": 13.37, "clip_score": 30.78}},
    ),
    ("toy", "star"): PaperSetting(
        "star",
        betas=(5.0, 10.0, 20.0),
        table_betas=(5.0, 10.0),
        note="toy analogue: no published value; DUO's β scaled to the toy model (star.yaml trains it at β 5)",
    ),
}


@dataclass
class Report:
    """The reproduced numbers, as written into ``report.md``."""

    setting: PaperSetting
    model: str
    curve_points: list[dict[str, Any]] = field(default_factory=list)
    table_rows: list[dict[str, Any]] = field(default_factory=list)
    ablation_points: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


def paper_setting(model: str, concept: str | None) -> PaperSetting:
    from duobench.concepts import load_concept
    from duobench.run_config import model_family

    if model_family(model) in ("sd3", "toy-sd3", "tiny-random-sd3"):
        raise DuobenchError(
            f"The DUO paper's grid (attacks, Tables 1-3, the λ ablation) is for SD1.4; on SD3 it reports FID for "
            f"several β (Table 4), which is one sweep: `duobench run --model {model} --method duo --sweep "
            "beta=250,500,1000` (only DUO and no attack run on SD3)."
        )
    family = "toy" if model_family(model) == "toy" else "sd"
    concept = load_concept(concept).name if concept else ("star" if family == "toy" else "nudity")
    if (family, concept) not in SETTINGS:
        known = ", ".join(f"{c} on {'--model toy' if f == 'toy' else 'an SD model'}" for f, c in SETTINGS)
        raise DuobenchError(f"The DUO paper's grid is defined for {known}; got concept {concept!r} on {model}.")
    return SETTINGS[family, concept]


def reproduce_duo_paper(
    base_config: RunConfig,
    out: Path,
    attacks: tuple[str, ...] = PAPER_ATTACKS,
    stages=None,
    base=None,
) -> Report:
    """Run the paper's grid (module docstring) and write ``out/report.md`` with its figures and tables."""
    from duobench.curves import config_at, sweep
    from duobench.leaderboard import shared_base
    from duobench.stages import StageCache

    setting = paper_setting(base_config.model, base_config.concept)
    unknown = sorted(set(attacks) - set(PAPER_ATTACKS))
    if unknown:
        raise DuobenchError(f"The DUO paper's attacks are {', '.join(PAPER_ATTACKS)}; {unknown} are not among them.")
    started = time.perf_counter()
    stages = stages or StageCache()
    config = replace(base_config, concept=base_config.concept or setting.concept)  # a file of that concept too
    base = base if base is not None else shared_base(replace(config, method="duo", attack=attacks[0]))
    report = Report(setting, config.model)

    def curve(method: str, attack: str, knob: str, values: tuple[float, ...], **options: Any) -> list[dict]:
        """One method's points over ``knob``, each with the run folder that holds its ``config.yaml``."""
        folder = f"{method}{''.join(f'-{k}{v:g}' for k, v in options.items())}__{attack}"
        cell = replace(config, method=method, attack=attack, out=str(out / "runs" / folder))
        cell = replace(cell, method_options={**cell.method_options, **options})
        points = sweep(cell, knob, list(values), stages, base)
        return [{**point, "folder": config_at(cell, knob, point["value"]).out} for point in points]

    for attack in ("none", *attacks):  # Fig. 4 (and, without an attack, Tables 1-3)
        report.curve_points += curve("none", attack, "strength", (1.0,))
        report.curve_points += curve("duo", attack, "beta", setting.betas)
        for method in BASELINES:
            report.curve_points += curve(method, attack, "strength", BASELINE_STRENGTHS)
    report.table_rows = table_rows(report.curve_points, setting)
    if "ring-a-bell" in attacks:  # Fig. 9
        for value in ABLATION_LAMBDAS:
            for point in curve("duo", "ring-a-bell", "beta", setting.betas, base_lambda=value):
                report.ablation_points.append({**point, "method": f"duo (base_lambda {value:g})"})
    report.seconds = time.perf_counter() - started
    write_report(report, out)
    return report


def table_rows(points: list[dict[str, Any]], setting: PaperSetting) -> list[dict[str, Any]]:
    """Tables 1-3's rows from the runs without an attack: the base model, each baseline at full strength
    and DUO at the tables' two β, each with the published value where a source states one."""
    rows = []
    for point in points:
        if point["attack"] != "none":
            continue
        method, knob, value = point["method"], point["knob"], point["value"]
        if method == "duo" and value in setting.table_betas:
            label = f"duo β={value:g}"
        elif method != "duo" and knob == "strength" and value == 1.0:
            label = method
        else:
            continue
        published = setting.published.get(label, {})
        rows.append(
            {
                "label": label,
                "fid": point.get("fid"),
                "clip_score": point.get("clip_score"),
                "prior_preservation": point.get("prior_preservation"),
                "close_concepts": point.get("close_concepts") or {},
                "paper_fid": published.get("fid"),
                "paper_clip_score": published.get("clip_score"),
                "run": point["run_config"],
            }
        )
    return rows


def write_report(report: Report, out: Path) -> Path:
    """``report.md`` with Fig. 4 and Fig. 9 (PNG and CSV beside it), Tables 1-3 and the re-run commands."""
    from duobench.cache import atomic_write_bytes
    from duobench.curves import write_curve
    from duobench.report import format_number

    setting = report.setting
    out.mkdir(parents=True, exist_ok=True)
    attacked = [point for point in report.curve_points if point["attack"] != "none"]
    if attacked:
        write_curve(attacked, out / "fig4.csv", out / "fig4.png", title=f"DUO paper Fig. 4: {setting.concept}")
    if report.ablation_points:
        write_curve(report.ablation_points, out / "fig9.csv", out / "fig9.png", title="Fig. 9: base_lambda ablation")
    lines = [
        f"# The DUO paper's evaluation: {setting.concept} on {report.model}",
        "",
        f"Made by `duobench reproduce duo-paper` in {report.seconds / 60:.1f} min"
        + (f" ({setting.note})." if setting.note else "."),
        "Every run folder under `runs/` holds the `config.yaml` that re-runs it (commands at the end).",
        "",
        "## Fig. 4: DSR against prior preservation",
        "",
        "The paper publishes no per-point values for this figure.",
        "",
        "![Fig. 4](fig4.png)" if attacked else "(no attack was run)",
        "",
        "| method | knob | attack | DSR [95% CI] | prior preservation |",
        "|---|---|---|---|---|",
    ]
    for point in attacked:
        low, high = point["dsr_ci"]
        lines.append(
            f"| {point['method']} | {point['knob']}={point['value']:g} | {point['attack']} | "
            f"{point['dsr']:.2f} [{low:.2f}, {high:.2f}] | {format_number(point['prior_preservation'])} |"
        )
    lines += [
        "",
        "## Tables 1-2: FID and CLIP score (no attack)",
        "",
        f"Published values: {UNVERIFIED if setting.published else 'none for this setting'}; '-' where none is stated.",
        "",
        "| model | FID | paper FID | CLIP score | paper CLIP score | prior preservation |",
        "|---|---|---|---|---|---|",
    ]
    for row in report.table_rows:
        lines.append(
            f"| {row['label']} | {format_number(row['fid'], '.2f')} | {format_number(row['paper_fid'], '.2f')} | "
            f"{format_number(row['clip_score'], '.2f')} | {format_number(row['paper_clip_score'], '.2f')} | "
            f"{format_number(row['prior_preservation'])} |"
        )
    names = list(dict.fromkeys(name for row in report.table_rows for name in row["close_concepts"]))
    lines += [
        "",
        "## Table 3: close concepts (distance to the base model's images, mean ± sd)",
        "",
        "The paper's values were not available to us: not stated here.",
        "",
    ]
    if names:
        lines += ["| model | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
        for row in report.table_rows:
            cells = [_mean_sd(row["close_concepts"].get(name)) for name in names]
            lines.append(f"| {row['label']} | " + " | ".join(cells) + " |")
    else:
        lines.append("(the concept names no close concepts)")
    lines += ["", "## Fig. 9: the output-preserving term (base_lambda 0 against 1e6, Ring-A-Bell)", ""]
    if report.ablation_points:
        lines += ["![Fig. 9](fig9.png)", "", "| DUO | β | DSR | prior preservation |", "|---|---|---|---|"]
        for point in report.ablation_points:
            lines.append(
                f"| {point['method']} | {point['value']:g} | {point['dsr']:.2f} | "
                f"{format_number(point['prior_preservation'])} |"
            )
    else:
        lines.append("(not run: Ring-A-Bell was not among the attacks)")
    lines += ["", "## Re-running one cell", ""]
    for point in [*report.curve_points, *report.ablation_points]:
        command = f"duobench run --config {Path(point['folder']) / 'config.yaml'}"
        lines.append(f"- {point['method']} × {point['attack']}, {point['knob']}={point['value']:g}: `{command}`")
    path = out / "report.md"
    atomic_write_bytes(path, ("\n".join(lines) + "\n").encode())
    return path


def _mean_sd(entry: dict[str, Any] | None) -> str:
    from duobench.report import format_number

    if not entry:
        return "-"
    return f"{entry['distance_mean']:.3f} ± {format_number(entry['distance_sd'])}"
