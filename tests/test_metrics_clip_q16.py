"""CLIP score and Q16 through their real code paths on random open_clip models, against direct computations;
offline without weights each fails with one clear DuobenchError."""

import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.clip_score import CLIP_VIT_B32_COS, CLIP_VIT_L14_X100
from duobench.metrics.q16 import Q16, Q16_PROMPTS_SHA256, load_q16_prompts

open_clip = pytest.importorskip("open_clip")


@pytest.fixture(scope="module")
def random_vit_b32():
    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32", pretrained=None)
    return model.eval(), preprocess, open_clip.get_tokenizer("ViT-B-32")


@pytest.fixture(scope="module")
def tiny_clip():
    torch.manual_seed(1)
    model = open_clip.CLIP(
        embed_dim=16,
        vision_cfg=open_clip.CLIPVisionCfg(layers=1, width=32, head_width=16, patch_size=8, image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=77, vocab_size=49408, width=32, heads=2, layers=1),
    )
    return model.eval(), open_clip.image_transform(32, is_train=False)


def random_images(count: int, seed: int, size: int = 40) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)) for _ in range(count)]


def direct_cosines(clip, images, prompts):
    model, preprocess, tokenizer = clip
    cosines = []
    with torch.no_grad():
        for image, prompt in zip(images, prompts, strict=True):
            image_features = model.encode_image(preprocess(image).unsqueeze(0))
            text_features = model.encode_text(tokenizer([prompt]))
            cosines.append(torch.nn.functional.cosine_similarity(image_features, text_features).item())
    return np.array(cosines)


def test_clip_score_scales_match_direct_computation(random_vit_b32):
    images = random_images(4, seed=0)
    long_prompt = "a photo of " + " and ".join(f"a red cube number {i}" for i in range(30))
    prompts = ["a cat", "a dog on a sofa", long_prompt, ""]
    cosines = direct_cosines(random_vit_b32, images, prompts)
    assert (cosines < 0).any() or (cosines > 0).any()

    x100 = CLIP_VIT_L14_X100(clip=random_vit_b32, device="cpu", batch_size=3)
    x100.update(images, items=[{"prompt": p, "seed": i} for i, p in enumerate(prompts)])
    result = x100.compute()
    assert result["clip_score"] == pytest.approx(np.mean(100 * np.maximum(cosines, 0)), abs=1e-4)
    assert result["n_truncated"] == 1 and result["n_images"] == 4
    assert [row["prompt_truncated"] for row in x100.audit_rows()] == [False, False, True, False]

    cosine = CLIP_VIT_B32_COS(clip=random_vit_b32, device="cpu")
    cosine.update(images, prompts=prompts)
    assert cosine.compute()["clip_score"] == pytest.approx(cosines.mean(), abs=1e-6)
    assert [row["clip_score"] for row in cosine.audit_rows()] == pytest.approx(list(cosines), abs=1e-6)


def test_clip_score_offline_without_weights_is_one_clear_error():
    with pytest.raises(DuobenchError, match="vit_base_patch32_clip_224.openai") as error:
        CLIP_VIT_B32_COS(device="cpu")
    assert "DUOBENCH_CLIP_VIT_B32" in str(error.value)


def test_q16_verdicts_are_argmax_of_scaled_cosines(tiny_clip):
    model, preprocess = tiny_clip
    prompts = np.random.default_rng(2).normal(size=(2, 16)).astype(np.float16)
    judge = Q16(clip=tiny_clip, prompt_embeddings=prompts, device="cpu", batch_size=3)
    images = random_images(7, seed=3)
    verdicts = judge.judge(images)
    with torch.no_grad():
        features = model.encode_image(torch.stack([preprocess(im) for im in images]))
    # UnlearnDiffAtk's SimClassifier: 100 * normalised image @ normalised prompts, label = argmax.
    embeddings = torch.tensor(prompts.astype(np.float32))
    logits = (
        100 * (features / features.norm(dim=-1, keepdim=True)) @ (embeddings / embeddings.norm(dim=-1, keepdim=True)).T
    )
    assert [v.unsafe for v in verdicts] == (logits.argmax(1) == 1).tolist()
    assert len({v.unsafe for v in verdicts}) == 2, "random prompts should split these images"
    probabilities = logits.softmax(1)[:, 1]
    assert [v.score for v in verdicts] == pytest.approx(probabilities.tolist(), abs=1e-5)
    assert verdicts[0].evidence["q16_logits"]["inappropriate"] == pytest.approx(logits[0, 1].item(), abs=1e-4)


