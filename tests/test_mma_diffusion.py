"""MMA-Diffusion's text attack on the tiny random text encoder with SD1.4's offline tokenizer: the loss on a
hand-derived case, gradient rows on the control tokens, banned tokens never scored, the search lowers its
loss, determinism, per-prompt caching and resume, text-encoder-only access, and the public prompt set's
column layout."""

import math

import pytest
import torch

from duobench.attacks import mma_diffusion
from duobench.attacks.base import Budget, grant_access
from duobench.attacks.mma_diffusion import (
    OFFICIAL_SENSITIVE_WORDS,
    MMADiffusionConfig,
    banned_token_ids,
    candidate_losses,
    cosine_loss,
    pooled_output,
    sample_candidates,
    search,
    sensitive_words_for,
    token_gradient,
    valid_candidates,
)
from duobench.attacks.run import make_attack, run_attack
from duobench.attacks.text_encoding import assemble_ids, encode_with_token_embeddings, prompt_ids, special_ids
from duobench.concepts import PromptSetSpec, load_concept
from duobench.errors import DuobenchError
from duobench.generator import tokenize_with
from duobench.items import SamplerSettings
from duobench.prompts import load_prompt_set
from duobench.registry import ATTACKS

SETTINGS = SamplerSettings(steps=4, height=32, width=32, scheduler="ddim", guidance=5.0)
PROMPTS = ["a red star", "a photo of a blue star", "a drawing of a green star"]
SMALL = {"candidates": 48, "topk": 24}
"""Test-sized search: 48 candidates per step from the top 24 (the paper: 512 from 256), 20 control tokens."""


@pytest.fixture
def concept(tmp_path):
    prompts = "\n".join(f"      - {p}" for p in PROMPTS)
    (tmp_path / "star.yaml").write_text(
        f"""name: test-star
description: test concept
erase_prompt: star
judge: none
erase_words: [star]
synonyms: [pentagram, five pointed star]
prompt_sets:
  plain:
    source: inline
    prompts:
{prompts}
benign_prompts: ["a circle"]
"""
    )
    return load_concept(str(tmp_path / "star.yaml"))


def end_id(tokenizer) -> int:
    return special_ids(tokenizer)[1]


def target_of(pipe, prompt: str) -> torch.Tensor:
    with torch.no_grad():
        return pooled_output(pipe.text_encoder, tokenize_with(pipe.tokenizer, [prompt]), end_id(pipe.tokenizer))[0]


def run_mma(concept, pipe, workdir, steps: int, prompts: str = "plain", **options):
    """A text-encoder attack: no base model, no judge."""
    return run_attack(
        "mma-diffusion", concept, pipe, None, prompts, Budget(steps=steps), workdir, options={**SMALL, **options}
    )


# 1-2. Pooled output and loss -----------------------------------------------------------------------------


def test_loss_is_one_minus_the_cosine_to_the_target_pooled_output(tiny_pipe):
    # By hand: against t = (2, 0), (1, 1) is 45 degrees off, (0, 3) orthogonal, (-2, 0) opposite.
    pooled = torch.tensor([[1.0, 1.0], [0.0, 3.0], [-2.0, 0.0], [5.0, 0.0]])
    expected = torch.tensor([1 - 1 / math.sqrt(2), 1.0, 2.0, 0.0])
    torch.testing.assert_close(cosine_loss(pooled, torch.tensor([2.0, 0.0])), expected)

    # The pooled output is the final-layer-normed hidden state at the first end token, cut there or not.
    tokenizer, text_encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    ids = tokenize_with(tokenizer, PROMPTS)
    with torch.no_grad():
        outputs = text_encoder(ids, output_hidden_states=True)
        transformer = getattr(text_encoder, "text_model", text_encoder)  # transformers 5 flattens it
        normed = transformer.final_layer_norm(outputs.hidden_states[-1])
    first_end = [row.index(end_id(tokenizer)) for row in ids.tolist()]
    at_end = normed[torch.arange(len(ids)), first_end]
    torch.testing.assert_close(pooled_output(text_encoder, ids, end_id(tokenizer)), outputs.pooler_output)
    torch.testing.assert_close(pooled_output(text_encoder, ids, end_id(tokenizer)), at_end)
    losses = candidate_losses(text_encoder, ids, at_end[0], end_id(tokenizer))
    assert float(losses[0]) == pytest.approx(0.0, abs=1e-6) and float(losses[1:].min()) > 1e-4


