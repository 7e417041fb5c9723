"""Prompt sets from the files the field actually uses, with a written policy for each of their quirks.

Sources: I2P with the HF column names (``sd_seed``, ``sd_guidance_scale``, ``sd_image_width`` ...), the
ESD-format CSV (``evaluation_seed``, ``evaluation_guidance``, ``case_number``), Ring-A-Bell's CSVs (the
ESD format with a ``prompt`` column of GA token soup), plain text files (one prompt per line), an HF dataset
id (``hf:AIML-TUDA/i2p``, loaded with `datasets`), and inline lists from a concept file.

Quirk policies (each counted and reported in `PromptSet.notes`, never a crash, never a silent drop):

- **empty prompt** (I2P case 2260): kept; an empty prompt is a valid unconditional generation.
- **embedded newlines / surrounding whitespace**: collapsed to single spaces (the model never saw them).
- **guidance** from the row is kept (I2P has up to 255: that is what the I2P protocol asks for);
  ``guidance_override`` replaces every row's value.
- **resolution** from the row (19 I2P rows are not 512 wide, one is 128x128) is *not* used by default:
  every image is made at the model's native size so LPIPS/FID/judges compare like with like;
  ``use_row_resolution=True`` keeps the row's size (rounded down to a multiple of 8).
- **missing seed**: the row's position in the set is its seed (stable under filtering: taken before it).
- **unreadable rows** (a prompt that is not text): skipped with a counted warning.
"""

from __future__ import annotations

import csv
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from duobench.concepts import PromptSetSpec
from duobench.errors import DuobenchError
from duobench.items import SamplerSettings, WorkItem

SEED_COLUMNS = ("evaluation_seed", "sd_seed", "seed")
GUIDANCE_COLUMNS = ("evaluation_guidance", "sd_guidance_scale", "guidance", "guidance_scale")
WIDTH_COLUMNS = ("sd_image_width", "width")
HEIGHT_COLUMNS = ("sd_image_height", "height")
ID_COLUMNS = ("case_number", "id")
POSITION = "__position"  # a row's place in the unfiltered source, recorded before any filter


@dataclass(frozen=True)
class PromptRow:
    prompt: str
    seed: int
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    meta: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)


@dataclass
class PromptSet:
    name: str
    rows: list[PromptRow]
    notes: Counter = field(default_factory=Counter)

    def __len__(self) -> int:
        return len(self.rows)


def load_prompt_set(
    spec: PromptSetSpec | str,
    name: str = "",
    guidance_override: float | None = None,
    use_row_resolution: bool = False,
    limit: int | None = None,
) -> PromptSet:
    """Load a prompt set from a concept's `PromptSetSpec` or a path / ``hf:`` id string."""
    if isinstance(spec, str):
        spec = PromptSetSpec(source=spec)
    name = name or Path(spec.source).stem
    notes: Counter = Counter()
    if spec.source == "inline":
        records = [{"prompt": prompt} for prompt in spec.prompts]
    elif spec.source.startswith("hf:"):
        records = _read_hf_dataset(spec.source[3:], spec.split)
    else:
        records = _read_file(Path(spec.source))
    records = [{**record, POSITION: position} for position, record in enumerate(records)]
    if spec.filter:
        records = _apply_filter(records, spec.filter, spec.source)
    if limit is not None:
        records = records[:limit]  # N prompts, each with all of its seeds
    rows = []
    for record in records:
        row = _to_row(record, int(record[POSITION]), notes, guidance_override, use_row_resolution)
        if row is not None:
            rows.extend(_with_extra_seeds(row, spec.seeds_per_prompt))
    if not rows:
        raise DuobenchError(
            f"Prompt set {spec.source!r}{' with filter ' + repr(spec.filter) if spec.filter else ''} has no "
            "usable prompts. Check the file and the filter."
        )
    return PromptSet(name=name, rows=rows, notes=notes)


def _with_extra_seeds(row: PromptRow, seeds_per_prompt: int) -> list[PromptRow]:
    """``seeds_per_prompt`` images per prompt: the row's seed, then seed + 1, seed + 2, ..."""
    return [
        PromptRow(row.prompt, row.seed + k, row.guidance, row.height, row.width, {**row.meta, "seed_index": k})
        for k in range(max(1, seeds_per_prompt))
    ]


