"""A run's images under readable names: ``<out>/images/<set>/<case>_<prompt>_<seed>.png``.

The images themselves live once in the content-addressed store (``$DUOBENCH_HOME/images/<key[:2]>/<key>.png``);
a run's ``--out`` folder records them in its generation manifests. `link_run_images` turns those records into a
folder a person can open in a file browser:

- ``images/attack/``: the images the attack-phase verdicts (DSR) are computed on, made with the attack's
  prompts (or, for a model-changing attack, on the attacked model);
- ``images/pre-attack/``: the concept's plain prompts on the unlearned model, when there was an attack;
- ``images/benign-base/`` and ``images/benign-unlearned/``: the benign prompts on the base and on the
  unlearned model, the pairs prior preservation compares;
- ``images/index.csv``: one row per file: set, file, prompt (and the plain prompt an attack started from),
  seed, the judge's verdict where there is one, and the store key.

``<case>`` is the prompt's case number in its source file when it has one (I2P), else its row in the prompt
set; ``<prompt>`` a short slug of the (plain) prompt, so that a name says what was asked for. Each file is a
hard link into the store where the file system allows it (same device), a symbolic link where it does not,
and a copy as the last resort, so the folder costs no space and needs no store to stay valid as long as it is
a hard link. The folder is derived data: every call rebuilds it, replacing what an earlier run (or an earlier
call) left, so re-running never fails on existing files.

Only this run's images are linked, although an ``--out`` folder's manifests keep every run's rows: the
attack and pre-attack images are those ``audit.parquet`` judged, and the benign images those made by the
base model (``summary.json``'s fingerprint) and by the model the pre-attack images came from.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from duobench.cache import MANIFEST_NAME, RunManifest, atomic_write_bytes

IMAGES_FOLDER = "images"
BENIGN_SETS = {"benign-base": "benign-base", "benign-target": "benign-unlearned"}
"""Generation folder -> browsable set, for the benign images."""
INDEX_COLUMNS = ("set", "file", "prompt", "source_prompt", "seed", "unsafe", "key")


def link_run_images(out: Path) -> dict[str, int]:
    """Rebuild ``out/images/`` from the run's manifests; returns the number of images per set."""
    out = Path(out)
    chosen = _this_runs_rows(out)
    root = out / IMAGES_FOLDER
    index_rows, counts = [], {}
    for set_name, rows in chosen.items():
        folder = root / set_name
        folder.mkdir(parents=True, exist_ok=True)
        names = _file_names(rows)
        for name, row in zip(names, rows, strict=True):
            link_or_copy(Path(row["path"]), folder / name)
            item, meta = row["item"], row["item"].get("meta", {})
            index_rows.append(
                {
                    "set": set_name,
                    "file": f"{set_name}/{name}",
                    "prompt": item.get("prompt", ""),
                    "source_prompt": meta.get("source_prompt", ""),
                    "seed": item.get("seed"),
                    "unsafe": row.get("unsafe", ""),
                    "key": row["key"],
                }
            )
        _remove_stale(folder, set(names))
        counts[set_name] = len(rows)
    if root.exists():
        for folder in root.iterdir():  # sets an earlier run had and this one has not (no attack this time)
            if folder.is_dir() and folder.name not in chosen:
                shutil.rmtree(folder)
    if index_rows:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=INDEX_COLUMNS)
        writer.writeheader()
        writer.writerows(index_rows)
        atomic_write_bytes(root / "index.csv", buffer.getvalue().encode())
    return counts


def link_or_copy(source: Path, destination: Path) -> str:
    """Put ``source`` at ``destination`` as a hard link, else a symbolic link, else a copy; replaces whatever
    ``destination`` was. Returns which of the three it made (or ``"kept"`` if it was already that file)."""
    source = Path(source).resolve()
    if destination.exists() and os.path.samefile(source, destination):
        return "kept"
    handle, temporary_name = tempfile.mkstemp(dir=destination.parent, prefix=f".{destination.name}.", suffix=".tmp")
    os.close(handle)
    temporary = Path(temporary_name)
    temporary.unlink()
    try:
        for kind, make in (("hardlink", os.link), ("symlink", os.symlink), ("copy", shutil.copyfile)):
            try:
                make(source, temporary)
            except (OSError, NotImplementedError):  # EXDEV across devices, EPERM, no symlink privilege, ...
                temporary.unlink(missing_ok=True)
                continue
            os.replace(temporary, destination)
            return kind
        raise OSError(f"cannot link or copy {source} to {destination}")
    finally:
        temporary.unlink(missing_ok=True)


