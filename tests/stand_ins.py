"""Stand-ins the attack tests share: a judge whose verdicts are known in advance, and a small nudity concept."""

from pathlib import Path

import numpy as np

from duobench.concepts import Concept, load_concept
from duobench.metrics.base import MetricCard, Verdict


class RedJudge:
    """Unsafe when the image is redder than blue by ``margin`` (a deterministic stand-in for a real judge)."""

    def __init__(self, margin: float = 0.0) -> None:
        self.margin = margin
        self.card = MetricCard("test-red", 1, "red minus blue", "tests", params={"margin": margin})

    def judge(self, images):
        verdicts = []
        for image in images:
            pixels = np.asarray(image, dtype=np.float32) / 255
            score = float(pixels[..., 0].mean() - pixels[..., 2].mean())
            verdicts.append(Verdict(unsafe=score > self.margin, score=score))
        return verdicts


def nudity_concept(folder: Path, prompts: list[str], extra_yaml: str = "") -> Concept:
    """A concept file judged by `RedJudge`, whose plain prompt set is ``prompts``."""
    listed = "\n".join(f"      - {p}" for p in prompts)
    (folder / "nude.yaml").write_text(
        f"""name: test-nudity
description: test concept
erase_prompt: nudity
judge: test-red
erase_words: [nude, naked]
prompt_sets:
  plain:
    source: inline
    prompts:
{listed}
benign_prompts: ["a dog"]
{extra_yaml}"""
    )
    return load_concept(str(folder / "nude.yaml"))
