"""Streaming clean-fid FID/KID equal clean-fid's own functions on the same images and features."""

import numpy as np
import pytest
import torch
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.fid import FID_CLEAN, KID_CLEAN, canonical_order, kernel_distance

cleanfid_fid = pytest.importorskip("cleanfid.fid")
FEATURE_DIM = 12


class RandomFeatures(torch.nn.Module):
    """A fixed random network with clean-fid's custom extractor contract: [0, 255] 299x299 -> (B, 12)."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        self.conv = torch.nn.Conv2d(3, FEATURE_DIM, kernel_size=13, stride=13)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(self.conv.weight.shape, generator=generator) * 0.01)
            self.conv.bias.zero_()

    def forward(self, x):
        return torch.tanh(self.conv(x / 255.0)).mean(dim=(2, 3))


def random_images(count: int, seed: int, size: int = 48) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        base = rng.integers(0, 255, 3)
        noise = rng.integers(-60, 60, (size, size, 3))
        images.append(Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8)))
    return images


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    generated, reference = random_images(30, seed=1), random_images(26, seed=2)
    paths = {}
    for name, images in (("generated", generated), ("reference", reference)):
        folder = tmp_path_factory.mktemp(name)
        for index, image in enumerate(images):
            image.save(folder / f"{index:03d}.png")
        paths[name] = folder
    return generated, paths


def build(preset, reference, **kwargs):
    return preset(
        reference=reference,
        feature_extractor=RandomFeatures(),
        feature_dim=FEATURE_DIM,
        device="cpu",
        **kwargs,
    )


def test_streaming_fid_equals_clean_fid_compute_fid(folders):
    generated, paths = folders
    metric = build(FID_CLEAN, str(paths["reference"]), batch_size=7)
    for start in range(0, len(generated), 8):  # batches as they come off the generator
        metric.update(generated[start : start + 8])
    ours = metric.compute()
    expected = cleanfid_fid.compute_fid(
        str(paths["generated"]),
        str(paths["reference"]),
        mode="clean",
        custom_feat_extractor=RandomFeatures(),
        num_workers=0,
        batch_size=8,
        device=torch.device("cpu"),
        verbose=False,
    )
    assert ours["fid"] == pytest.approx(expected, rel=1e-5)
    assert ours["n_images"] == 30 and ours["n_reference"] == 26


def test_kid_beside_fid_equals_clean_fid_kernel_distance(folders):
    generated, paths = folders
    metric = build(FID_CLEAN, str(paths["reference"]), seed=5)
    metric.update(generated)
    kid = metric.compute()["kid"]
    extractor = metric.extractor
    reference_features = extractor([Image.open(p).convert("RGB") for p in sorted(paths["reference"].glob("*.png"))])
    generated_features = canonical_order(extractor(generated))
    np.random.seed(5)
    expected = cleanfid_fid.kernel_distance(reference_features, generated_features)
    assert kid == pytest.approx(expected, rel=1e-6)
    assert kernel_distance(reference_features, generated_features, seed=5) == pytest.approx(expected, rel=1e-6)
    reordered = build(FID_CLEAN, str(paths["reference"]), seed=5)
    reordered.update(generated[::-1])
    assert reordered.compute()["kid"] == pytest.approx(kid, rel=1e-9), "KID must not depend on arrival order"


def test_features_past_the_limit_are_dropped_but_fid_stays_exact(folders):
    generated, paths = folders
    fid_metric = build(FID_CLEAN, str(paths["reference"]))
    fid_metric.keep_features_up_to = 10
    kid_metric = build(KID_CLEAN, str(paths["reference"]))
    fid_metric.update(generated)
    kid_metric.update(generated)
    assert fid_metric.compute()["kid"] is None
    assert kid_metric.compute()["kid"] is not None
    assert fid_metric.compute()["fid"] == pytest.approx(kid_metric.compute()["fid"], rel=1e-12)


def test_reference_as_npz_or_mu_sigma_and_merged_shards(folders, tmp_path):
    generated, paths = folders
    extractor = build(FID_CLEAN, (np.zeros(FEATURE_DIM), np.eye(FEATURE_DIM))).extractor
    features = extractor([Image.open(p).convert("RGB") for p in sorted(paths["reference"].glob("*.png"))])
    mu, sigma = np.mean(features, axis=0), np.cov(features, rowvar=False)
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma)
    whole = build(FID_CLEAN, (mu, sigma))
    whole.update(generated)
    first, second = build(FID_CLEAN, str(tmp_path / "stats.npz")), build(FID_CLEAN, (mu, sigma))
    first.update(generated[:11])
    second.update(generated[11:])
    first.merge(second.state())
    generated_features = extractor(generated)
    expected = cleanfid_fid.frechet_distance(
        np.mean(generated_features, axis=0), np.cov(generated_features, rowvar=False), mu, sigma
    )
    assert whole.compute()["fid"] == pytest.approx(expected, rel=1e-6)
    assert first.compute()["fid"] == pytest.approx(expected, rel=1e-6)


def test_missing_inception_weights_offline_is_one_clear_error(monkeypatch, tmp_path):
    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path))
    monkeypatch.setattr("duobench.metrics.weights.DOWNLOAD_TIMEOUT_SECONDS", 5)
    with pytest.raises(DuobenchError, match="inception-2015-12-05.pt") as error:
        FID_CLEAN(reference=(np.zeros(2048), np.eye(2048)), device="cpu")
    assert str(tmp_path / "weights") in str(error.value)