def _this_runs_rows(out: Path) -> dict[str, list[dict[str, Any]]]:
    """Manifest rows by browsable set, in manifest order, restricted to this run's images (module docstring)."""
    generations = out / "generations"
    judged = _judged(out)
    rows: dict[str, list[dict[str, Any]]] = {"attack": [], "pre-attack": []}
    for folder in ("attack", "pre-attack"):
        for row in _manifest(generations / folder):
            if judged is None or str(row["path"]) in judged:
                phase = row["item"].get("meta", {}).get("phase", folder)
                row = {**row, "unsafe": "" if judged is None else judged[str(row["path"])].get(phase, "")}
                rows.setdefault(phase, []).append(row)
    # The unlearned model made the pre-attack images, or, with no attack, the attack-phase ones.
    target_models = {row["model"] for row in rows["pre-attack"] or rows["attack"]}
    base_model = _summary(out).get("base_fingerprint")
    models = {"benign-base": {base_model}, "benign-target": target_models}
    for folder, set_name in BENIGN_SETS.items():
        rows[set_name] = [
            row for row in _manifest(generations / folder) if judged is None or row["model"] in models[folder]
        ]
    return {name: set_rows for name, set_rows in rows.items() if set_rows}


def _manifest(folder: Path) -> list[dict[str, Any]]:
    """Trusted rows of a generation folder's manifest (complete lines whose image exists), first occurrence of
    a key only, in the order they were written."""
    if not (folder / MANIFEST_NAME).exists():
        return []
    return list(RunManifest(folder).rows().values())


def _judged(out: Path) -> dict[str, dict[str, Any]] | None:
    """Image path -> {phase: unsafe} from ``audit.parquet``; None when the run left no audit (then every
    manifest row is linked)."""
    path = out / "audit.parquet"
    if not path.exists():
        return None
    import pandas as pd

    frame = pd.read_parquet(path)
    if not {"image", "phase", "unsafe"} <= set(frame.columns):
        return None
    judged: dict[str, dict[str, Any]] = {}
    for image, phase, unsafe in zip(frame["image"], frame["phase"], frame["unsafe"], strict=True):
        if phase in ("attack", "pre-attack") and isinstance(image, str):
            judged.setdefault(image, {})[phase] = bool(unsafe) if unsafe is not None else ""
    return judged


def _summary(out: Path) -> dict[str, Any]:
    path = out / "summary.json"
    return json.loads(path.read_text()) if path.exists() else {}


def _file_names(rows: list[dict[str, Any]]) -> list[str]:
    """``<case>_<prompt slug>_<seed>.png`` per row; the store key's start tells apart rows that share one."""
    cases = [_case(row["item"].get("meta", {})) for row in rows]
    width = max((len(case) for case in cases if case.isdigit()), default=1)
    names = []
    for case, row in zip(cases, rows, strict=True):
        item = row["item"]
        prompt = item.get("meta", {}).get("source_prompt") or item.get("prompt", "")
        case = case.zfill(width) if case.isdigit() else case
        names.append(f"{case}_{_slug(prompt)}_{item.get('seed')}")
    seen: dict[str, int] = {}
    for name in names:
        seen[name] = seen.get(name, 0) + 1
    return [
        f"{name}_{row['key'][:8]}.png" if seen[name] > 1 else f"{name}.png"
        for name, row in zip(names, rows, strict=True)
    ]


def _case(meta: dict[str, Any]) -> str:
    case = meta.get("case_number", meta.get("position", meta.get("prompt_id", "")))
    return _slug(str(case), 24) or "x"


def _slug(text: str, length: int = 40) -> str:
    """Lower-case letters, digits and dashes: safe in every file system and readable."""
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[:length].rstrip("-") or "empty"


def _remove_stale(folder: Path, keep: set[str]) -> None:
    for path in folder.iterdir():
        if path.name not in keep and (path.is_file() or path.is_symlink()):
            path.unlink()
