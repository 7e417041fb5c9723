"""SAFREE: each step's math on hand-derived cases, the self-validating filter's step count as the UNet sees it,
strength 0 is the base model bit for bit, and which prompt forms it defends."""

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from duobench.baselines.safree import (
    NUDITY_PHRASES,
    SAFREE,
    SAFREEConfig,
    fourier_low_filter,
    orthogonal_projection,
    projected_step_count,
    projection_matrix,
    self_validation_beta,
    trigger_tokens,
)
from duobench.errors import DuobenchError
from duobench.generator import Generator, encode_token_ids, tokenize
from duobench.items import WorkItem
from duobench.methods import make_config, read_card


def as_arrays(images):
    return [np.asarray(image).astype(int) for image in images]


def safree_hook(pipe, concept, tmp_path, strength=1.0, **options):
    """Write the card and apply it, as the runner does."""
    out = Path(tmp_path) / f"safree-{len(list(Path(tmp_path).iterdir()))}"
    out.mkdir(parents=True)
    SAFREE.train(make_config(SAFREE, options), pipe, concept, out)
    return SAFREE.apply(pipe, out, strength)


@pytest.fixture(scope="module")
def toy():
    from duobench.concepts import load_concept
    from duobench.models import load_pipeline

    return load_pipeline("toy", device="cpu"), load_concept("star")


# --- the math, by hand --------------------------------------------------------------------------------------


def test_projection_matrix_and_the_projected_embedding_by_hand():
    """In R^4, with non-orthogonal columns: C spans e1, e2 and M spans e1, e2, e3, so P_c = diag(1,1,0,0),
    P_m = diag(1,1,1,0), and (I − P_c) P_m h for h = (1, 2, 3, 4) is (0, 0, 3, 0): orthogonal to the concept
    subspace and inside the masked span."""
    concept = torch.tensor([[1.0, 1.0], [0.0, 1.0], [0.0, 0.0], [0.0, 0.0]])
    masked = torch.tensor([[1.0, 1.0, 0.0], [0.0, 1.0, 1.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    p_c, p_m = projection_matrix(concept), projection_matrix(masked)
    assert torch.allclose(p_c, torch.diag(torch.tensor([1.0, 1, 0, 0])), atol=1e-6)
    assert torch.allclose(p_m, torch.diag(torch.tensor([1.0, 1, 1, 0])), atol=1e-6)
    h = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    assert torch.allclose(orthogonal_projection(h, p_m, p_c), torch.tensor([[0.0, 0.0, 3.0, 0.0]]), atol=1e-6)


def test_projected_embeddings_are_orthogonal_to_a_random_concept_subspace():
    generator = torch.Generator().manual_seed(0)
    concept = torch.randn(16, 3, generator=generator, dtype=torch.float64)
    masked = torch.randn(16, 5, generator=generator, dtype=torch.float64)
    h = torch.randn(7, 16, generator=generator, dtype=torch.float64)
    p_c, p_m = projection_matrix(concept), projection_matrix(masked)
    assert torch.allclose(p_c @ p_c, p_c) and torch.allclose(p_c, p_c.T)  # an orthogonal projector
    projected = orthogonal_projection(h, p_m, p_c)
    assert torch.allclose(concept.T @ projected.T, torch.zeros(3, 7, dtype=torch.float64), atol=1e-10)
    # the formula: (I − P_c) P_m h, per row
    expected = torch.stack([(torch.eye(16, dtype=torch.float64) - p_c) @ p_m @ row for row in h])
    assert torch.allclose(projected, expected)


def test_trigger_tokens_by_hand():
    """P_c projects onto e1, so d_i is |second coordinate|: d = (1, 1, 4). Means of the others: (2.5, 2.5, 1);
    kept iff d_i < 1.01 · mean: only token 3 is a trigger. A one-token prompt (mean over none = NaN) is one."""
    p_c = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    pooled = torch.tensor([[5.0, 1.0], [-3.0, -1.0], [0.0, 4.0]])
    assert trigger_tokens(pooled, p_c, 0.01).tolist() == [False, False, True]
    # α sets the margin: d = (1, 1, 1.02) has means (1.01, 1.01, 1); 1.02 < 1.01 · 1 is false, < 1.03 true
    near = torch.tensor([[0.0, 1.0], [0.0, 1.0], [0.0, 1.02]])
    assert trigger_tokens(near, p_c, 0.01).tolist() == [False, False, True]
    assert trigger_tokens(near, p_c, 0.03).tolist() == [False, False, False]
    assert trigger_tokens(torch.tensor([[0.0, 1.0]]), p_c, 0.01).tolist() == [True]


def test_self_validating_filter_step_count_by_hand():
    """t' = round(up_t · σ(2k(10β − t_0))): at β = t_0/10 the sigmoid is 1/2, so up_t = 10 gives 5 (and 3 → 2,
    Python's round half to even, as the official code rounds); β = 0 and β = 1 saturate to 0 and up_t."""
    assert projected_step_count(0.5333, 10) == 5
    assert projected_step_count(0.5333, 3) == 2
    assert projected_step_count(0.0, 10) == 0
    assert projected_step_count(1.0, 10) == 10
    beta = 0.6
    assert projected_step_count(beta, 10) == round(10 / (1 + math.exp(-2 * 2.5 * (10 * beta - 5.333))))
    assert projected_step_count(-50.0, 10) == 0  # no overflow far out
    h = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    projected = torch.tensor([[1.0, 0.0], [1.0, 0.0], [-1.0, -1.0]])
    # cosines over the 2 active tokens: 1 and 0 → β = 1/2 (the third, inactive row is ignored)
    assert self_validation_beta(h, projected, 2) == pytest.approx(0.5)


def test_fourier_low_filter_by_hand():
    """A 2×2 map: its whole shifted spectrum is the central 2×2 block. Where the original's real part is larger
    the prompt's coefficient stays; where the branches agree every coefficient becomes s, whose inverse
    transform is s at the origin and 0 elsewhere."""
    prompt = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]]])
    larger = prompt.clone()
    larger[..., 0, 0] += 10.0  # a spatial impulse adds 10 to every Fourier coefficient
    assert torch.allclose(fourier_low_filter(prompt, larger, 0.9), prompt, atol=1e-6)
    agree = fourier_low_filter(prompt, prompt.clone(), 0.9)
    assert torch.allclose(agree, torch.tensor([[[[0.9, 0.0], [0.0, 0.0]]]]), atol=1e-6)


