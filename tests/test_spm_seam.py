"""SPM as a generator-wrapping edit: γ per UNet row from the conditioning, a UNet-call fallback for direct
callers, and nothing left behind in the UNet's weights or after ``remove()``."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from duobench.baselines import spm
from duobench.baselines.rollout import predict_noise
from duobench.edits import build_system, method_edit
from duobench.generator import Generator, encode_token_ids, tokenize
from duobench.items import WorkItem
from duobench.methods import write_card
from duobench.models import pipeline_fingerprint, tiny_random_pipeline
from duobench.registry import METHODS

ERASED = "a red star"


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_random_pipeline()


def write_artifact(pipe, concept, out_dir: Path, fixed_multiplier: float | None) -> Path:
    """An SPM artifact with random adapters, large enough to change a tiny model's images visibly."""
    out_dir.mkdir(parents=True, exist_ok=True)
    network = spm.SPMNetwork(pipe.unet, seed=3)
    network.remove()
    generator = torch.Generator().manual_seed(4)
    for adapter in network.adapters.values():
        adapter.lora_up.weight.data.normal_(0.0, 0.5, generator=generator)
    weights = {name: value.detach().contiguous() for name, value in network.adapters.state_dict().items()}
    save_file(weights, str(out_dir / spm.ADAPTER_FILE), metadata={"prompts": ERASED, "rank": "1", "alpha": "1.0"})
    write_card(out_dir, "spm", spm.SPMConfig(fixed_multiplier=fixed_multiplier), concept)
    return out_dir


@pytest.fixture(scope="module")
def artifact(base_pipe, concept, tmp_path_factory) -> Path:
    return write_artifact(base_pipe, concept, tmp_path_factory.mktemp("spm") / "transport", None)


@pytest.fixture(scope="module")
def embedding_file(base_pipe, tmp_path_factory) -> str:
    """A replayed embedding (an inverted concept, say): no token ids are known for it."""
    embedding = encode_token_ids(base_pipe, tokenize(base_pipe, ["a red star on a table"]))[0]
    noise = torch.randn(embedding.shape, generator=torch.Generator().manual_seed(5))
    path = tmp_path_factory.mktemp("embedding") / "embedding.safetensors"
    save_file({"prompt_embeds": (embedding + 0.05 * noise).contiguous()}, str(path))
    return str(path)


def spm_system(pipe, artifact: Path, strength: float):
    fingerprint = pipeline_fingerprint(pipe)
    return build_system(pipe, fingerprint, [method_edit("spm", artifact, strength)])


def work_items(pipe, embedding_file: str, guidance: float, negative: str = "") -> list[WorkItem]:
    base = dict(steps=4, height=32, width=32, scheduler="ddim", guidance=guidance, negative_prompt=negative)
    ids = tuple(tokenize(pipe, [ERASED])[0].tolist())
    return [
        WorkItem(prompt=ERASED, seed=0, **base),
        WorkItem(prompt="a blue circle", seed=1, **base),
        WorkItem(prompt="", token_ids=ids, seed=2, **base),
        WorkItem(prompt="", embedding=embedding_file, seed=3, **base),
    ]


def images(generator: Generator, items: list[WorkItem]) -> np.ndarray:
    return np.stack([np.asarray(image) for image in generator.sample(items)])


def cfg_rows(conditioning) -> torch.Tensor:
    """The UNet rows under classifier-free guidance, in the generator's order: negative rows, then prompt rows."""
    return torch.cat([conditioning.negative_embeds, conditioning.prompt_embeds])


def test_spm_is_a_hook_edit_that_leaves_the_unet_weights_alone(base_pipe, artifact):
    pipe = copy.deepcopy(base_pipe)
    state = pipe.unet.state_dict()
    system = spm_system(pipe, artifact, 1.0)
    assert METHODS.get("spm").touches == ("unet",) and system.edits[0].touches == ("unet",)
    assert [hook.name for hook in system.generator.hooks] == ["spm"]
    after = pipe.unet.state_dict()
    assert set(after) == set(state) and all(torch.equal(after[k], state[k]) for k in state)
    assert pipeline_fingerprint(pipe) == pipeline_fingerprint(base_pipe)


