"""Prior preservation: our LPIPS presets equal lpips.LPIPS called directly (the ESD script's inputs), using a
locally made AlexNet backbone in a throw-away torch hub cache; missing backbone offline is one clear error."""

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image
from torchvision import transforms

from duobench.errors import DuobenchError
from duobench.metrics.prior_preservation import (
    BACKBONE_FILES,
    LPIPS_ALEX_64,
    LPIPS_ALEX_NATIVE,
    prior_preservation,
)
from duobench.toy.metrics import TOY_JUDGE_FEATURES

lpips = pytest.importorskip("lpips")


def random_images(count: int, seed: int, size: int = 96) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


@pytest.fixture(scope="module")
def torch_home_with_alexnet(tmp_path_factory):
    """torchvision's AlexNet with seeded random weights (fp16 to halve the file; loading casts them), saved
    where torchvision's loader looks for it."""
    torch_home = tmp_path_factory.mktemp("torch-home")
    torch.manual_seed(0)
    checkpoints = torch_home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    state = {name: tensor.half() for name, tensor in torchvision.models.alexnet().state_dict().items()}
    torch.save(state, checkpoints / BACKBONE_FILES["alex"])
    return torch_home


@pytest.fixture
def local_alexnet_backbone(monkeypatch, torch_home_with_alexnet):
    monkeypatch.setenv("TORCH_HOME", str(torch_home_with_alexnet))
    return torch_home_with_alexnet / "hub" / "checkpoints" / BACKBONE_FILES["alex"]


def esd_lpips_input(image: Image.Image, size: int | None) -> torch.Tensor:
    """ESD's eval-scripts/lpips_eval.py image_loader: Resize(64), ToTensor, then (x - 0.5) * 2."""
    steps = ([transforms.Resize(size)] if size else []) + [transforms.ToTensor()]
    return (transforms.Compose(steps)(image).unsqueeze(0) - 0.5) * 2


@pytest.mark.parametrize("preset, size", [(LPIPS_ALEX_64, 64), (LPIPS_ALEX_NATIVE, None)])
def test_lpips_presets_equal_lpips_called_directly(local_alexnet_backbone, preset, size):
    originals, unlearned = random_images(5, seed=1), random_images(5, seed=2)
    unlearned[0] = originals[0]
    metric = preset(device="cpu", batch_size=2)
    metric.update(unlearned, references=originals)
    result = metric.compute()

    reference_model = lpips.LPIPS(net="alex", verbose=False)  # the library's own loading of the same files
    distances = np.array(
        [
            reference_model(esd_lpips_input(a, size), esd_lpips_input(b, size)).item()
            for a, b in zip(originals, unlearned, strict=True)
        ]
    )
    similarities = 1 - distances
    assert distances[0] == pytest.approx(0.0, abs=1e-7) and distances[1:].min() > 0
    assert result["prior_preservation"] == pytest.approx(similarities.mean(), abs=1e-6)
    assert result["prior_preservation_std"] == pytest.approx(similarities.std(), abs=1e-6)
    assert [row["prior_preservation"] for row in metric.audit_rows()] == pytest.approx(list(similarities), abs=1e-6)
    assert metric.card.weights_sha256.split("+")[0] and str(local_alexnet_backbone) in metric.card.weights


def test_references_by_item_from_cached_paths(local_alexnet_backbone, tmp_path):
    originals, unlearned = random_images(3, seed=3), random_images(3, seed=4)
    items = [{"prompt": f"p{i}", "seed": i} for i in range(3)]
    paths = {}
    for item, image in zip(items, originals, strict=True):
        paths[item["prompt"]] = tmp_path / f"{item['prompt']}.png"
        image.save(paths[item["prompt"]])
    by_item = LPIPS_ALEX_64(device="cpu", references=lambda item: paths[item["prompt"]])
    by_item.update(unlearned, items)
    direct = prior_preservation(originals, unlearned, preset="lpips-alex-64", device="cpu")
    assert by_item.compute()["prior_preservation"] == pytest.approx(direct["prior_preservation"], abs=1e-7)
    assert by_item.audit_rows()[2]["seed"] == 2


def test_missing_backbone_offline_names_the_file_and_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    with pytest.raises(DuobenchError, match=BACKBONE_FILES["alex"]) as error:
        LPIPS_ALEX_64(device="cpu")
    assert str(tmp_path / "hub" / "checkpoints") in str(error.value)


def test_toy_preset_is_one_minus_the_toy_distance(monkeypatch):
    calls = []

    def fake_toy_distance(images_a, images_b):
        calls.append(len(images_a))
        return torch.tensor([0.1 * i for i in range(len(images_a))])

    monkeypatch.setattr("duobench.toy.metrics.toy_perceptual_distance", fake_toy_distance)
    metric = TOY_JUDGE_FEATURES()
    metric.update(random_images(3, seed=5, size=32), references=random_images(3, seed=6, size=32))
    assert metric.compute()["prior_preservation"] == pytest.approx(1 - 0.1)
    assert calls == [3]
    assert "stand-in" in metric.card.description.lower() and "lpips" in metric.card.description.lower()
