"""Loaders turn "cannot get it from here" (offline, a wrong or gated id, a network failure) into one clear
`DuobenchError`, and let every other failure (a library API break, a corrupt cache) surface as itself."""

from __future__ import annotations

import pytest

from duobench.errors import DuobenchError
from duobench.models import load_pipeline, unreachable_errors


def hub_not_cached(*args, **kwargs):
    from huggingface_hub.errors import LocalEntryNotFoundError

    raise LocalEntryNotFoundError("Cannot find an appropriate cached snapshot folder (offline)")


def library_break(*args, **kwargs):
    raise TypeError("from_pretrained() got an unexpected keyword argument 'safety_checker'")


def corrupt_cache(*args, **kwargs):
    raise RuntimeError("Model has been downloaded but the SHA256 checksum does not not match")


def test_unreachable_errors_cover_the_hub_and_the_network_only():
    import huggingface_hub.errors as hub_errors

    errors = unreachable_errors()
    for error in (
        hub_errors.LocalEntryNotFoundError("x"),
        hub_errors.HFValidationError("x"),
        ConnectionError("x"),
        FileNotFoundError("x"),
    ):
        assert isinstance(error, errors)
    for error in (TypeError("x"), AttributeError("x"), RuntimeError("x"), KeyError("x")):
        assert not isinstance(error, errors)


def test_model_hub_id(monkeypatch):
    with pytest.raises(DuobenchError, match="Cannot load model 'duobench-test/not-cached'.*reachable"):
        load_pipeline("duobench-test/not-cached", device="cpu")  # conftest runs with HF_HUB_OFFLINE=1
    from diffusers import StableDiffusionPipeline

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", library_break)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_pipeline("duobench-test/not-cached", device="cpu")


def test_model_single_file(monkeypatch, tmp_path):
    from diffusers import StableDiffusionPipeline

    checkpoint = tmp_path / "model.safetensors"
    checkpoint.write_bytes(b"not a safetensors file")
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", hub_not_cached)
    with pytest.raises(DuobenchError, match="Could not load the single-file checkpoint"):
        load_pipeline(str(checkpoint), device="cpu")
    monkeypatch.setattr(StableDiffusionPipeline, "from_single_file", library_break)
    with pytest.raises(TypeError, match="unexpected keyword"):
        load_pipeline(str(checkpoint), device="cpu")


def test_hf_prompt_dataset(monkeypatch):
    import datasets

    from duobench.concepts import PromptSetSpec
    from duobench.prompts import load_prompt_set

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'AIML-TUDA/i2p' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DuobenchError, match="needs internet once"):
        load_prompt_set(PromptSetSpec(source="hf:AIML-TUDA/i2p"))
    monkeypatch.setattr(datasets, "load_dataset", corrupt_cache)
    with pytest.raises(RuntimeError, match="checksum"):
        load_prompt_set(PromptSetSpec(source="hf:AIML-TUDA/i2p"))


def test_external_checkpoint_from_the_hub(monkeypatch):
    import huggingface_hub

    from duobench.external import hub_snapshot

    monkeypatch.setattr(huggingface_hub, "snapshot_download", hub_not_cached)
    with pytest.raises(DuobenchError, match="could not be fetched.*huggingface-cli download"):
        hub_snapshot("owner/unlearned-model")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", library_break)
    with pytest.raises(TypeError, match="unexpected keyword"):
        hub_snapshot("owner/unlearned-model")


def test_external_folder_component(monkeypatch, tiny_pipe, tmp_path):
    from duobench.external import folder_weights

    unet_class = type(tiny_pipe.unet)
    monkeypatch.setattr(unet_class, "from_pretrained", hub_not_cached)
    with pytest.raises(DuobenchError, match="Cannot load the unet of"):
        folder_weights(tiny_pipe, tmp_path, "unet-folder")
    monkeypatch.setattr(unet_class, "from_pretrained", library_break)
    with pytest.raises(TypeError, match="unexpected keyword"):
        folder_weights(tiny_pipe, tmp_path, "unet-folder")


def test_open_clip_weights(monkeypatch):
    import open_clip

    from duobench.metrics.weights import load_open_clip

    monkeypatch.delenv("DUOBENCH_TEST_CLIP", raising=False)
    monkeypatch.setattr(open_clip, "download_pretrained", hub_not_cached)
    with pytest.raises(DuobenchError, match="Cannot load the open_clip ViT-B-32 'openai' weights.*DUOBENCH_TEST_CLIP"):
        load_open_clip("ViT-B-32", "openai", "DUOBENCH_TEST_CLIP", None, "cpu")
    monkeypatch.setattr(open_clip, "download_pretrained", corrupt_cache)
    with pytest.raises(RuntimeError, match="checksum"):
        load_open_clip("ViT-B-32", "openai", "DUOBENCH_TEST_CLIP", None, "cpu")