def _read_file(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        raise DuobenchError(f"Prompt file {path} does not exist.")
    if path.suffix.lower() in {".csv", ".tsv"}:
        return _read_csv(path, delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
    if path.suffix.lower() == ".parquet":
        import pandas as pd

        return pd.read_parquet(path).to_dict("records")
    if path.suffix.lower() in {".txt", ""}:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
        return [{"prompt": line} for line in lines if line.strip()]
    raise DuobenchError(
        f"Prompt file {path} has an unsupported type {path.suffix!r}. Use a .csv (with a 'prompt' column), "
        ".tsv, .parquet or .txt (one prompt per line) file, or an HF dataset id as hf:<id>."
    )


def _read_csv(path: Path, delimiter: str) -> list[dict[str, Any]]:
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as handle:
            reader = csv.DictReader(handle, delimiter=delimiter)
            columns = reader.fieldnames or []
            if "prompt" not in columns:
                raise DuobenchError(
                    f"Prompt file {path} has no 'prompt' column (columns: {', '.join(columns) or 'none'}). "
                    "Prompt CSVs need a header row with a 'prompt' column; seed and guidance columns are "
                    f"optional ({', '.join(SEED_COLUMNS)} / {', '.join(GUIDANCE_COLUMNS)})."
                )
            return list(reader)
    except csv.Error as error:
        raise DuobenchError(f"Prompt file {path} is not a readable CSV: {error}") from error


def _read_hf_dataset(dataset_id: str, split: str) -> list[dict[str, Any]]:
    try:
        import datasets

        return list(datasets.load_dataset(dataset_id, split=split))
    except Exception as error:  # offline, gated, or a wrong id: all mean "cannot get the prompts"
        raise DuobenchError(
            f"Cannot load the HF dataset {dataset_id!r} (split {split!r}): {type(error).__name__}: "
            f"{str(error).splitlines()[0][:200]}. It needs internet once (then the HF cache works offline); "
            "alternatively download it as CSV and pass the file path instead."
        ) from error


def _apply_filter(records: list[dict[str, Any]], query: str, source: str) -> list[dict[str, Any]]:
    import pandas as pd

    frame = pd.DataFrame.from_records(records)
    frame = frame.apply(_numeric_if_possible)
    try:
        # The python engine: string methods (`.str.contains`) fail under numexpr, which may be installed.
        return frame.query(query, engine="python").to_dict("records")
    except Exception as error:  # pandas raises several types for a bad query
        raise DuobenchError(
            f"The filter {query!r} cannot be applied to {source}: {error}. Columns: {', '.join(frame.columns)}."
        ) from error


def _numeric_if_possible(column):
    """CSV cells arrive as text; filters like ``nudity_percentage > 50`` need numbers."""
    import pandas as pd

    try:
        return pd.to_numeric(column)
    except (ValueError, TypeError):
        return column


def _first(record: dict[str, Any], columns: tuple[str, ...]) -> Any:
    for column in columns:
        value = record.get(column)
        if value is not None and str(value).strip() not in {"", "nan", "None"}:
            return value
    return None


def _to_row(
    record: dict[str, Any],
    position: int,
    notes: Counter,
    guidance_override: float | None,
    use_row_resolution: bool,
) -> PromptRow | None:
    raw = record.get("prompt")
    if raw is None or (isinstance(raw, float) and raw != raw):
        raw = ""
    if not isinstance(raw, str):
        notes["skipped: prompt is not text"] += 1
        return None
    prompt = " ".join(raw.split())
    if prompt != raw:
        notes["whitespace/newlines collapsed"] += 1
    if not prompt:
        notes["empty prompt kept (unconditional)"] += 1
    seed = _first(record, SEED_COLUMNS)
    if seed is None:
        notes["no seed column: row position used as seed"] += 1
        seed = position
    guidance = _first(record, GUIDANCE_COLUMNS)
    if guidance_override is not None:
        guidance = guidance_override
    elif guidance is not None and float(guidance) > 30:
        notes["guidance > 30 kept from the row"] += 1
    height = width = None
    row_width, row_height = _first(record, WIDTH_COLUMNS), _first(record, HEIGHT_COLUMNS)
    if use_row_resolution and row_width is not None and row_height is not None:
        width, height = int(float(row_width)) // 8 * 8, int(float(row_height)) // 8 * 8
    elif row_width is not None and int(float(row_width)) != 512:
        notes["row resolution ignored (native size used)"] += 1
    meta = {"position": position}
    case = _first(record, ID_COLUMNS)
    if case is not None:
        meta["case_number"] = str(case)
    for column in ("categories", "nudity_percentage", "inappropriate_percentage"):
        if column in record and record[column] is not None:
            meta[column] = record[column] if isinstance(record[column], str | int | float) else str(record[column])
    return PromptRow(
        prompt=prompt,
        seed=int(float(seed)),
        guidance=float(guidance) if guidance is not None else None,
        height=height,
        width=width,
        meta=meta,
    )


def to_work_items(rows: list[PromptRow], settings: SamplerSettings) -> list[WorkItem]:
    """Work items for ``rows``: a row's own guidance (and size, when kept) wins over ``settings``."""
    return [
        settings.item(row.prompt, row.seed, row.guidance, row.height, row.width, meta=dict(row.meta)) for row in rows
    ]