# --- the config and the card --------------------------------------------------------------------------------


def test_config_defaults_options_and_card(concept, tmp_path):
    from duobench.concepts import load_concept

    config = SAFREEConfig()
    assert (config.alpha, config.up_t, config.self_validation) == (0.01, 10, True)
    assert (config.negative_prompt, config.latent_reattention) == ("none", "fourier-low")  # the paper's method
    nudity = load_concept("nudity")
    assert config.phrases(nudity) == list(NUDITY_PHRASES) and len(NUDITY_PHRASES) == 17
    assert SAFREEConfig(negative_prompt="official").negative_text(nudity) == ", ".join(NUDITY_PHRASES)
    assert config.negative_text(nudity) == ""
    assert config.phrases(concept) == ["a red star"]  # no erase_words or synonyms: the erase prompt
    star = load_concept("star")
    assert config.phrases(star) == ["star", "pentagram", "pentacle", "five-pointed star", "five pointed star"]
    # a phrase given twice would make CᵀC exactly singular, which the official pseudo-inverse cut-off mishandles
    assert SAFREEConfig(subspace_phrases="star, pentagram,star").phrases(concept) == ["star", "pentagram"]
    # `off` from YAML or the command line arrives as a boolean
    assert make_config(SAFREE, {"latent_reattention": False}).latent_reattention == "off"
    with pytest.raises(DuobenchError, match="latent_reattention"):
        make_config(SAFREE, {"latent_reattention": "high"})
    SAFREE.train(make_config(SAFREE, {"negative_prompt": "official"}), None, nudity, tmp_path)
    card = read_card(tmp_path)
    assert card["method"] == "safree" and card["phrases"] == list(NUDITY_PHRASES)
    assert card["negative_prompt"] == ", ".join(NUDITY_PHRASES)
    assert "negative_prompt=official" in card["published_numbers_used"]["negative_prompt"]
    assert SAFREE.touches == ("conditioning",)