def test_q16_prompts_file_loading_is_safe_and_pinned(tmp_path, monkeypatch, tiny_clip):
    good = tmp_path / "prompts.p"
    with open(good, "wb") as handle:
        pickle.dump(np.ones((2, 16), np.float16), handle)
    assert load_q16_prompts(good).shape == (2, 16)

    class Exploit:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = tmp_path / "evil.p"
    evil.write_bytes(pickle.dumps(Exploit()))
    with pytest.raises(DuobenchError, match="not a Q16 prompts.p"):
        load_q16_prompts(evil)

    monkeypatch.setenv("DUOBENCH_Q16_PROMPTS", str(good))
    with pytest.raises(DuobenchError, match=Q16_PROMPTS_SHA256):
        Q16(clip=tiny_clip, device="cpu")


def test_q16_offline_without_prompts_names_the_download(monkeypatch, tmp_path, tiny_clip):
    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path))
    monkeypatch.delenv("DUOBENCH_Q16_PROMPTS", raising=False)
    monkeypatch.setattr("duobench.metrics.weights.DOWNLOAD_TIMEOUT_SECONDS", 5)
    with pytest.raises(DuobenchError, match="ml-research/Q16") as error:
        Q16(clip=tiny_clip, device="cpu")
    assert "DUOBENCH_Q16_PROMPTS" in str(error.value)


def test_q16_unsafe_probability_is_the_judges_score_with_a_gradient(tiny_clip):
    """On images already at CLIP's input size the tensor path PNO optimises through gives the judge's score,
    and a gradient reaches the pixels."""
    prompts = np.random.default_rng(2).normal(size=(2, 16)).astype(np.float16)
    judge = Q16(clip=tiny_clip, prompt_embeddings=prompts, device="cpu")
    images = random_images(5, seed=4, size=32)
    pixels = torch.stack([torch.from_numpy(np.array(im)).permute(2, 0, 1).float() / 255 for im in images])
    pixels.requires_grad_(True)
    probabilities = judge.unsafe_probability(pixels)
    assert probabilities.tolist() == pytest.approx([v.score for v in judge.judge(images)], abs=1e-4)
    probabilities.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    assert all(p.grad is None for p in judge.model.parameters())


def test_pno_q16_preset_pins_pnos_prompt_file(tmp_path, monkeypatch, tiny_clip):
    """q16-vit-b32 reads PNO's Q16_prompts.p (2x512), from its own download or variable, pinned by sha256."""
    from duobench.metrics.q16 import PNO_Q16_PROMPTS_SHA256, Q16_VIT_B32

    assert Q16_VIT_B32.card.params["clip_model"] == "ViT-B-32"
    wrong = tmp_path / "prompts.p"
    with open(wrong, "wb") as handle:
        pickle.dump(np.ones((2, 16), np.float16), handle)
    monkeypatch.setenv("DUOBENCH_PNO_Q16_PROMPTS", str(wrong))
    with pytest.raises(DuobenchError, match=PNO_Q16_PROMPTS_SHA256):
        Q16_VIT_B32(clip=tiny_clip, device="cpu")
    monkeypatch.delenv("DUOBENCH_PNO_Q16_PROMPTS")
    monkeypatch.setenv("DUOBENCH_HOME", str(tmp_path))
    monkeypatch.setattr("duobench.metrics.weights.DOWNLOAD_TIMEOUT_SECONDS", 5)
    with pytest.raises(DuobenchError, match="JonP07/Diffusion-PNO") as error:
        Q16_VIT_B32(clip=tiny_clip, device="cpu")
    assert "DUOBENCH_PNO_Q16_PROMPTS" in str(error.value)
