"""`external`: a checkpoint made elsewhere is imported against the base model and applied with the strength knob."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from duobench.errors import DuobenchError
from duobench.external import EXTERNAL, ExternalConfig
from duobench.methods import config_key, make_config, read_card, train_or_load
from duobench.models import pipeline_fingerprint, tiny_random_pipeline
from duobench.registry import METHODS


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_random_pipeline()


@pytest.fixture(scope="module")
def edited_pipe(base_pipe):
    """The base with a fine-tuning-sized edit of cross-attention, conv_in and one norm (as ESD would make)."""
    pipe = copy.deepcopy(base_pipe)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, parameter in pipe.unet.named_parameters():
            if "attn2" in name or name.startswith(("conv_in", "mid_block.resnets.0.norm1")):
                parameter.add_(0.01 * torch.randn(parameter.shape, generator=generator))
    return pipe


def images(pipe) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe(["a red star", "a blue circle"], num_inference_steps=3, generator=generator, output_type="np").images


def import_checkpoint(base_pipe, concept, root, **options):
    artifact, _, _ = train_or_load("external", base_pipe, concept, pipeline_fingerprint(base_pipe), options, root=root)
    return artifact


def applied(base_pipe, artifact, strength: float):
    pipe = copy.deepcopy(base_pipe)
    EXTERNAL.apply(pipe, artifact, strength)
    return pipe


def save_state_dict(state: dict[str, torch.Tensor], path) -> str:
    if path.suffix == ".safetensors":
        save_file({name: tensor.contiguous() for name, tensor in state.items()}, str(path))
    else:
        torch.save(state, path)
    return str(path)


@pytest.mark.parametrize(
    ("file_name", "wrap"),
    [
        ("unet.safetensors", lambda state: state),
        ("unet.pt", lambda state: state),
        ("wrapped.pt", lambda state: {"state_dict": state}),
        ("prefixed.safetensors", lambda state: {f"unet.{name}": tensor for name, tensor in state.items()}),
    ],
)
def test_unet_state_dict_round_trips_at_every_strength(base_pipe, edited_pipe, concept, tmp_path, file_name, wrap):
    path = save_state_dict(wrap(edited_pipe.unet.state_dict()), tmp_path / file_name)
    base_state = {name: tensor.clone() for name, tensor in base_pipe.unet.state_dict().items()}
    artifact = import_checkpoint(base_pipe, concept, tmp_path / "artifacts", path=path)
    assert all(torch.equal(tensor, base_state[name]) for name, tensor in base_pipe.unet.state_dict().items())

    card = read_card(artifact)
    assert card["kind"] == "state-dict" and card["source"] == path
    assert card["config"]["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()  # as sha256sum says
    assert card["components"]["unet"]["inexact_elements"] == 0
    assert set(card["components"]) == {"unet"}

    full = applied(base_pipe, artifact, 1.0)
    edited_state = edited_pipe.unet.state_dict()
    assert all(torch.equal(tensor, edited_state[name]) for name, tensor in full.unet.state_dict().items())
    if file_name == "unet.safetensors":  # one format is enough for the (slower) image comparison
        assert not np.array_equal(images(edited_pipe), images(base_pipe))
        np.testing.assert_array_equal(images(full), images(edited_pipe))

    half = applied(base_pipe, artifact, 0.5).unet.state_dict()
    for name, tensor in half.items():
        torch.testing.assert_close(tensor, (base_state[name] + edited_state[name]) / 2, rtol=1e-6, atol=1e-7)

    EXTERNAL.apply(full, artifact, 0.0)  # back to the base on the same pipe
    assert all(torch.equal(tensor, base_state[name]) for name, tensor in full.unet.state_dict().items())


def test_partial_state_dict_keeps_the_rest_of_the_base(base_pipe, edited_pipe, concept, tmp_path):
    """The UCE and ESD-x releases keep only the edited projections."""
    edited = {name: tensor for name, tensor in edited_pipe.unet.state_dict().items() if "attn2" in name}
    artifact = import_checkpoint(base_pipe, concept, tmp_path, path=save_state_dict(edited, tmp_path / "x.pt"))
    summary = read_card(artifact)["components"]["unet"]
    assert summary["changed_tensors"] == summary["checkpoint_tensors"] == len(edited) < summary["base_tensors"]
    state = applied(base_pipe, artifact, 1.0).unet.state_dict()
    base_state = base_pipe.unet.state_dict()
    assert all(torch.equal(state[name], edited[name] if name in edited else base_state[name]) for name in state)


def test_replacement_far_from_the_base_is_reproduced_to_one_rounding_and_counted(base_pipe, concept, tmp_path):
    generator = torch.Generator().manual_seed(5)
    state = {
        name: 0.05 * torch.randn(tensor.shape, generator=generator)
        for name, tensor in base_pipe.unet.state_dict().items()
        if "attn2.to_k" in name
    }
    artifact = import_checkpoint(base_pipe, concept, tmp_path, path=save_state_dict(state, tmp_path / "far.pt"))
    assert read_card(artifact)["components"]["unet"]["inexact_elements"] > 0
    rebuilt = applied(base_pipe, artifact, 1.0).unet.state_dict()
    for name, tensor in state.items():
        torch.testing.assert_close(rebuilt[name], tensor, rtol=0, atol=2e-8)


def test_pipeline_folder_imports_the_text_encoder_too(base_pipe, edited_pipe, concept, tmp_path):
    edited = copy.deepcopy(edited_pipe)
    with torch.no_grad():
        next(p for n, p in edited.text_encoder.named_parameters() if "final_layer_norm.weight" in n).mul_(1.5)
    edited.save_pretrained(tmp_path / "pipeline")
    artifact = import_checkpoint(base_pipe, concept, tmp_path / "artifacts", path=str(tmp_path / "pipeline"))
    card = read_card(artifact)
    assert card["kind"] == "pipeline-folder"
    assert set(card["components"]) == {"unet", "text_encoder"}  # the VAE is unchanged, so it has no delta
    assert card["components"]["text_encoder"]["changed_tensors"] == 1
    full = applied(base_pipe, artifact, 1.0)
    np.testing.assert_array_equal(images(full), images(edited))


def test_unet_folder(base_pipe, edited_pipe, concept, tmp_path):
    edited_pipe.unet.save_pretrained(tmp_path / "unet")
    artifact = import_checkpoint(base_pipe, concept, tmp_path / "artifacts", path=str(tmp_path / "unet"))
    assert read_card(artifact)["kind"] == "unet-folder"
    state = applied(base_pipe, artifact, 1.0).unet.state_dict()
    assert all(torch.equal(tensor, state[name]) for name, tensor in edited_pipe.unet.state_dict().items())


def lora_folder(base_pipe, folder):
    """A DUO-style LoRA (self-attention, rank 4) with random nonzero weights, saved as DUO saves it."""
    from duobench.duo.loss import LORA_TARGETS
    from duobench.lora import lora_attached, save_lora

    pipe = copy.deepcopy(base_pipe)
    with lora_attached(pipe.unet, LORA_TARGETS, rank=4, alpha=4.0, seed=1) as parameters, torch.no_grad():
        for parameter in parameters:
            parameter.normal_(std=0.1, generator=torch.Generator().manual_seed(parameter.numel()))
        save_lora(pipe.unet, folder)
    return folder


def test_lora_applies_at_the_strength_as_its_scale(base_pipe, concept, tmp_path):
    folder = lora_folder(base_pipe, tmp_path / "lora")
    base_state = {name: tensor.clone() for name, tensor in base_pipe.unet.state_dict().items()}
    artifact = import_checkpoint(base_pipe, concept, tmp_path / "artifacts", path=str(folder))
    assert base_pipe.unet.state_dict().keys() == base_state.keys(), "the import left LoRA layers in the base"
    assert read_card(artifact)["kind"] == "lora"

    reference = copy.deepcopy(base_pipe)
    reference.load_lora_weights(folder, weight_name="pytorch_lora_weights.safetensors", adapter_name="reference")
    for strength in (1.0, 0.5):
        reference.set_adapters(["reference"], adapter_weights=[strength])
        np.testing.assert_array_equal(images(applied(base_pipe, artifact, strength)), images(reference))
    np.testing.assert_array_equal(images(applied(base_pipe, artifact, 0.0)), images(base_pipe))


def test_lora_for_another_architecture_is_refused(base_pipe, concept, tmp_path):
    from safetensors.torch import load_file

    folder = lora_folder(base_pipe, tmp_path / "lora")
    state = load_file(str(folder / "pytorch_lora_weights.safetensors"))
    name = next(name for name in state if name.endswith("down.weight"))
    state[name] = torch.zeros(state[name].shape[0], state[name].shape[1] + 1)
    save_file(state, str(tmp_path / "bad_lora.safetensors"))
    with pytest.raises(DuobenchError, match="does not fit the base model"):
        import_checkpoint(base_pipe, concept, tmp_path, path=str(tmp_path / "bad_lora.safetensors"))
    assert not any("lora" in name for name in base_pipe.unet.state_dict())


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda state: state.update({"conv_in.weight": torch.zeros(32, 5, 3, 3)}), r"conv_in\.weight.*\(32, 5, 3, 3\)"),
        (lambda state: state.update({"down_blocks.0.no_such_layer.weight": torch.zeros(3)}), "no_such_layer"),
        (lambda state: state.update({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(3)}), "CompVis"),
    ],
    ids=["wrong-shape", "unknown-key", "compvis-naming"],
)
def test_mismatched_checkpoint_is_one_error_naming_the_mismatch(base_pipe, concept, tmp_path, edit, expected):
    state = dict(base_pipe.unet.state_dict())
    edit(state)
    path = save_state_dict(state, tmp_path / "bad.safetensors")
    with pytest.raises(DuobenchError, match=expected):
        import_checkpoint(base_pipe, concept, tmp_path, path=path)


def test_checkpoint_of_another_architecture_is_refused(concept, tmp_path):
    """A different model (here: another tiny UNet with wider blocks) fails on its first mismatched shapes."""
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(16, 32),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    path = save_state_dict(other.state_dict(), tmp_path / "other.safetensors")
    with pytest.raises(DuobenchError, match="another shape.*pass that model as --model"):
        import_checkpoint(tiny_random_pipeline(), concept, tmp_path, path=path)


def test_unreadable_checkpoints_are_clear_errors(base_pipe, concept, tmp_path):
    with pytest.raises(DuobenchError, match="does not exist"):
        ExternalConfig(path=str(tmp_path / "missing.pt"))
    with pytest.raises(DuobenchError, match="could not be fetched.*huggingface-cli download"):
        ExternalConfig(path="duobench-test/not-in-the-cache")  # conftest runs with HF_HUB_OFFLINE=1
    with pytest.raises(DuobenchError, match="needs the checkpoint"):
        ExternalConfig()
    with pytest.raises(DuobenchError, match="kind must be one of"):
        ExternalConfig(path=str(tmp_path), kind="ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "not_tensors.pt")
    with pytest.raises(DuobenchError, match="not a state dict"):
        import_checkpoint(base_pipe, concept, tmp_path, path=str(tmp_path / "not_tensors.pt"))
    (tmp_path / "pickled.pt").write_bytes(b"not a torch file")
    with pytest.raises(DuobenchError, match="Cannot read .* as a checkpoint"):
        import_checkpoint(base_pipe, concept, tmp_path, path=str(tmp_path / "pickled.pt"))


def test_artifact_key_follows_the_checkpoint_content(base_pipe, concept, tmp_path):
    path = tmp_path / "unet.safetensors"

    def key() -> str:
        return config_key("external", make_config(EXTERNAL, {"path": str(path)}), concept, "base")

    state = {"conv_in.weight": base_pipe.unet.conv_in.weight.detach() + 0.01}
    save_file(state, str(path))
    first = key()
    assert key() == first
    save_file({"conv_in.weight": state["conv_in.weight"] + 0.01}, str(path))  # same name, size and keys
    assert key() != first
    digest = make_config(EXTERNAL, {"path": str(path)}).sha256
    assert make_config(EXTERNAL, {"path": str(path), "sha256": digest}).sha256 == digest
    with pytest.raises(DuobenchError, match="another file"):
        make_config(EXTERNAL, {"path": str(path), "sha256": "0" * 64})


def test_registered_and_listed():
    assert METHODS.get("external") is EXTERNAL
    assert "external" in METHODS.names() and "checkpoint" in METHODS.describe("external")


def test_run_with_an_exported_checkpoint_reproduces_the_method_that_made_it(tmp_path):
    """End to end in the toy world: UCE's edit, exported as a released UNet file, scores exactly as UCE."""
    from dataclasses import replace

    from duobench.concepts import load_concept
    from duobench.models import load_pipeline
    from duobench.run_config import RunConfig, method_options
    from duobench.runner import run
    from duobench.stages import StageCache

    toy = load_pipeline("toy", device="cpu")
    config = RunConfig(
        model="toy",
        concept="star",
        method="uce",
        limit=1,
        benign_limit=4,
        batch_size="16",
        device="cpu",
        out=str(tmp_path / "uce"),
    )
    stages = StageCache(tmp_path / "stages")
    made_here = run(config, stages, base=toy)

    star = load_concept("star")
    artifact, _, _ = train_or_load("uce", toy, star, pipeline_fingerprint(toy), method_options(star, "uce", {}))
    released = load_pipeline("toy", device="cpu")
    METHODS.get("uce").apply(released, artifact, 1.0)
    path = save_state_dict(released.unet.state_dict(), tmp_path / "uce-star-UNET.safetensors")

    imported = run(
        replace(config, method="external", method_options={"path": path}, out=str(tmp_path / "external")),
        stages,
        base=toy,
    )
    assert imported["method"] == "external" and imported["images_generated"] > 0
    for key in ("dsr", "dsr_ci", "prior_preservation", "clip_score", "fid"):
        assert imported[key] == made_here[key], key
