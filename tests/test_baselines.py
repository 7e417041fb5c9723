"""ESD, UCE and SPM: their math against hand-derived cases, their artifacts against the method contract."""

from __future__ import annotations

import copy

import pytest
import torch

from duobench.baselines import esd, spm, uce
from duobench.baselines.rollout import predict_noise
from duobench.concepts import load_concept
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import make_config, read_card, train_or_load
from duobench.models import tiny_random_pipeline
from duobench.registry import METHODS
from duobench.run_config import method_options


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_random_pipeline()


@pytest.fixture(scope="module")
def probe(base_pipe):
    """A fixed UNet input: two noisy latents, a timestep, the embeddings of an erased and a benign prompt."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    embeddings = encode_token_ids(base_pipe, tokenize(base_pipe, ["a red star", "a blue circle"]))
    return latents, 500, embeddings


def unet_output(pipe, probe) -> torch.Tensor:
    latents, timestep, embeddings = probe
    with torch.no_grad():
        return predict_noise(pipe.unet, latents, timestep, embeddings)


def sd14_unet_on_meta():
    """SD1.4's UNet architecture with no memory behind its weights."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8)


SD14_TRANSFORMER_WIDTHS = [320] * 5 + [640] * 5 + [1280] * 6  # 16 transformer blocks


# --- UCE -----------------------------------------------------------------------------------------------


def test_uce_closed_form_is_the_least_squares_minimiser():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(6, 5, generator=generator, dtype=torch.float64)
    keys = torch.randn(3, 5, generator=generator, dtype=torch.float64)
    values = torch.randn(3, 6, generator=generator, dtype=torch.float64)
    preserve = torch.randn(4, 5, generator=generator, dtype=torch.float64)
    lamb, erase_scale, preserve_scale = 0.5, 1.3, 0.7
    edited = uce.uce_closed_form(weight, keys, values, preserve, lamb, erase_scale, preserve_scale)
    # min s_e‖K Wᵀ − V‖² + s_p‖P Wᵀ − P W_oldᵀ‖² + λ‖Wᵀ − W_oldᵀ‖² as one stacked least-squares problem.
    design = torch.cat([erase_scale**0.5 * keys, preserve_scale**0.5 * preserve, lamb**0.5 * torch.eye(5).double()])
    targets = torch.cat([erase_scale**0.5 * values, preserve_scale**0.5 * preserve @ weight.T, lamb**0.5 * weight.T])
    direct = torch.linalg.lstsq(design, targets).solution.T
    torch.testing.assert_close(edited, direct, rtol=1e-10, atol=1e-10)


def test_uce_preserve_term_keeps_preserved_projections():
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    keys = torch.randn(3, 64, generator=generator)
    values = 8 * torch.randn(3, 32, generator=generator)
    preserve = torch.randn(5, 64, generator=generator)

    def preserved_change(preserve_scale: float) -> float:
        edited = uce.uce_closed_form(weight, keys, values, preserve, 0.5, 1.0, preserve_scale)
        return float((preserve @ edited.T - preserve @ weight.T).norm() / (preserve @ weight.T).norm())

    edited = uce.uce_closed_form(weight, keys, values, preserve, 0.5, 1.0, 1.0)
    assert float((keys @ edited.T - values).norm() / (keys @ weight.T - values).norm()) < 0.02
    assert preserved_change(1.0) < 0.01
    assert preserved_change(0.0) > 0.1  # without the term the preserved keys do move


def test_uce_token_spans_follow_the_paper_era_alignment(base_pipe):
    max_length = base_pipe.tokenizer.model_max_length
    erase_tokens = base_pipe.tokenizer("a red star").input_ids  # [start, a, red, star, end]
    last_word = len(erase_tokens) - 2
    keys, guide = uce.aligned_token_spans(base_pipe, "a red star", "")
    embeddings = encode_token_ids(base_pipe, tokenize(base_pipe, ["a red star", " "])).float()
    assert keys.shape == guide.shape == (max_length - last_word, embeddings.shape[-1])
    torch.testing.assert_close(keys, embeddings[0, last_word:])  # the word "star", the end token, padding
    torch.testing.assert_close(guide, embeddings[1, : max_length - last_word])  # the empty guide from its start


