"""What FID is measured against: real images, or the base model's own images.

The two answer different questions, so they carry different card ids:

- **Real images** (``fid-clean``, ``fid-toy``): FID of the evaluated model's benign images against real
  images of the same captions, the way ESD, UCE, SPM and DUO report FID on MS-COCO. This is the default of
  every built-in concept.
- **The base model** (``fid-clean-vs-base``, ``fid-toy-vs-base``): FID against the original model's images of
  the same prompts and seeds, which measures drift from the original model (0 for ``--method none``).

A reference is named by ``--fid-reference`` (or the concept's ``fid_reference``):

- ``base``: the base model's benign images.
- ``coco-val2014``: the MS-COCO 2014 val images whose ids are the benign rows' ``case_number`` (the
  COCO-30k prompt files of ESD and the erasure papers carry them), downloaded once from the COCO image
  server into ``$DUOBENCH_HOME/fid-reference/coco-val2014`` (``DUOBENCH_COCO_URL`` points at a mirror).
- ``toy-shapes``: real drawings from the toy world's renderer of the shape and colour each benign prompt
  asks for, ``TOY_DRAWINGS_PER_ROW`` per row, rendered once and cached.
- a folder of images, or a clean-fid statistics ``.npz`` (``mu``/``sigma``, ``feats`` for KID).

References are prepared while the run is planned, so a missing download fails before any model loads.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from duobench.errors import DuobenchError
from duobench.metrics.base import MetricCard
from duobench.paths import duobench_home

COCO_URL = "http://images.cocodataset.org/val2014"
COCO_URL_ENV = "DUOBENCH_COCO_URL"
COCO_DOWNLOAD_THREADS = 8
TOY_DRAWINGS_PER_ROW = 10
TOY_REFERENCE_SEED = 20_261_130
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")


@dataclass(frozen=True)
class FidReference:
    """A resolved reference: ``path`` is a folder or ``.npz`` of real images' statistics, ``None`` for the
    base model. ``identity`` enters the FID stage's cache key; ``source`` is what the summary says."""

    name: str
    source: str
    path: Path | None
    identity: Any

    @property
    def is_base_model(self) -> bool:
        return self.path is None


def card_for(card: MetricCard, reference: FidReference) -> MetricCard:
    """The FID card for this kind of reference: against the base model it is another metric, so another id."""
    if not reference.is_base_model:
        return replace(card, params={**card.params, "reference": "real images"})
    return replace(
        card,
        name=f"{card.name}-vs-base",
        description=f"Drift from the original model: {card.description} Reference: the base model's images "
        "of the same benign prompts and seeds (0 when nothing changed), not real images.",
        params={**card.params, "reference": "base model, same prompts and seeds"},
    )


def resolve_fid_reference(spec: str, benign_rows: list[Any]) -> FidReference:
    """The reference ``spec`` names, prepared (downloaded or rendered) and ready to read."""
    if spec == "base":
        return FidReference("base", "the base model's images of the same benign prompts and seeds", None, "base")
    if spec == "coco-val2014":
        return coco_val2014(benign_rows)
    if spec == "toy-shapes":
        return toy_shapes(benign_rows)
    path = Path(spec).expanduser()
    if path.suffix == ".npz" and path.is_file():
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        return FidReference(path.name, f"clean-fid statistics {path}", path, {"npz_sha256": digest})
    if path.is_dir():
        files = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DuobenchError(f"FID reference folder {path} holds no images ({', '.join(IMAGE_SUFFIXES)}).")
        listing = [(f.relative_to(path).as_posix(), f.stat().st_size) for f in files]
        digest = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
        return FidReference(path.name, f"{len(files)} images in {path}", path, {"folder_listing": digest})
    raise DuobenchError(
        f"Unknown FID reference {spec!r}. Use 'base' (drift from the base model), 'coco-val2014', "
        "'toy-shapes', a folder of real images, or a clean-fid statistics .npz file."
    )


