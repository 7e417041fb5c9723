import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from duobench.engine import generate, generate_cached
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.items import WorkItem

MAX_MEAN_ABS_DIFF = 1 / 255


def item(index: int, **overrides) -> WorkItem:
    values = dict(
        prompt=f"a photo of thing {index}",
        seed=1000 + index,
        steps=4,
        height=32,
        width=32,
        scheduler="ddim",
        guidance=5.0,
    )
    values.update(overrides)
    return WorkItem(**values)


def pixels(image) -> np.ndarray:
    return np.asarray(image, dtype=np.float64) / 255.0


def images_of(pipe, items, batch_size):
    by_key = {}
    for batch_items, images in generate(pipe, items, batch_size):
        for batch_item, image in zip(batch_items, images, strict=True):
            by_key[batch_item.key("m")] = image
    return [by_key[i.key("m")] for i in items]


def test_image_does_not_depend_on_batch_size_or_order(tiny_pipe):
    items = [item(i) for i in range(8)]
    alone = [images_of(tiny_pipe, [one], 1)[0] for one in items]
    batched = images_of(tiny_pipe, items, 8)
    shuffled = images_of(tiny_pipe, items[::-1], 3)[::-1]
    for a, b, c in zip(alone, batched, shuffled, strict=True):
        assert np.abs(pixels(a) - pixels(b)).mean() <= MAX_MEAN_ABS_DIFF
        assert np.abs(pixels(a) - pixels(c)).mean() <= MAX_MEAN_ABS_DIFF
    # Different seeds give different images: the test would catch a shared generator.
    assert np.abs(pixels(alone[0]) - pixels(alone[1])).mean() > 0.01


def test_every_scheduler_runs_and_they_differ(tiny_pipe):
    schedulers = ["pndm", "ddim", "lms", "euler", "dpm++"]
    images = images_of(tiny_pipe, [item(0, scheduler=s) for s in schedulers], 8)
    assert len({pixels(image).tobytes() for image in images}) == len(schedulers)


def test_token_ids_and_embeddings_reproduce_the_text_prompt(tiny_pipe, tmp_path):
    text = item(3)
    ids = tuple(tokenize(tiny_pipe, [text.prompt])[0].tolist())
    embedding = encode_token_ids(tiny_pipe, torch.tensor([ids]))[0]
    save_file({"prompt_embeds": embedding.contiguous()}, str(tmp_path / "e.safetensors"))
    by_ids = item(3, prompt="ignored", token_ids=ids)
    by_embedding = item(3, prompt="ignored", embedding=str(tmp_path / "e.safetensors"))
    a, b, c = images_of(tiny_pipe, [text, by_ids, by_embedding], 3)
    assert np.abs(pixels(a) - pixels(b)).max() == 0
    assert np.abs(pixels(a) - pixels(c)).mean() <= MAX_MEAN_ABS_DIFF


def test_wrong_number_of_token_ids_fails_clearly(tiny_pipe):
    with pytest.raises(DuobenchError, match="exactly 77"):
        images_of(tiny_pipe, [item(0, token_ids=(49406, 320, 49407))], 1)


def test_cached_generation_skips_finished_items(tiny_pipe, tmp_path):
    items = [item(i) for i in range(5)]
    first = generate_cached(tiny_pipe, "fp", items[:3], tmp_path / "run", store_root=tmp_path / "store")
    second = generate_cached(tiny_pipe, "fp", items, tmp_path / "run", store_root=tmp_path / "store")
    assert (first.generated, first.reused) == (3, 0)
    assert (second.generated, second.reused) == (2, 3)
    manifest = (tmp_path / "run" / "manifest.jsonl").read_text().splitlines()
    assert len(manifest) == 5
    other_model = generate_cached(tiny_pipe, "other-fp", items[:1], tmp_path / "run2", store_root=tmp_path / "store")
    assert other_model.generated == 1  # the model fingerprint is part of the key


def test_auto_batch_size_halves_on_out_of_memory(tiny_pipe, monkeypatch):
    from duobench.generator import Generator

    calls = []
    real = Generator.sample

    def flaky(self, items):
        calls.append(len(items))
        if len(items) > 4:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real(self, items)

    monkeypatch.setattr(Generator, "sample", flaky)
    produced = sum(len(images) for _, images in generate(tiny_pipe, [item(i) for i in range(10)], "auto"))
    assert produced == 10
    assert calls[:3] == [10, 8, 4]


def test_a_concepts_generation_block_overrides_the_model_defaults(tiny_pipe):
    from dataclasses import replace

    from duobench.concepts import load_concept
    from duobench.models import default_sampler_settings

    star = load_concept("star")
    assert default_sampler_settings(tiny_pipe).scheduler == "pndm"
    settings = default_sampler_settings(tiny_pipe, star)
    assert (settings.steps, settings.scheduler, settings.height, settings.guidance) == (20, "ddim", 32, 7.5)
    with pytest.raises(DuobenchError, match="'star' has bad generation settings"):
        default_sampler_settings(tiny_pipe, replace(star, generation={"stepz": 3}))
