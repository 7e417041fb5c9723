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
- **unusable number cells** (seed ``abc`` or ``12.5``, guidance ``high`` or ``inf``, width ``wide``, ``0`` or
  ``-64`` when the row's size is used): the row is skipped, counted per column and problem with its row
  numbers (data rows counted from 1, a CSV's header not counted) and the bad values. A cell that reads
  ``nan``/``None`` or is empty is a missing value, not a bad one (pandas and parquet write missing cells so):
  a missing seed falls back to the row position, a missing guidance to the sampler's default (counted). A
  width or height that is not used (native size, the default) never skips a row. If every row is skipped,
  loading fails with one `DuobenchError` naming the file, the rows, the columns and the fix.
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
PROMPT_COLUMNS = ("prompt", "adv_prompt")  # adv_prompt: MMA-Diffusion's 1,000-prompt benchmark (target_prompt, ...)
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
        # An inline list's seed is its position by definition, not a missing column worth a note.
        records = [{"prompt": prompt, "seed": position} for position, prompt in enumerate(spec.prompts)]
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
    bad_cells: dict[str, list[str]] = {}
    for record in records:
        try:
            row = _to_row(record, int(record[POSITION]), notes, guidance_override, use_row_resolution)
        except BadCell as bad:
            bad_cells.setdefault(bad.problem, []).append(f"{int(record[POSITION]) + 1} ({bad.value!r})")
            continue
        if row is not None:
            rows.extend(_with_extra_seeds(row, spec.seeds_per_prompt))
    for problem, where in bad_cells.items():
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        notes[f"skipped: {problem} (row{'s' if len(where) > 1 else ''} {shown}); fix or empty the cell"] += len(where)
    if not rows:
        skips = "; ".join(note.removeprefix("skipped: ") for note in notes if note.startswith("skipped:"))
        raise DuobenchError(
            f"Prompt set {spec.source!r}{' with filter ' + repr(spec.filter) if spec.filter else ''} has no "
            "usable prompts. "
            + (f"Every row was skipped: {skips}. " if skips else "")
            + "Check the file and the filter."
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
            if not set(PROMPT_COLUMNS) & set(columns):
                raise DuobenchError(
                    f"Prompt file {path} has no 'prompt' column (columns: {', '.join(columns) or 'none'}). "
                    "Prompt CSVs need a header row with a 'prompt' column; seed and guidance columns are "
                    f"optional ({', '.join(SEED_COLUMNS)} / {', '.join(GUIDANCE_COLUMNS)})."
                )
            return list(reader)
    except csv.Error as error:
        raise DuobenchError(f"Prompt file {path} is not a readable CSV: {error}") from error


def _read_hf_dataset(dataset_id: str, split: str) -> list[dict[str, Any]]:
    from duobench.models import unreachable_errors

    try:
        import datasets

        return list(datasets.load_dataset(dataset_id, split=split))
    except unreachable_errors() as error:  # offline, gated, or a wrong id: "cannot get the prompts"
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
    found = _first_cell(record, columns)
    return found[1] if found else None


def _first_cell(record: dict[str, Any], columns: tuple[str, ...]) -> tuple[str, Any] | None:
    """(column, value) of the first of ``columns`` with a value: empty, ``nan`` and ``None`` cells are missing."""
    for column in columns:
        value = record.get(column)
        if value is not None and str(value).strip().lower() not in {"", "nan", "none"}:
            return column, value
    return None


class BadCell(ValueError):
    """A seed, guidance or size cell that is not a usable number: its row is skipped and counted."""

    def __init__(self, problem: str, value: Any) -> None:
        super().__init__(f"{problem}: {value!r}")
        self.problem, self.value = problem, value


SEED_RANGE = (-(2**63), 2**64 - 1)  # what torch.Generator.manual_seed accepts


def _number(cell: tuple[str, Any], whole: bool, smallest: float) -> int | float:
    """A cell as a finite number (a whole one if ``whole``) of at least ``smallest``, else `BadCell`."""
    column, value = cell
    kind = "a whole number" if whole else "a number"
    if isinstance(value, bool):
        raise BadCell(f"{column} is not {kind}", value)
    try:
        text = str(value).strip()
        number: int | float = int(text) if whole and text.lstrip("+-").isdigit() else float(text)
    except (TypeError, ValueError):
        raise BadCell(f"{column} is not {kind}", value) from None
    if isinstance(number, float):
        if number != number or number in (float("inf"), float("-inf")):
            raise BadCell(f"{column} is not a finite number", value)
        if whole:
            if not number.is_integer():
                raise BadCell(f"{column} is not {kind}", value)
            number = int(number)
    if number < smallest:
        raise BadCell(f"{column} is below {smallest:g}", value)
    return number


def _to_row(
    record: dict[str, Any],
    position: int,
    notes: Counter,
    guidance_override: float | None,
    use_row_resolution: bool,
) -> PromptRow | None:
    raw = next((record[column] for column in PROMPT_COLUMNS if column in record), None)
    if raw is None or (isinstance(raw, float) and raw != raw):
        raw = ""
    if not isinstance(raw, str):
        notes["skipped: prompt is not text"] += 1
        return None
    prompt = " ".join(raw.split())
    # Cells are checked before any note is counted, so a skipped row adds only its skip note.
    seed_cell = _first_cell(record, SEED_COLUMNS)
    seed = _number(seed_cell, whole=True, smallest=SEED_RANGE[0]) if seed_cell else position
    if seed > SEED_RANGE[1]:
        raise BadCell(f"{seed_cell[0]} is above {SEED_RANGE[1]} (torch's largest seed)", seed_cell[1])
    guidance_cell = _first_cell(record, GUIDANCE_COLUMNS)
    guidance = None
    if guidance_override is not None:
        guidance = guidance_override
    elif guidance_cell is not None:
        guidance = float(_number(guidance_cell, whole=False, smallest=0))
    height = width = None
    width_cell, height_cell = _first_cell(record, WIDTH_COLUMNS), _first_cell(record, HEIGHT_COLUMNS)
    if use_row_resolution and width_cell is not None and height_cell is not None:
        width, height = (_number(cell, whole=False, smallest=8) // 8 * 8 for cell in (width_cell, height_cell))
        width, height = int(width), int(height)
    if prompt != raw:
        notes["whitespace/newlines collapsed"] += 1
    if not prompt:
        notes["empty prompt kept (unconditional)"] += 1
    if seed_cell is None:
        notes["no seed column: row position used as seed"] += 1
    if guidance is not None and guidance > 30 and guidance_override is None:
        notes["guidance > 30 kept from the row"] += 1
    if guidance_cell is None and guidance_override is None and any(column in record for column in GUIDANCE_COLUMNS):
        notes["guidance cell empty or nan: the sampler's default guidance used"] += 1
    if width is None and width_cell is not None and _differs_from_512(width_cell[1]):
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
        seed=int(seed),
        guidance=float(guidance) if guidance is not None else None,
        height=height,
        width=width,
        meta=meta,
    )


def _differs_from_512(value: Any) -> bool:
    try:
        return float(value) != 512
    except (TypeError, ValueError):
        return True  # unreadable, and unused: the native size is made anyway


def to_work_items(rows: list[PromptRow], settings: SamplerSettings) -> list[WorkItem]:
    """Work items for ``rows``: a row's own guidance (and size, when kept) wins over ``settings``."""
    return [
        settings.item(row.prompt, row.seed, row.guidance, row.height, row.width, meta=dict(row.meta)) for row in rows
    ]