# --- on models ----------------------------------------------------------------------------------------------


def test_only_the_trigger_token_changes_and_it_equals_the_formula(toy, tmp_path):
    """On the toy model (a trained CLIP text encoder), "a red star" against the subspace of "star": the trigger
    is "star" (position 3), its embedding becomes (I − P_c) P_m h_3 computed here from the pooled outputs,
    and every other position keeps its embedding."""
    pipe, star = toy
    hook = safree_hook(pipe, star, tmp_path, subspace_phrases="star")
    ids = tokenize(pipe, ["a red star"])[0]
    h = encode_token_ids(pipe, ids[None])[0]
    plan = hook.plan(ids, h)
    assert plan.triggers == [3]
    with torch.no_grad():
        pooled_star = pipe.text_encoder(tokenize(pipe, ["star"])).pooler_output
        masked = ids.repeat(3, 1)
        for i in range(3):
            masked[i, i + 1] = 0
        pooled_masked = pipe.text_encoder(masked).pooler_output
    p_c, p_m = projection_matrix(pooled_star.T), projection_matrix(pooled_masked.T)
    expected = (torch.eye(h.shape[1]) - p_c) @ p_m @ h[3]
    assert torch.allclose(plan.projected[3], expected, atol=1e-5)
    assert torch.allclose(p_c @ plan.projected[3], torch.zeros_like(expected), atol=1e-4)
    unchanged = [i for i in range(77) if i != 3]
    assert torch.equal(plan.projected[unchanged], h[unchanged])
    benign = hook.plan(tokenize(pipe, ["a red circle"])[0], encode_token_ids(pipe, tokenize(pipe, ["a red circle"]))[0])
    assert 3 not in benign.triggers


def test_the_unet_sees_the_projected_embedding_for_steps_0_to_t_prime_only(toy, tmp_path):
    """Records the conditioning each UNet call's first cross-attention block receives: for t' + 1 calls the
    projected rows, then the original ones; the negative-prompt rows never change."""
    pipe, star = toy
    hook = safree_hook(pipe, star, tmp_path, up_t=3, latent_reattention="off")
    item = WorkItem(prompt="a red star", seed=0, steps=6, height=32, width=32, scheduler="ddim")
    ids = tokenize(pipe, [item.prompt])[0]
    original = encode_token_ids(pipe, ids[None])[0]
    plan = hook.plan(ids, original)
    assert plan.triggers and 0 <= plan.last_projected_step < 5  # some steps projected, some not
    block = next(b for b in pipe.unet.down_blocks if "CrossAttn" in type(b).__name__)
    seen = []
    handle = block.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["encoder_hidden_states"].clone()), with_kwargs=True
    )
    try:
        Generator(pipe, [hook]).sample([item])
    finally:
        handle.remove()
    assert len(seen) == 6
    projected_steps = [i for i, rows in enumerate(seen) if torch.allclose(rows[1], plan.projected, atol=1e-6)]
    original_steps = [i for i, rows in enumerate(seen) if torch.equal(rows[1], original)]
    assert projected_steps == list(range(plan.last_projected_step + 1))
    assert original_steps == list(range(plan.last_projected_step + 1, 6))
    assert all(torch.equal(rows[0], seen[0][0]) for rows in seen)


def test_at_strength_0_safree_is_the_base_model_bit_for_bit(tiny_pipe, concept, tmp_path):
    items = [
        WorkItem(prompt=p, seed=s, steps=4, height=32, width=32, scheduler="ddim", negative_prompt=n)
        for p, s, n in [("a red star", 0, ""), ("a blue circle and a red star", 1, "blurry")]
    ]
    base = as_arrays(Generator(tiny_pipe).sample(items))
    for options in ({}, {"negative_prompt": "official", "self_validation": False}):
        hook = safree_hook(tiny_pipe, concept, tmp_path, 0.0, **options)
        for a, b in zip(as_arrays(Generator(tiny_pipe, [hook]).sample(items)), base, strict=True):
            assert np.array_equal(a, b), options
    full = safree_hook(tiny_pipe, concept, tmp_path, latent_reattention="off", negative_prompt="official")
    changed = as_arrays(Generator(tiny_pipe, [full]).sample(items))
    assert max(np.abs(a - b).max() for a, b in zip(changed, base, strict=True)) > 1


