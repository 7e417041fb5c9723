"""Generate a prompt set and judge every image, the judging overlapped with sampling.

`generate_and_judge` hands each freshly generated batch to a `JudgingWorker` (the engine's ``on_batch``
hook). When the model is on a GPU the judge works in a background thread while the next batch samples. On
a CPU it judges each batch in line, because there a background judge competes with the sampler for the same
cores (2x slower on 2 cores, `benchmarks/judged_generation.py`). Images the store already had (a resumed or
repeated run) are judged from disk afterwards. Items that share an image key (same prompt, seed and
settings, e.g. an attack that left a prompt unchanged) are generated once and judged once per item, so a
metric that groups by item (DSR's phases and prompt ids) sees every item.

``duobench run`` judges its attack images this way, and ``duobench generate --judge`` does it for any
prompt file.

Under a process group each rank judges the images whose key it owns (the ones it generates, or would have),
and every rank gets every item's audit row back; the metric's state stays this rank's share, to be merged
once with `duobench.metrics.base.sync_state` before ``compute`` (a metric may span several calls).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from duobench.distributed import gather_indexed, owns, process_info
from duobench.engine import GenerationReport, generate_cached
from duobench.generator import as_generator
from duobench.items import WorkItem
from duobench.metrics.base import StreamingMetric, load_images
from duobench.metrics.worker import JudgingWorker

STORED_IMAGES_PER_BATCH = 64


def generate_and_judge(
    model,
    fingerprint: str,
    items: Sequence[WorkItem],
    out_dir: Path,
    metric: StreamingMetric,
    batch_size: int | str = 8,
    store_root: Path | None = None,
    progress: bool = False,
    in_background: bool | None = None,
) -> tuple[GenerationReport, list[dict[str, Any]]]:
    """Generate ``items`` into the store and feed every image to ``metric``, which must keep one audit row
    per image (a judge-based metric such as DSR).

    Returns the generation report and the metric's audit rows in the order of ``items``, each with its
    image path under ``"image"``. ``in_background`` defaults to whether the model is off the CPU. The
    metric may already hold rows from an earlier call (one DSR over several systems' images); only this
    call's rows are returned.
    """
    if in_background is None:
        in_background = as_generator(model).device.type != "cpu"
    earlier_rows = len(metric.audit_rows())
    info = process_info()
    waiting: dict[str, list[int]] = defaultdict(list)  # image key -> this rank's items still to be judged
    for index, item in enumerate(items):
        key = item.key(fingerprint)
        if owns(key, info):
            waiting[key].append(index)
    submitted: list[int] = []

    with JudgingWorker([metric], in_background=in_background) as worker:

        def submit(indices: list[int], images: list[Image.Image]) -> None:
            worker.submit([items[i] for i in indices], images)
            submitted.extend(indices)

        def judge_fresh_batch(batch_items: list[WorkItem], images: list[Image.Image]) -> None:
            indices, copies = [], []
            for item, image in zip(batch_items, images, strict=True):
                for index in waiting.pop(item.key(fingerprint), []):
                    indices.append(index)
                    copies.append(image)
            submit(indices, copies)

        report = generate_cached(
            model,
            fingerprint,
            items,
            out_dir,
            store_root=store_root,
            batch_size=batch_size,
            on_batch=judge_fresh_batch,
            progress=progress,
        )
        stored = sorted(index for indices in waiting.values() for index in indices)
        for start in range(0, len(stored), STORED_IMAGES_PER_BATCH):
            chunk = stored[start : start + STORED_IMAGES_PER_BATCH]
            submit(chunk, load_images([report.paths[i] for i in chunk]))
        rows = worker.close()[earlier_rows:]

    mine = [(index, {**row, "image": str(report.paths[index])}) for index, row in zip(submitted, rows, strict=True)]
    return report, gather_indexed(mine)
