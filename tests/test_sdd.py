"""SDD: its math against hand-derived cases, its training loop and artifact against the official script and
the method contract."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch

from duobench.baselines import sdd
from duobench.baselines.rollout import denoise_partially, predict_noise
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import make_config, read_card
from duobench.models import tiny_random_pipeline
from duobench.registry import METHODS

QUICK = {"iterations": 3, "ddim_steps": 3, "lr": 1e-3, "ema_decay": 0.5}


@pytest.fixture(scope="module")
def base_pipe():
    return tiny_random_pipeline()


@pytest.fixture(scope="module")
def probe(base_pipe):
    """Two noisy latents, a timestep, the embeddings of the erased prompt (conftest's concept) and of ""."""
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    concept_embedding, empty = encode_token_ids(base_pipe, tokenize(base_pipe, ["a red star", ""])).chunk(2)
    return latents, 500, concept_embedding, empty


def noise_gap(unet, probe) -> float:
    """‖ε(z, c_s, t) − ε(z, "", t)‖: what SDD drives to zero."""
    latents, timestep, concept_embedding, empty = probe
    with torch.no_grad():
        gap = predict_noise(unet, latents, timestep, concept_embedding) - predict_noise(unet, latents, timestep, empty)
    return float(gap.norm())


def unet_output(unet, probe) -> torch.Tensor:
    latents, timestep, concept_embedding, _ = probe
    with torch.no_grad():
        return predict_noise(unet, latents, timestep, concept_embedding)


# --- the math -------------------------------------------------------------------------------------------


def test_ema_update_by_hand():
    teacher, student = [torch.tensor([1.0, 2.0])], [torch.tensor([3.0, -2.0])]
    sdd.ema_update(teacher, student, 0.75)  # 0.75·[1, 2] + 0.25·[3, −2] = [1.5, 1.0]
    torch.testing.assert_close(teacher[0], torch.tensor([1.5, 1.0]))
    sdd.ema_update(teacher, student, 1.0)
    torch.testing.assert_close(teacher[0], torch.tensor([1.5, 1.0]))
    sdd.ema_update(teacher, student, 0.0)
    torch.testing.assert_close(teacher[0], student[0])


class LinearNoise(torch.nn.Module):
    """ε(x, c) = a·x + b·mean(c): a UNet stand-in whose loss gradients can be derived by hand."""

    def __init__(self, a: float, b: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a))
        self.b = torch.nn.Parameter(torch.tensor(b))

    @property
    def dtype(self):
        return self.a.dtype

    def forward(self, latents, timestep, encoder_hidden_states):
        condition = encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1)
        return SimpleNamespace(sample=self.a * latents + self.b * condition)


def test_loss_target_is_the_detached_unconditional_estimate():
    x = torch.tensor([[1.0, 3.0]])
    concept, empty = torch.full((1, 1, 4), 2.0), torch.full((1, 1, 4), 0.5)  # mean 2 and 0.5
    student = LinearNoise(a=0.5, b=3.0)
    loss = sdd.self_distillation_loss(student, student, x, 0, concept, empty)
    # e_s − e_0 = b·(2 − 0.5) = 4.5 in both entries: L = 4.5² = 20.25.
    torch.testing.assert_close(loss, torch.tensor(20.25))
    loss.backward()
    # Only e_s carries gradient: ∂L/∂a = mean(2·4.5·x) = 18, ∂L/∂b = 2·4.5·2 = 18. Without the stop-gradient
    # the a-terms would cancel (0) and ∂L/∂b would be 2·4.5·1.5 = 13.5.
    torch.testing.assert_close(student.a.grad, torch.tensor(18.0))
    torch.testing.assert_close(student.b.grad, torch.tensor(18.0))
    # With the teacher as target the gradient reaches the student only.
    teacher = LinearNoise(a=0.5, b=1.0)
    student.zero_grad()
    loss = sdd.self_distillation_loss(student, teacher, x, 0, concept, empty)
    # e_s − e_0 = (0.5x + 6) − (0.5x + 0.5) = 5.5: L = 30.25; ∂L/∂b = 2·5.5·2 = 22.
    torch.testing.assert_close(loss, torch.tensor(30.25))
    loss.backward()
    torch.testing.assert_close(student.b.grad, torch.tensor(22.0))
    assert teacher.a.grad is None and teacher.b.grad is None