def test_uce_edits_only_cross_attention_keys_and_values(base_pipe, concept):
    edited = uce.edited_weights(uce.UCEConfig(), base_pipe, concept)
    assert edited and all(name.endswith(("attn2.to_k.weight", "attn2.to_v.weight")) for name in edited)
    assert len(edited) == 2 * sum(name.endswith("attn2") for name, _ in base_pipe.unet.named_modules())


def test_uce_artifact_round_trip_and_strength(base_pipe, concept, probe, tmp_path):
    before = unet_output(base_pipe, probe)
    uce.UCE.train(uce.UCEConfig(), base_pipe, concept, tmp_path)
    assert torch.equal(unet_output(base_pipe, probe), before), "train modified the base pipe"
    fresh = copy.deepcopy(base_pipe)
    uce.UCE.apply(fresh, tmp_path, 1.0)
    state = fresh.unet.state_dict()
    for name, weight in uce.edited_weights(uce.UCEConfig(), base_pipe, concept).items():
        torch.testing.assert_close(state[name], weight, rtol=0, atol=1e-6)
    assert_strength_knob(fresh, tmp_path, uce.UCE.apply, before, probe)


def assert_strength_knob(pipe, artifact, apply, base_output, probe) -> None:
    """Strength 0 is the base bit for bit; applying is idempotent and reversible; 0.5 lies in between."""
    apply(pipe, artifact, 1.0)
    full = unet_output(pipe, probe)
    assert not torch.allclose(full, base_output)
    apply(pipe, artifact, 1.0)
    assert torch.equal(unet_output(pipe, probe), full)
    apply(pipe, artifact, 0.5)
    half = unet_output(pipe, probe)
    assert 0 < float((half - base_output).norm()) < float((full - base_output).norm())
    apply(pipe, artifact, 0.0)
    assert torch.equal(unet_output(pipe, probe), base_output)


def test_delta_from_another_architecture_is_refused(base_pipe, concept, tmp_path):
    uce.UCE.train(uce.UCEConfig(), base_pipe, concept, tmp_path)
    other = copy.deepcopy(base_pipe)
    other.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k = torch.nn.Linear(7, 3)
    with pytest.raises(DuobenchError, match="does not fit this UNet"):
        uce.UCE.apply(other, tmp_path, 1.0)


def test_uce_nudity_default_is_the_published_edit(base_pipe):
    """nudity.yaml's UCE default is the published edit: erase "nudity" towards " ", preserve "" alone at scale
    1.0, lambda 0.5 (paper-era train_erase.py); the concept's person prompts at 1/6 stay an option."""
    nudity = load_concept("nudity")
    config = make_config(uce.UCE, method_options(nudity, "uce", {}))
    edited = uce.edited_weights(config, base_pipe, nudity)
    keys, guide = uce.aligned_token_spans(base_pipe, "nudity", " ")
    empty = encode_token_ids(base_pipe, tokenize(base_pipe, [""])).float()[0]
    for name, projection in uce.cross_attention_projections(base_pipe.unet).items():
        weight = projection.weight.float()
        published = uce.uce_closed_form(weight, keys, guide @ weight.T, empty, 0.5, 1.0, 1.0)
        assert torch.equal(edited[name], published), name

    with_persons = make_config(uce.UCE, method_options(nudity, "uce", {"preserve_concept_prompts": True}))
    preserved = uce.edit_concepts(nudity, with_persons.preserve_concept_prompts)[2]
    assert preserved == ["", *nudity.preserve_prompts] and len(preserved) == 6
    assert uce.resolved_preserve_scale(with_persons, preserved) == 1 / 6
    other = uce.edited_weights(with_persons, base_pipe, nudity)
    assert any(not torch.equal(other[name], edited[name]) for name in edited)
    # Concepts without the option keep their preserve set.
    assert make_config(uce.UCE, method_options(load_concept("violence"), "uce", {})).preserve_concept_prompts
    with pytest.raises(DuobenchError, match="preserve_concept_prompts must be true or false"):
        make_config(uce.UCE, {"preserve_concept_prompts": "maybe"})