def test_seam_and_unet_call_fallback_give_embedding_rows_the_same_gamma(base_pipe, artifact, embedding_file):
    pipe = copy.deepcopy(base_pipe)
    system = spm_system(pipe, artifact, 1.0)
    hook = system.generator.hooks[0]
    items = [item for item in work_items(pipe, embedding_file, 1.0) if item.embedding is not None] * 2
    conditioning = system.generator.condition(items)
    rows = conditioning.prompt_embeds  # no classifier-free guidance: the prompt rows alone
    assert torch.equal(hook.row_gammas(rows, conditioning), hook.transport.gammas(rows))
    latents = torch.randn(len(items), 4, 8, 8, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        direct = predict_noise(pipe.unet, latents, 500, rows)  # a white-box call: the pre-hook's γ
        with hook.unet_call(rows, conditioning):
            seam = predict_noise(pipe.unet, latents, 500, rows)
        base = predict_noise(base_pipe.unet, latents, 500, rows)
    assert torch.equal(seam, direct) and not torch.allclose(direct, base)
    # Whole images: the system's generator (seam) and a plain generator on the edited pipe (fallback).
    assert np.array_equal(images(system.generator, items), images(Generator(pipe), items))
    # Under classifier-free guidance the replayed embeddings' rows still get the cosine term alone.
    cfg = cfg_rows(conditioning)
    count = len(items)
    assert torch.equal(hook.row_gammas(cfg, conditioning)[count:], hook.transport.gammas(cfg)[count:])


def test_the_seam_adds_the_token_term_where_the_ids_are_known(base_pipe, artifact, embedding_file):
    pipe = copy.deepcopy(base_pipe)
    system = spm_system(pipe, artifact, 1.0)
    hook = system.generator.hooks[0]
    items = work_items(pipe, embedding_file, 7.5, negative=ERASED)
    conditioning = system.generator.condition(items)
    extra = system.generator.encode_texts([ERASED])
    rows = torch.cat([cfg_rows(conditioning), extra])
    gammas, cosine = hook.row_gammas(rows, conditioning), hook.transport.gammas(rows)
    assert cosine.max() < 1.0
    negative, prompt, extra_row = gammas[:4], gammas[4:8], gammas[8:]
    assert torch.equal(negative, torch.ones(4))  # the negative prompt is the erased prompt
    assert prompt[0] == prompt[2] == 1.0  # text and token ids of the erased prompt
    assert torch.equal(prompt[[1, 3]], cosine[[5, 7]])  # no erased token; a replayed embedding: cosine only
    assert torch.equal(extra_row, cosine[8:])  # another hook's extra row: its ids are not known


def test_strength_zero_and_remove_give_the_base_models_images_bit_for_bit(base_pipe, artifact, embedding_file):
    items = work_items(base_pipe, embedding_file, 7.5, negative="a blue circle")
    base = images(Generator(base_pipe), items)
    pipe = copy.deepcopy(base_pipe)
    assert np.array_equal(images(spm_system(pipe, artifact, 0.0).generator, items), base)
    system = spm_system(copy.deepcopy(base_pipe), artifact, 1.0)
    assert np.abs(images(system.generator, items).astype(int) - base).max() > 1
    for edit, hook in zip(system.edits, system.generator.hooks, strict=True):
        edit.remove(system.pipe, hook)
    assert np.array_equal(images(Generator(system.pipe), items), base)


def test_a_fixed_gamma_scales_the_change_by_its_square(base_pipe, concept, tmp_path):
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    embeddings = encode_token_ids(base_pipe, tokenize(base_pipe, [ERASED, "a blue circle"]))
    outputs = {}
    for fixed, strength in ((1.0, 2.0), (2.0, 0.5)):  # m · γ² = 2 both times
        pipe = copy.deepcopy(base_pipe)
        hook = spm.SPM.apply(pipe, write_artifact(base_pipe, concept, tmp_path / str(fixed), fixed), strength)
        assert hook.transport is None
        with torch.no_grad():
            outputs[fixed] = predict_noise(pipe.unet, latents, 500, embeddings)
        hook.remove()
    with torch.no_grad():
        base = predict_noise(base_pipe.unet, latents, 500, embeddings)
    assert torch.equal(outputs[1.0], outputs[2.0]) and not torch.allclose(outputs[2.0], base)