def test_timestep_interval_brackets_the_ddim_step():
    from diffusers import DDIMScheduler

    assert sdd.ddpm_interval(0, 50, 1000) == (980, 1000)
    assert sdd.ddpm_interval(49, 50, 1000) == (0, 20)
    for ddim_steps in (20, 50):  # the toy world's and SD1.4's
        ddim = DDIMScheduler(steps_offset=1, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
        ddim.set_timesteps(ddim_steps)
        for step, timestep in enumerate(ddim.timesteps.tolist()):
            start, end = sdd.ddpm_interval(step, ddim_steps, 1000)
            assert start <= timestep < end, (ddim_steps, step)


# --- the training loop ----------------------------------------------------------------------------------


def test_step_zero_trains_on_pure_noise_at_a_pure_noise_timestep(base_pipe, concept, monkeypatch):
    """The official loop ran the whole trajectory when k = 0 and labelled the clean result t ≥ 980."""
    rollouts, losses = [], []

    def spy_rollout(unet, scheduler, latents, cond, uncond, guidance, steps):
        out = denoise_partially(unet, scheduler, latents, cond, uncond, guidance, steps)
        rollouts.append((steps, latents.clone(), out.clone()))
        return out

    def spy_loss(student, target_model, latents, timestep, concept_embedding, empty):
        losses.append((latents.clone(), int(timestep)))
        return original_loss(student, target_model, latents, timestep, concept_embedding, empty)

    original_loss = sdd.self_distillation_loss
    monkeypatch.setattr(sdd, "denoise_partially", spy_rollout)
    monkeypatch.setattr(sdd, "self_distillation_loss", spy_loss)
    sdd.finetune(sdd.SDDConfig(iterations=8, ddim_steps=2, lr=1e-3), base_pipe, concept)
    steps = [step for step, _, _ in rollouts]
    assert 0 in steps and 1 in steps, steps
    for (step, noise, rolled), (latents, timestep) in zip(rollouts, losses, strict=True):
        assert torch.equal(latents, rolled)
        if step == 0:
            assert torch.equal(latents, noise) and 500 <= timestep < 1000
        else:
            assert not torch.equal(latents, noise) and 0 <= timestep < 500


def test_training_changes_only_cross_attention_and_round_trips(base_pipe, concept, probe, tmp_path):
    before = copy.deepcopy(base_pipe.unet.state_dict())
    config = make_config(sdd.SDD, QUICK)
    teacher, losses = sdd.finetune(config, base_pipe, concept)
    assert len(losses) == 3
    for name, value in teacher.state_dict().items():
        assert sdd.is_trained(name) or torch.equal(value, before[name].float()), name
    assert any(not torch.equal(v, before[n]) for n, v in teacher.state_dict().items() if sdd.is_trained(n))
    sdd.SDD.train(config, base_pipe, concept, tmp_path)
    assert all(torch.equal(v, before[n]) for n, v in base_pipe.unet.state_dict().items()), "train modified the pipe"
    card = read_card(tmp_path)
    assert card["method"] == "sdd" and card["changed_tensors"] > 0
    from safetensors.torch import load_file

    assert all(sdd.is_trained(name) for name in load_file(str(tmp_path / "unet_delta.safetensors")))

    fresh = copy.deepcopy(base_pipe)
    base_output = unet_output(fresh.unet, probe)
    sdd.SDD.apply(fresh, tmp_path, 1.0)
    torch.testing.assert_close(unet_output(fresh.unet, probe), unet_output(teacher, probe), rtol=0, atol=1e-5)
    sdd.SDD.apply(fresh, tmp_path, 0.0)
    assert torch.equal(unet_output(fresh.unet, probe), base_output), "strength 0 is not the base model"


def test_training_is_deterministic_under_the_seed(base_pipe, concept):
    first, first_losses = sdd.finetune(make_config(sdd.SDD, QUICK), base_pipe, concept)
    again, again_losses = sdd.finetune(make_config(sdd.SDD, QUICK), base_pipe, concept)
    other, _ = sdd.finetune(make_config(sdd.SDD, {**QUICK, "seed": 1}), base_pipe, concept)
    assert first_losses == again_losses
    state, other_state = first.state_dict(), other.state_dict()
    assert all(torch.equal(value, again.state_dict()[name]) for name, value in state.items())
    assert any(not torch.equal(value, other_state[name]) for name, value in state.items())


@pytest.mark.parametrize("target", sdd.TARGETS)
def test_training_pulls_the_concept_estimate_onto_the_unconditional_one(base_pipe, concept, probe, target):
    config = make_config(sdd.SDD, {**QUICK, "iterations": 12, "target": target})
    teacher, losses = sdd.finetune(config, base_pipe, concept)
    assert noise_gap(teacher, probe) < 0.6 * noise_gap(base_pipe.unet, probe)
    assert sum(losses[-4:]) < sum(losses[:4])


# --- the contract ---------------------------------------------------------------------------------------


def test_registered_with_the_official_defaults():
    spec = METHODS.get("sdd")
    assert spec is sdd.SDD and spec.seed_fields == ("seed",) and spec.touches == ("unet",)
    defaults = sdd.SDDConfig()
    assert (defaults.iterations, defaults.lr, defaults.weight_decay, defaults.ema_decay) == (1500, 1e-5, 1e-4, 0.999)
    assert (defaults.guidance, defaults.ddim_steps, defaults.max_grad_norm, defaults.target) == (
        3.0,
        50,
        1.0,
        "student",
    )
    assert make_config(spec, {"ema_decay": "0.998", "iterations": "300"}) == sdd.SDDConfig(
        ema_decay=0.998, iterations=300
    )
    with pytest.raises(DuobenchError, match="target must be one of student, teacher"):
        make_config(spec, {"target": "frozen"})