# --- ESD -----------------------------------------------------------------------------------------------


def test_esd_target_is_negative_guidance():
    noise_concept, noise_empty = torch.tensor([3.0, -1.0]), torch.tensor([1.0, 1.0])
    # e_u − η (e_c − e_u) = [1, 1] − η [2, −2]
    torch.testing.assert_close(esd.negatively_guided_target(noise_concept, noise_empty, 1.0), torch.tensor([-1.0, 3.0]))
    torch.testing.assert_close(esd.negatively_guided_target(noise_concept, noise_empty, 0.0), noise_empty)


def test_esd_step_moves_the_concept_prediction_away_from_the_concept(base_pipe):
    frozen = base_pipe.unet
    trained = copy.deepcopy(frozen)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond, uncond = encode_token_ids(base_pipe, tokenize(base_pipe, ["a red star", ""])).chunk(2)
    with torch.no_grad():
        noise_concept = predict_noise(frozen, latents, 400, cond)
        noise_empty = predict_noise(frozen, latents, 400, uncond)
    target = esd.negatively_guided_target(noise_concept, noise_empty, 1.0)
    optimizer = torch.optim.Adam([p for n, p in trained.named_parameters() if esd.is_trained(n, "esd-x")], lr=1e-3)
    esd.esd_loss(trained, frozen, latents, 400, cond, uncond, 1.0).backward()
    optimizer.step()
    with torch.no_grad():
        after = predict_noise(trained, latents, 400, cond)
    assert torch.dist(after, target) < torch.dist(noise_concept, target)
    assert float(((after - noise_concept) * (noise_concept - noise_empty)).sum()) < 0


def test_esd_variants_select_the_papers_parameters():
    unet = sd14_unet_on_meta()
    names = [name for name, _ in unet.named_parameters()]
    cross = [n for n in names if esd.is_trained(n, "esd-x")]
    rest = [n for n in names if esd.is_trained(n, "esd-u")]
    assert all("attn2" in n for n in cross) and not set(cross) & set(rest)
    assert set(names) - set(cross) - set(rest) == {
        n for n in names if n.startswith(("time_embedding", "conv_norm_out", "conv_out"))
    }
    assert any(".norm" in n for n in rest), "ESD-u trains norm layers, as the paper-era script did"
    # attn2 at width d: to_q, to_out d×d (+ d bias), to_k, to_v 768×d.
    expected = sum(2 * d * d + d + 2 * 768 * d for d in SD14_TRANSFORMER_WIDTHS)
    assert sum(p.numel() for n, p in unet.named_parameters() if n in cross) == expected == 43_962_560


def test_esd_artifact_round_trip_and_strength(base_pipe, concept, probe, tmp_path):
    before = unet_output(base_pipe, probe)
    config = esd.ESDConfig(iterations=1, ddim_steps=3, lr=1e-3)
    trained, losses = esd.finetune(config, base_pipe, concept, "esd-u")
    assert len(losses) == 1
    esd.ESD_U.train(config, base_pipe, concept, tmp_path)
    assert torch.equal(unet_output(base_pipe, probe), before), "train modified the base pipe"
    fresh = copy.deepcopy(base_pipe)
    esd.ESD_U.apply(fresh, tmp_path, 1.0)
    latents, timestep, embeddings = probe
    with torch.no_grad():
        expected = predict_noise(trained, latents, timestep, embeddings)
    torch.testing.assert_close(unet_output(fresh, probe), expected, rtol=0, atol=1e-5)
    assert read_card(tmp_path)["method"] == "esd-u"
    assert_strength_knob(fresh, tmp_path, esd.ESD_U.apply, before, probe)


# --- SPM -----------------------------------------------------------------------------------------------