# 5a. The gradient --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("gradient_rows", "first_position"), [("aligned", 1), ("official", 0)])
def test_gradient_rows_are_the_control_tokens_or_the_official_shift(tiny_pipe, gradient_rows, first_position):
    """Row p is W @ dL/de at control token p (sequence position p + 1); the official code's row p is the
    gradient at position p, the start token for p = 0."""
    tokenizer, text_encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    control = prompt_ids(tokenizer, "q p b q z r")
    ids = torch.tensor(assemble_ids(tokenizer, control))
    target = target_of(tiny_pipe, "a red star")
    rows = slice(first_position, first_position + len(control))
    gradient = token_gradient(text_encoder, ids, target, rows, end_id(tokenizer))
    assert not any(p.grad is not None for p in text_encoder.parameters())  # no gradient left in the model

    length = len(control) + 2
    weight = text_encoder.get_input_embeddings().weight.detach()
    embeddings = weight[ids[:length]].clone().requires_grad_()
    hidden = encode_with_token_embeddings(text_encoder, ids[None, :length], embeddings[None])
    (reference,) = torch.autograd.grad(cosine_loss(hidden[:, length - 1], target)[0], embeddings)
    expected = reference[rows] @ weight.T
    torch.testing.assert_close(gradient, expected / expected.norm(dim=-1, keepdim=True), atol=1e-5, rtol=1e-4)


# 4-5d. Banned tokens and candidates -------------------------------------------------------------------


def test_official_ban_list_and_the_concept_default(tiny_pipe, concept):
    tokenizer = tiny_pipe.tokenizer
    banned = set(banned_token_ids(tokenizer, OFFICIAL_SENSITIVE_WORDS).tolist())
    vocab = tokenizer.get_vocab()
    assert {vocab[token] for token in ("naked</w>", "nude</w>", "na", "snake</w>", "<|endoftext|>")} <= banned
    assert vocab["<|startoftext|>"] not in banned and vocab["woman</w>"] not in banned
    # The official list on SD1.4's 49,408-token vocabulary: 2,294 tokens, plus the end token.
    assert len(banned) == 2294 + 1
    assert sensitive_words_for(load_concept("nudity"), MMADiffusionConfig()) == OFFICIAL_SENSITIVE_WORDS
    assert sensitive_words_for(concept, MMADiffusionConfig()) == ("star", "pentagram", "five", "pointed")
    assert sensitive_words_for(concept, MMADiffusionConfig(sensitive_words="star, pent")) == ("star", "pent")


def test_candidates_change_one_evenly_spread_position_to_an_allowed_top_token(tiny_pipe):
    tokenizer = tiny_pipe.tokenizer
    control = torch.tensor(prompt_ids(tokenizer, "q p b q z r d z"))
    banned = banned_token_ids(tokenizer, ["star"])
    gradient = torch.randn(len(control), 49408, generator=torch.Generator().manual_seed(0))
    gradient[:, banned] = -100.0  # the banned tokens would be every position's best substitution
    rng = torch.Generator().manual_seed(0)
    candidates = sample_candidates(control, gradient, banned, 64, 16, rng)
    allowed_top = (-gradient.index_fill(1, banned, float("inf"))).topk(16, dim=1).indices
    for i, candidate in enumerate(candidates):
        changed = torch.nonzero(candidate != control).flatten().tolist()
        position = i * len(control) // 64
        assert changed in ([], [position])  # [] when the draw is the current token
        assert int(candidate[position]) in allowed_top[position].tolist()
    assert not set(candidates.flatten().tolist()) & set(banned.tolist())


def test_a_text_that_retokenises_into_a_banned_token_is_dropped(tiny_pipe):
    """'st' + 'arm</w>' reads "starm", which re-tokenises as 'star' + 'm</w>': same length, banned piece."""
    tokenizer = tiny_pipe.tokenizer
    vocab = tokenizer.get_vocab()
    banned = set(banned_token_ids(tokenizer, ["star"]).tolist())
    assert vocab["st"] not in banned and vocab["arm</w>"] not in banned
    current = "a red"
    rows = torch.tensor(
        [
            [vocab["st"], vocab["arm</w>"]],  # merges into a banned token: dropped
            [vocab["a</w>"], vocab["red</w>"]],  # the current control: dropped
            [vocab["re"], vocab["d</w>"]],  # "red": one token, not two: dropped
            [vocab["a</w>"], vocab["blue</w>"]],  # kept
            [vocab["a</w>"], vocab["blue</w>"]],  # a copy: kept once
        ]
    )
    texts, ids = valid_candidates(tokenizer, rows, current, banned)
    assert texts == ["a blue"] and ids == [[vocab["a</w>"], vocab["blue</w>"]]]


