"""NudeNet throughput: duobench's batched judge vs one ``NudeDetector().detect`` call per image.

Both sides get the same in-memory 512x512 images (the reference as the BGR array ``cv2.imread`` would give
it, so neither side pays for disk reads) and must return the same detections. The two sides alternate ``--repeats``
times; we print images per second and the median speed-up over the paired runs (alternating keeps load
from other processes on a shared machine from favouring one side).

    python benchmarks/judges.py --images 128 --batch-size 8
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from PIL import Image


def benchmark_images(count: int) -> list[Image.Image]:
    """512x512 images: a portrait (NudeNet finds a face) at varying crops, alternating with noise."""
    from matplotlib import cbook

    portrait = Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)).convert("RGB")
    rng = np.random.default_rng(0)
    images = []
    for index in range(count):
        if index % 2:
            images.append(Image.fromarray(rng.integers(0, 255, (512, 512, 3), dtype=np.uint8)))
        else:
            left, top = int(rng.integers(0, 60)), int(rng.integers(0, 60))
            images.append(portrait.crop((left, top, left + 450, top + 450)).resize((512, 512)))
    return images


def interleaved(reference, batched, repeats: int) -> tuple[list[float], list[float], object, object]:
    """Alternate the two sides, so load from other processes on a shared machine hits both alike."""
    reference_seconds, batched_seconds = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        expected = reference()
        reference_seconds.append(time.perf_counter() - start)
        start = time.perf_counter()
        found = batched()
        batched_seconds.append(time.perf_counter() - start)
    return reference_seconds, batched_seconds, expected, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from nudenet import NudeDetector

    from duobench.metrics.nudenet import NudeNetDetector

    images = benchmark_images(args.images)
    bgr_arrays = [np.ascontiguousarray(np.asarray(image)[..., ::-1]) for image in images]
    reference = NudeDetector()
    batched = NudeNetDetector(batch_size=args.batch_size)
    reference.detect(bgr_arrays[0])
    batched.detect(images[:2])

    reference_seconds, batched_seconds, expected, found = interleaved(
        lambda: [reference.detect(array) for array in bgr_arrays], lambda: batched.detect(images), args.repeats
    )
    same = all(
        [(d["class"], d["box"]) for d in a] == [(d["class"], d["box"]) for d in b]
        for a, b in zip(expected, found, strict=True)
    )
    with_detections = sum(bool(d) for d in found)

    def rate(seconds: list[float]) -> str:
        best, median = args.images / min(seconds), args.images / statistics.median(seconds)
        return f"best {best:6.1f} img/s, median {median:6.1f} img/s"

    print(f"{args.images} images 512x512, {with_detections} with detections, same detections: {same}")
    print(f"NudeDetector.detect per image : {rate(reference_seconds)}")
    print(f"duobench batched (batch {args.batch_size:>3}) : {rate(batched_seconds)}")
    ratios = [r / b for r, b in zip(reference_seconds, batched_seconds, strict=True)]
    print(f"speed-up, median of paired runs: {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}x)")


if __name__ == "__main__":
    main()
