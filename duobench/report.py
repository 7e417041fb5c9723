"""What a run leaves behind: summary JSON/CSV, per-image audit rows, the resolved config, a contact sheet."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from duobench.cache import atomic_write_bytes

SUMMARY_COLUMNS = (
    "method",
    "attack",
    "concept",
    "model",
    "strength",
    "dsr",
    "dsr_ci_low",
    "dsr_ci_high",
    "dsr_convention",
    "dsr_pre_attack",
    "dsr_cumulative",
    "prior_preservation",
    "close_prior_preservation",
    "close_concepts",
    "clip_score",
    "fid",
    "kid",
    "fid_reference",
    "n_prompts",
    "n_seeds",
    "n_benign",
    "guard",
    "false_refusal_rate",
    "false_refusal_ci_low",
    "false_refusal_ci_high",
    "n_benign_refused",
    "card_dsr",
    "card_judge",
    "card_prior_preservation",
    "card_clip_score",
    "card_fid",
    "method_config",
    "attack_config",
    "checkpoint_sha256",
    "base_fingerprint",
    "duobench_version",
    "git_commit",
    "environment",
)


PROVENANCE_COLUMNS = (
    "card_dsr",
    "card_judge",
    "card_prior_preservation",
    "card_clip_score",
    "card_fid",
    "n_prompts",
    "n_seeds",
    "method_config",
    "checkpoint_sha256",
    "duobench_version",
    "git_commit",
    "environment",
    "run_config",
)
"""What every published row carries to be traced and re-run: the cards, the sample size, the method's
config and weights, the code version and the full run configuration (leaderboard, seeds and curve CSVs)."""


def flat_row(summary: dict[str, Any]) -> dict[str, Any]:
    """One CSV row: the CI split in two columns, cards as ``card_<metric>``, configs as JSON text."""
    row = {key: summary.get(key) for key in SUMMARY_COLUMNS if key in summary}
    row["dsr_ci_low"], row["dsr_ci_high"] = summary["dsr_ci"]
    if summary.get("false_refusal_ci"):
        row["false_refusal_ci_low"], row["false_refusal_ci_high"] = summary["false_refusal_ci"]
    for name, card in summary["cards"].items():
        row[f"card_{name}"] = card
    row["method_config"] = json.dumps(summary.get("method_config", {}), sort_keys=True)
    row["attack_config"] = json.dumps(summary.get("attack_config", {}), sort_keys=True)
    row["environment"] = json.dumps(summary.get("environment", {}), sort_keys=True)
    row["close_concepts"] = json.dumps(summary.get("close_concepts", {}), sort_keys=True)
    return {column: row.get(column) for column in SUMMARY_COLUMNS}


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    import pandas as pd

    atomic_write_bytes(path, pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS)).to_csv(index=False).encode())


def write_audit(rows: list[dict[str, Any]], path: Path) -> None:
    """Per-image audit rows as parquet with real types (``unsafe`` boolean, missing on the benign rows'
    ``prior_preservation`` / ``clip_score`` rows; ``score`` float, ...); nested
    evidence (boxes, class scores) is kept as JSON text, and a column whose values mix types (a judge's
    evidence field that is sometimes text, sometimes a number) as text."""
    import io

    import pandas as pd
    import pyarrow as pa

    flat = [
        {
            key: json.dumps(value, sort_keys=True, default=str) if isinstance(value, dict | list) else value
            for key, value in row.items()
        }
        for row in rows
    ]
    frame = pd.DataFrame(flat)
    for column in [name for name in frame.columns if frame[name].dtype.kind == "O"]:  # object or text
        present = frame[column].dropna()
        if len(present) and present.map(lambda value: isinstance(value, bool)).all():
            frame[column] = frame[column].astype("boolean")  # judged rows: True/False; benign rows: missing
            continue
        try:
            pa.array(frame[column], from_pandas=True)
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            frame[column] = frame[column].map(lambda value: None if value is None else str(value))
    buffer = io.BytesIO()
    frame.to_parquet(buffer, index=False)
    atomic_write_bytes(path, buffer.getvalue())


def contact_sheet(columns: list[tuple[str, list[Image.Image]]], captions: list[str], cell: int = 128) -> Image.Image:
    """A grid: one row per sampled prompt, one column per model/attack, same seed across a row."""
    label_height, caption_width = 18, 220
    rows = len(captions)
    sheet = Image.new("RGB", (caption_width + cell * len(columns), label_height + cell * rows), "white")
    draw = ImageDraw.Draw(sheet)
    for column, (title, images) in enumerate(columns):
        draw.text((caption_width + column * cell + 4, 3), title[:22], fill="black")
        for row, image in enumerate(images):
            sheet.paste(
                image.resize((cell, cell), Image.NEAREST),
                (caption_width + column * cell, label_height + row * cell),
            )
    for row, caption in enumerate(captions):
        draw.text((4, label_height + row * cell + 4), _wrap(caption, 34), fill="black")
    return sheet


def _wrap(text: str, width: int) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if len(line) + len(word) + 1 > width and line:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:6])


def save_png(image: Image.Image, path: Path) -> None:
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    atomic_write_bytes(path, buffer.getvalue())


def write_run_outputs(
    out: Path, config: Any, summary: dict[str, Any], audit_rows: list[dict[str, Any]], sheet: Image.Image
) -> None:
    import yaml

    out.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out / "summary.json", json.dumps(summary, indent=2, sort_keys=True, default=str).encode())
    write_csv([flat_row(summary)], out / "summary.csv")
    write_audit(audit_rows, out / "audit.parquet")
    atomic_write_bytes(out / "config.yaml", yaml.safe_dump(asdict(config), sort_keys=True).encode())
    save_png(sheet, out / "contact_sheet.png")


def print_summary(summaries: list[dict[str, Any]]) -> None:
    """The results table on stdout (from rank 0 alone under torchrun)."""
    from rich.console import Console
    from rich.table import Table

    from duobench.distributed import process_info

    if not process_info().is_main:
        return

    table = Table(title="duobench results")
    for column in (
        "method",
        "attack",
        "strength",
        "DSR [95% CI]",
        "pre-attack DSR",
        "prior pres.",
        "CLIP",
        "FID",
        "n",
    ):
        table.add_column(column)
    for s in summaries:
        table.add_row(
            s["method"],
            s["attack"],
            f"{s['strength']:g}",
            f"{s['dsr']:.3f} [{s['dsr_ci'][0]:.3f}, {s['dsr_ci'][1]:.3f}]",
            format_number(s.get("dsr_pre_attack")),
            format_number(s["prior_preservation"]),
            format_number(s.get("clip_score")),
            format_number(s.get("fid"), ".2f"),
            f"{s['n_prompts']}x{s['n_seeds']}",
        )
    console = Console()
    console.print(table)
    notes = {
        (name, note): count
        for s in summaries
        for name, set_notes in s.get("prompt_notes", {}).items()
        for note, count in set_notes.items()
    }
    for (name, note), count in notes.items():
        console.print(f"[yellow]note[/] ({name} prompts): {count} row(s): {note}")
    for s in summaries:
        if s.get("guard"):
            low, high = s["false_refusal_ci"]
            console.print(
                f"guard {s['guard']}: {s['refused']} attack-phase requests refused (counted as defended); "
                f"false refusals on benign prompts {s['false_refusal_rate']:.3f} [{low:.3f}, {high:.3f}] "
                f"({s['n_benign_refused']} refused; metrics on the {s['n_benign']} allowed)"
            )
        if s.get("close_concepts"):
            distances = ", ".join(
                f"{name} {entry['distance_mean']:.3f} ± {format_number(entry['distance_sd'])} (n {entry['n']})"
                for name, entry in s["close_concepts"].items()
            )
            console.print(f"close concepts, {s['method']} vs base (distance mean ± sd): {distances}")


def format_number(value: Any, spec: str = ".3f") -> str:
    """A number for a table; "-" for a missing or NaN value."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return "-"
    return "-" if number != number else format(number, spec)


def write_judgments(out: Path, metric, rows: list[dict[str, Any]]) -> str:
    """``duobench generate --judge``: ``judgments.csv`` (one row per image) and ``judge_summary.json`` in
    ``out``; returns the one-line result to print."""
    import pandas as pd

    result = metric.compute()
    unsafe = sum(bool(row["unsafe"]) for row in rows)
    summary = {**result, "unsafe_images": unsafe, "unsafe_rate": 1 - result["dsr_attack_only"]["value"]}
    table = pd.DataFrame(rows).drop(columns="phase")  # no attack here: every image is of the plain prompts
    atomic_write_bytes(out / "judgments.csv", table.to_csv(index=False).encode())
    atomic_write_bytes(out / "judge_summary.json", json.dumps(summary, indent=2, default=str).encode())
    low, high = result["dsr_attack_only"]["ci_low"], result["dsr_attack_only"]["ci_high"]
    return (
        f"{result['judge']}: {unsafe} of {result['n_images_attack']} images unsafe (unsafe rate "
        f"{summary['unsafe_rate']:.3f}, 95% CI [{1 - high:.3f}, {1 - low:.3f}] over "
        f"{result['n_prompts']} prompts) → {out / 'judgments.csv'}"
    )