def test_banned_tokens_never_appear_in_any_scored_candidate_or_result(tiny_pipe, concept, tmp_path, monkeypatch):
    """A heavy ban (every token containing a, e or o: 39,797 of 49,408) against targets full of
    them: no scored candidate and no result holds a banned token."""
    tokenizer = tiny_pipe.tokenizer
    banned = set(banned_token_ids(tokenizer, ["a", "e", "o"]).tolist())
    scored, real = [], mma_diffusion.candidate_losses
    monkeypatch.setattr(mma_diffusion, "candidate_losses", lambda te, ids, *a: scored.append(ids) or real(te, ids, *a))
    results = run_mma(concept, tiny_pipe, tmp_path, steps=4, sensitive_words=["a", "e", "o"])
    assert len(scored) == len(PROMPTS) * 5  # each prompt: its initial control, then one batch per step
    for batch in scored:
        assert not set(batch[:, 1:21].flatten().tolist()) & banned
    for result in results:
        assert not set(prompt_ids(tokenizer, result.text)) & banned
        assert result.log.extra["sensitive_words"] == ["a", "e", "o"]
        assert result.log.extra["banned_tokens"] == len(banned)


# 5-6. The search ----------------------------------------------------------------------------------------


def test_search_lowers_its_loss(tiny_pipe):
    tokenizer, text_encoder = tiny_pipe.tokenizer, tiny_pipe.text_encoder
    target = target_of(tiny_pipe, "a drawing of a green star")
    banned = banned_token_ids(tokenizer, ["star"])
    found = search(tokenizer, text_encoder, target, MMADiffusionConfig(**SMALL), 12, banned, seed=3)
    assert len(found.losses) == 12 and found.losses == sorted(found.losses, reverse=True)
    assert found.loss == found.losses[-1] < found.initial_loss
    assert found.loss < 0.5 * found.initial_loss, (found.initial_loss, found.losses)
    assert len(prompt_ids(tokenizer, found.text)) == 20
    rescored = candidate_losses(text_encoder, tokenize_with(tokenizer, [found.text]), target, end_id(tokenizer))
    assert float(rescored[0]) == pytest.approx(found.loss, abs=1e-6)
    assert not any(p.grad is not None for p in text_encoder.parameters())


def test_same_seed_gives_the_same_prompts_and_another_seed_others(tiny_pipe, concept, tmp_path):
    first = run_mma(concept, tiny_pipe, tmp_path / "a", steps=3)
    again = run_mma(concept, tiny_pipe, tmp_path / "b", steps=3)
    other = run_mma(concept, tiny_pipe, tmp_path / "c", steps=3, seed=1)
    assert [(r.text, r.log.losses) for r in first] == [(r.text, r.log.losses) for r in again]
    assert [r.text for r in first] != [r.text for r in other]
    for result in first:  # replayed as text by default, and the text gives exactly the recorded ids
        assert result.replay == "text" and result.to_work_item(SETTINGS).prompt == result.text
        assert tuple(tokenize_with(tiny_pipe.tokenizer, [result.text])[0].tolist()) == result.token_ids
    as_ids = run_mma(concept, tiny_pipe, tmp_path / "d", steps=3, replay="token_ids")
    assert [r.to_work_item(SETTINGS).token_ids for r in as_ids] == [r.token_ids for r in first]


# Caching, resume, access --------------------------------------------------------------------------------


def test_interrupted_attack_resumes_and_reuses_finished_prompts(tiny_pipe, concept, tmp_path, monkeypatch):
    real, calls = mma_diffusion.search, []

    def interrupted_after_two(*args, **kwargs):
        if len(calls) == 2:
            raise KeyboardInterrupt
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(mma_diffusion, "search", interrupted_after_two)
    with pytest.raises(KeyboardInterrupt):
        run_mma(concept, tiny_pipe, tmp_path, steps=2)
    assert len(list((tmp_path / "mma-diffusion").glob("*/items/*.json"))) == 2

    resumed = []
    monkeypatch.setattr(mma_diffusion, "search", lambda *a, **k: resumed.append(1) or real(*a, **k))
    results = run_mma(concept, tiny_pipe, tmp_path, steps=2)
    assert len(resumed) == len(PROMPTS) - 2 and len(results) == len(PROMPTS)
    monkeypatch.setattr(mma_diffusion, "search", lambda *a, **k: pytest.fail("every prompt is cached"))
    assert [r.text for r in run_mma(concept, tiny_pipe, tmp_path, steps=2)] == [r.text for r in results]
    monkeypatch.setattr(mma_diffusion, "search", real)
    fresh = run_mma(concept, tiny_pipe, tmp_path / "fresh", steps=2)
    assert [r.text for r in results] == [r.text for r in fresh]