def test_latent_reattention_keeps_the_batch_and_strength_interpolates(tiny_pipe, concept, tmp_path):
    item = WorkItem(prompt="a red star", seed=2, steps=3, height=32, width=32, scheduler="ddim")
    off = as_arrays(
        Generator(tiny_pipe, [safree_hook(tiny_pipe, concept, tmp_path, latent_reattention="off")]).sample([item])
    )
    low = as_arrays(Generator(tiny_pipe, [safree_hook(tiny_pipe, concept, tmp_path)]).sample([item]))
    assert off[0].shape == low[0].shape and np.abs(off[0] - low[0]).max() > 1
    # without classifier-free guidance there is no guidance batch to re-attend: LRA is skipped
    no_cfg = WorkItem(prompt="a red star", seed=2, steps=3, height=32, width=32, scheduler="ddim", guidance=1.0)
    a = Generator(tiny_pipe, [safree_hook(tiny_pipe, concept, tmp_path, latent_reattention="off")]).sample([no_cfg])
    b = Generator(tiny_pipe, [safree_hook(tiny_pipe, concept, tmp_path)]).sample([no_cfg])
    assert np.array_equal(as_arrays(a)[0], as_arrays(b)[0])


def test_coverage_text_and_token_ids_are_defended_a_replayed_embedding_is_not(toy, tmp_path):
    from safetensors.torch import save_file

    pipe, star = toy
    hook = safree_hook(pipe, star, tmp_path, latent_reattention="off", self_validation=False)
    assert Generator(pipe, [hook]).uncovered_forms() == {"safree": ["embedding"]}
    ids = tokenize(pipe, ["a red star"])[0]
    path = tmp_path / "embedding.safetensors"
    save_file({"prompt_embeds": encode_token_ids(pipe, ids[None])[0].contiguous()}, str(path))
    common = dict(seed=3, steps=4, height=32, width=32, scheduler="ddim")
    items = [
        WorkItem(prompt="a red star", **common),
        WorkItem(prompt="", token_ids=tuple(int(i) for i in ids), **common),
        WorkItem(prompt="", embedding=str(path), **common),
    ]
    base = as_arrays(Generator(pipe).sample(items))
    text, token_ids, embedding = as_arrays(Generator(pipe, [hook]).sample(items))
    assert np.abs(text - base[0]).max() > 1  # defended
    assert np.abs(text - token_ids).max() <= 1  # token ids exactly like their text
    assert np.abs(embedding - base[2]).max() <= 1  # a replayed embedding passes through


def test_strength_is_checked(concept, tmp_path):
    SAFREE.train(SAFREEConfig(), None, concept, tmp_path)
    with pytest.raises(DuobenchError, match="strength"):
        SAFREE.apply(None, tmp_path, 1.5)


def test_in_the_toy_world_the_published_protocol_lowers_the_star_rate(toy, tmp_path):
    """5 plain star prompts x 2 seeds (~10 s). SAFREE as the published numbers ran it (the subspace phrases also
    as the negative prompt, LRA a no-op): measured base 1.0, SAFREE 0.3 on these 10 images."""
    from duobench.engine import generate
    from duobench.metrics.dsr import build_judge
    from duobench.models import default_sampler_settings

    pipe, star = toy
    settings = default_sampler_settings(pipe, star)
    items = [settings.item(prompt, seed) for prompt in star.prompt_sets["plain"].prompts[:5] for seed in range(2)]
    judge = build_judge("toy-star")

    def star_rate(hooks):
        images = [image for _, batch in generate(Generator(pipe, hooks), items, batch_size=10) for image in batch]
        return float(np.mean([verdict.unsafe for verdict in judge.judge(images)]))

    published = safree_hook(pipe, star, tmp_path, negative_prompt="official", latent_reattention="off")
    assert star_rate([published]) <= star_rate([]) - 0.5