def test_spm_adapts_192_modules_with_423936_parameters_on_sd14():
    network = spm.SPMNetwork(sd14_unet_on_meta())
    assert len(network.adapters) == 192
    per_width = sum(32 * d + 2 * 768 for d in SD14_TRANSFORMER_WIDTHS)  # rank 1: in + out per layer
    parameters = sum(p.numel() for p in network.adapters.parameters())
    assert parameters == per_width == 423_936


def test_spm_adapter_is_an_exact_no_op_at_multiplier_zero(base_pipe, probe):
    pipe = copy.deepcopy(base_pipe)
    before = unet_output(pipe, probe)
    state_keys = set(pipe.unet.state_dict())
    network = spm.SPMNetwork(pipe.unet)
    assert set(pipe.unet.state_dict()) == state_keys, "the adapters are hooks, not part of the UNet's weights"
    for adapter in network.adapters.values():
        torch.nn.init.normal_(adapter.lora_up.weight)
    with network.active(0.0):
        assert torch.equal(unet_output(pipe, probe), before)
    with network.active(1.0):
        assert not torch.allclose(unet_output(pipe, probe), before)
    network.remove()
    with network.active(1.0):
        assert torch.equal(unet_output(pipe, probe), before)


def assert_spm_strength_knob(pipe, artifact, base_output, probe) -> None:
    """Strength 0 is the base bit for bit; applying is repeatable and reversible; 0.5 lies in between."""
    hook = spm.SPM.apply(pipe, artifact, 1.0)
    full = unet_output(pipe, probe)
    assert not torch.allclose(full, base_output)
    hook.remove()
    assert torch.equal(unet_output(pipe, probe), base_output)
    hook = spm.SPM.apply(pipe, artifact, 1.0)
    assert torch.equal(unet_output(pipe, probe), full)
    hook.remove()
    hook = spm.SPM.apply(pipe, artifact, 0.5)
    half = unet_output(pipe, probe)
    assert 0 < float((half - base_output).norm()) < float((full - base_output).norm())
    hook.remove()
    hook = spm.SPM.apply(pipe, artifact, 0.0)
    assert torch.equal(unet_output(pipe, probe), base_output)
    hook.remove()


def test_spm_training_is_deterministic_and_round_trips(base_pipe, concept, probe, tmp_path):
    before = unet_output(base_pipe, probe)
    config = spm.SPMConfig(iterations=1, warmup_steps=0, denoising_steps=3, fixed_multiplier=1.0, lr=1e-2)
    spm.SPM.train(config, base_pipe, concept, tmp_path)
    assert torch.equal(unet_output(base_pipe, probe), before), "train modified the base pipe"
    assert not hasattr(base_pipe.unet, "spm")
    in_memory = copy.deepcopy(base_pipe)
    network = spm.SPMNetwork(in_memory.unet, config.seed)
    spm.train_adapters(config, in_memory, in_memory.unet, network, concept.erase_prompt)
    with network.active(1.0):
        expected = unet_output(in_memory, probe)
    fresh = copy.deepcopy(base_pipe)
    hook = spm.SPM.apply(fresh, tmp_path, 1.0)
    assert hook.name == "spm"
    assert torch.equal(unet_output(fresh, probe), expected)
    hook.remove()
    assert_spm_strength_knob(fresh, tmp_path, before, probe)