def coco_val2014(benign_rows: list[Any]) -> FidReference:
    """The COCO 2014 val images of the benign captions, fetched once (a re-run only fetches what is missing)."""
    if not benign_rows or any("case_number" not in row.meta for row in benign_rows):
        raise DuobenchError(
            "The coco-val2014 FID reference needs a COCO image id (a case_number column) in every benign row. "
            "Give --fid-reference a folder of real images or a clean-fid .npz instead, or 'base' for drift."
        )
    ids = sorted({int(row.meta["case_number"]) for row in benign_rows})
    folder = duobench_home() / "fid-reference" / "coco-val2014"
    folder.mkdir(parents=True, exist_ok=True)
    base_url = os.environ.get(COCO_URL_ENV, COCO_URL).rstrip("/")
    missing = [i for i in ids if not (folder / coco_file_name(i)).is_file()]
    with ThreadPoolExecutor(COCO_DOWNLOAD_THREADS) as pool:
        failures = [error for error in pool.map(lambda i: _download(base_url, folder, i), missing) if error]
    if failures:
        raise DuobenchError(
            f"Could not download {len(failures)} of {len(ids)} COCO val2014 images for the FID reference "
            f"(first: {failures[0]}). Put the files (COCO_val2014_<id>.jpg) into {folder}, set {COCO_URL_ENV} "
            "to a reachable mirror, pass --fid-reference <folder or clean-fid .npz>, or --fid-reference base."
        )
    return FidReference(
        "coco-val2014",
        f"{len(ids)} MS-COCO 2014 val images of the benign captions",
        _folder_of(folder, [coco_file_name(i) for i in ids]),
        {"coco-val2014": ids},
    )


def coco_file_name(image_id: int) -> str:
    return f"COCO_val2014_{image_id:012d}.jpg"


def _download(base_url: str, folder: Path, image_id: int) -> str:
    """Fetch one image atomically; returns an error text, or "" on success."""
    name = coco_file_name(image_id)
    partial = folder / f".{name}.{os.getpid()}.partial"
    try:
        with urllib.request.urlopen(f"{base_url}/{name}", timeout=60) as response, partial.open("wb") as out:
            shutil.copyfileobj(response, out)
        partial.rename(folder / name)
    except (OSError, urllib.error.URLError) as error:
        partial.unlink(missing_ok=True)
        return f"{name}: {error}"
    return ""


def _folder_of(store: Path, names: list[str]) -> Path:
    """A folder holding exactly ``names`` from ``store`` (hard links, copies where links fail), so the
    reference is the benign rows' images even when the store holds more."""
    digest = hashlib.sha256("\n".join(names).encode()).hexdigest()[:16]
    view = store.parent / f"{store.name}-{digest}"
    if view.is_dir():
        return view
    staging = store.parent / f".{view.name}.{os.getpid()}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for name in names:
        try:
            os.link(store / name, staging / name)
        except OSError:
            shutil.copy2(store / name, staging / name)
    try:
        staging.rename(view)
    except OSError:  # another process made the same view first
        shutil.rmtree(staging, ignore_errors=True)
    return view


def toy_shapes(benign_rows: list[Any]) -> FidReference:
    """Real drawings of what each benign prompt asks for, from the toy world's renderer."""
    import numpy as np

    from duobench.toy.metrics import requested_shape_and_colour
    from duobench.toy.shapes import draw, random_spec

    requests = [requested_shape_and_colour(row.prompt) for row in benign_rows]
    unparsed = [
        row.prompt for row, (shape, colour) in zip(benign_rows, requests, strict=True) if not shape or not colour
    ]
    if unparsed:
        raise DuobenchError(
            f"The toy-shapes FID reference draws the shape and colour a prompt names; {unparsed[0]!r} names no "
            "toy shape and colour. Use --fid-reference base or a folder of real images for these prompts."
        )
    identity = {"toy-shapes": requests, "per_row": TOY_DRAWINGS_PER_ROW, "seed": TOY_REFERENCE_SEED}
    digest = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:16]
    folder = duobench_home() / "fid-reference" / f"toy-shapes-{digest}"
    if not folder.is_dir():
        staging = folder.parent / f".{folder.name}.{os.getpid()}.partial"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        for index, (shape, colour) in enumerate(requests):
            rng = np.random.default_rng([TOY_REFERENCE_SEED, index])
            for copy in range(TOY_DRAWINGS_PER_ROW):
                draw(random_spec(rng, shape, colour)).save(staging / f"{index:05d}_{copy:02d}.png")
        try:
            staging.rename(folder)
        except OSError:  # another process rendered the same reference first
            shutil.rmtree(staging, ignore_errors=True)
    count = len(requests) * TOY_DRAWINGS_PER_ROW
    return FidReference("toy-shapes", f"{count} drawings of the benign prompts' shapes", folder, identity)
