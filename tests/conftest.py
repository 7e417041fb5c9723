"""Test-wide setup: offline, a throw-away DUOBENCH_HOME, small thread count, shared tiny pipeline."""

import os
import tempfile

# Set before anything imports huggingface_hub: tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ["DUOBENCH_HOME"] = tempfile.mkdtemp(prefix="duobench-test-home-")

import pytest  # noqa: E402
import torch  # noqa: E402

# Tiny models: a second thread only adds synchronisation, and on a shared 2-core machine it makes every small
# op wait for whichever core is busy (tiny-UNet forwards went from 0.02 s to 2 s).
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_pipe():
    """A tiny random SD1-architecture pipeline (deterministic weights), shared by read-only tests."""
    from duobench.models import load_pipeline

    return load_pipeline("tiny-random", device="cpu")


@pytest.fixture(scope="session")
def concept():
    """A minimal concept for method tests on tiny pipelines: erase "a red star", preserve "a blue circle"."""
    from duobench.concepts import Concept, PromptSetSpec

    return Concept(
        name="star",
        description="test concept",
        erase_prompt="a red star",
        judge="none",
        prompt_sets={},
        benign_prompts=PromptSetSpec(source="inline"),
        preserve_prompts=("a blue circle",),
    )