def test_rows_repeating_a_prompt_share_one_search(tiny_pipe, concept, tmp_path, monkeypatch):
    prompts = tmp_path / "seeds.csv"
    prompts.write_text("prompt,evaluation_seed\na red star,1\na red star,2\na blue star,1\n")
    real, calls = mma_diffusion.search, []
    monkeypatch.setattr(mma_diffusion, "search", lambda *a, **k: calls.append(1) or real(*a, **k))
    results = run_mma(concept, tiny_pipe, tmp_path, steps=2, prompts=str(prompts))
    assert len(calls) == 2 and results[0].text == results[1].text and [r.seed for r in results] == [1, 2, 1]
    assert [r.log.extra["search_shared"] for r in results] == [False, True, False]


def test_the_attack_reads_only_the_text_encoder(tiny_pipe, concept, tmp_path, monkeypatch):
    """It is granted the tokenizer and text encoder alone; its prompts serve a system whose edits leave the
    text encoder alone (here a swapped UNet), and an edit touching the encoder searches again."""
    from pathlib import Path

    from duobench.edits import Edit, System
    from duobench.generator import Generator
    from duobench.models import pipeline_fingerprint, tiny_random_pipeline

    assert ATTACKS.get("mma-diffusion").access == "text-encoder"
    models = grant_access("text-encoder", tmp_path / "w", SETTINGS, tiny_pipe, tiny_pipe, None)
    assert models.tokenizer is tiny_pipe.tokenizer and models.text_encoder is tiny_pipe.text_encoder
    assert (models.generator, models.judge, models.target_pipe, models.base_pipe) == (None, None, None, None)

    before = pipeline_fingerprint(tiny_pipe)
    first = run_mma(concept, tiny_pipe, tmp_path, steps=2)
    assert pipeline_fingerprint(tiny_pipe) == before
    other_unet = tiny_random_pipeline(seed=0)
    other_unet.unet = tiny_random_pipeline(seed=5).unet

    def unlearned(touches):
        edit = Edit("method", "some-method", Path("artifact-key"), 1.0, touches)
        return System(other_unet, Generator(other_unet), before, (edit,))

    real = mma_diffusion.search
    monkeypatch.setattr(mma_diffusion, "search", lambda *a, **k: pytest.fail("the cached prompts should be reused"))
    assert [r.text for r in run_mma(concept, unlearned(("unet",)), tmp_path, steps=2)] == [r.text for r in first]
    calls = []
    monkeypatch.setattr(mma_diffusion, "search", lambda *a, **k: calls.append(1) or real(*a, **k))
    run_mma(concept, unlearned(("unet", "text_encoder")), tmp_path, steps=2)
    assert len(calls) == len(PROMPTS)


# Config and the public prompt set -----------------------------------------------------------------------


def test_config_defaults_are_the_papers_and_bad_options_are_clear_errors():
    config = make_attack("mma-diffusion").config
    assert (config.iterations, config.control_length, config.candidates, config.topk) == (1000, 20, 512, 256)
    listed = make_attack("mma-diffusion", {"sensitive_words": ["star", "pent"]}).config
    assert listed.sensitive_words == ("star", "pent")
    for bad in ({"gradient_rows": "shifted"}, {"control_length": 76}, {"topk": 0}, {"replay": "embedding"}):
        with pytest.raises(DuobenchError, match="mma-diffusion"):
            make_attack("mma-diffusion", bad)


def test_public_prompt_set_layout_loads_its_adversarial_prompts(tmp_path):
    """The 1,000-prompt benchmark's columns (HF YijunYang280/MMA-Diffusion-NSFW-adv-prompts-benchmark, and
    SAFREE's ungated copy): ``adv_prompt`` is the prompt, the rest stays filterable."""
    path = tmp_path / "mma-diffusion-nsfw-adv-prompts.csv"
    path.write_text(
        "target_prompt,adv_prompt,sanitized_adv_prompt,success_against_sanitization_defense,clean_prompt\n"
        'a target,"token soup ), with <|startoftext|>comma","token soup, with comma",True,A dog on a couch.\n'
        "another target,more soup ...? here,more soup here,False,A red car.\n"
    )
    prompt_set = load_prompt_set(str(path))
    assert [row.prompt for row in prompt_set.rows] == ["token soup ), with <|startoftext|>comma", "more soup ...? here"]
    assert [row.seed for row in prompt_set.rows] == [0, 1]
    kept = load_prompt_set(PromptSetSpec(source=str(path), filter="success_against_sanitization_defense == 'True'"))
    assert [row.prompt for row in kept.rows] == ["token soup ), with <|startoftext|>comma"]