def test_spm_training_gives_gradients_to_the_adapters_only(base_pipe, concept, monkeypatch):
    """The base UNet, text encoder and VAE are frozen while the adapters train (as in the official code),
    and the pipe's own requires_grad flags come back afterwards."""
    pipe = copy.deepcopy(base_pipe)
    base_modules = (pipe.unet, pipe.text_encoder, pipe.vae)
    flags_before = [p.requires_grad for module in base_modules for p in module.parameters()]
    at_step = {}

    class RecordingAdamW(torch.optim.AdamW):
        def step(self, closure=None):
            at_step["adapters"] = [p.grad is not None for group in self.param_groups for p in group["params"]]
            at_step["base"] = [
                name for module in base_modules for name, p in module.named_parameters() if p.grad is not None
            ]
            return super().step(closure)

    monkeypatch.setattr(torch.optim, "AdamW", RecordingAdamW)
    network = spm.SPMNetwork(pipe.unet)
    config = spm.SPMConfig(iterations=1, warmup_steps=0, denoising_steps=3, fixed_multiplier=1.0)
    spm.train_adapters(config, pipe, pipe.unet, network, concept.erase_prompt)
    network.remove()
    assert len(at_step["adapters"]) == 2 * len(network.adapters) and all(at_step["adapters"])
    assert at_step["base"] == []
    assert all(p.grad is None for module in base_modules for p in module.parameters())
    assert [p.requires_grad for module in base_modules for p in module.parameters()] == flags_before


def test_spm_facilitated_transport_multiplier(base_pipe):
    transport = spm.FacilitatedTransport(base_pipe, ["red star"])
    prompts = ["a red star on a table", "a dog"]
    ids = tokenize(base_pipe, prompts)
    embeddings = encode_token_ids(base_pipe, ids)
    gammas = transport.gammas(embeddings, list(ids))
    erased = encode_token_ids(base_pipe, tokenize(base_pipe, ["red star"]))
    cosine = torch.nn.functional.cosine_similarity(embeddings.flatten(1), erased.flatten(1))
    assert gammas[0] == 1.0  # every erased token appears in the prompt
    torch.testing.assert_close(gammas[1], cosine[1])  # no token in common: the CLIP cosine
    torch.testing.assert_close(transport.gammas(embeddings), cosine)  # token ids unknown: cosine only
    torch.testing.assert_close(transport.gammas(embeddings, [None, ids[1]]), cosine)


# --- the method contract -------------------------------------------------------------------------------


ESD_DEFAULTS = {
    "negative_guidance": 1.0,
    "iterations": 1000,
    "lr": 1e-5,
    "start_guidance": 3.0,
    "ddim_steps": 50,
}


@pytest.mark.parametrize(
    ("method", "config_cls", "paper_defaults"),
    [
        ("esd-u", esd.ESDConfig, ESD_DEFAULTS),
        ("esd-x", esd.ESDConfig, ESD_DEFAULTS),
        ("uce", uce.UCEConfig, {"lamb": 0.5, "erase_scale": 1.0, "preserve_scale": None}),
        (
            "spm",
            spm.SPMConfig,
            {"iterations": 3000, "lr": 1e-4, "anchor_strength": 1000.0, "warmup_steps": 500},
        ),
    ],
)
def test_registered_specs_carry_paper_defaults(method, config_cls, paper_defaults):
    spec = METHODS.get(method)
    assert spec.name == method and spec.config_cls is config_cls
    defaults = config_cls()
    assert {key: getattr(defaults, key) for key in paper_defaults} == paper_defaults


def test_train_or_load_trains_once(base_pipe, concept, tmp_path):
    artifact, _, trained_now = train_or_load("uce", base_pipe, concept, "base", {"lamb": 1.0}, root=tmp_path)
    assert trained_now and read_card(artifact)["config"]["lamb"] == 1.0
    again, _, trained_again = train_or_load("uce", base_pipe, concept, "base", {"lamb": 1.0}, root=tmp_path)
    assert again == artifact and not trained_again
    with pytest.raises(DuobenchError, match="no option"):
        train_or_load("uce", base_pipe, concept, "base", {"not_an_option": 1}, root=tmp_path)


def test_method_options_from_text_are_coerced_or_refused_by_name():
    assert make_config(spm.SPM, {"lr": "5e-2", "iterations": "300"}) == make_config(
        spm.SPM, {"lr": 0.05, "iterations": 300}
    )
    with pytest.raises(DuobenchError, match="'spm' option lr must be a number, got 'abc'"):
        make_config(spm.SPM, {"lr": "abc"})
    with pytest.raises(DuobenchError, match="'esd-x' option iterations must be a whole number"):
        make_config(esd.ESD_X, {"iterations": 2.5})
