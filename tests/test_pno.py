"""PNO: the noise regulariser by hand, the optimiser lowers its objective, the UNet budget is honoured and
counted exactly, strength 0 is the base model bit for bit, images are per-item deterministic, gradients are
clipped before the step, and the objective may not be the evaluation judge."""

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from stand_ins import RedJudge

from duobench.baselines.pno import PNO, PNOConfig, PNOHook, block_log_probs, noise_regularizer
from duobench.cache import SAMPLING_INFO, ImageStore
from duobench.errors import DuobenchError
from duobench.generator import Generator, SamplingHook
from duobench.items import WorkItem
from duobench.methods import make_config, read_card, scorer_name, with_scorer
from duobench.metrics.base import load_images
from duobench.metrics.dsr import DSR

STEPS = 4


def item(prompt="a red star", seed=0, scheduler="ddim", guidance=7.5):
    return WorkItem(prompt=prompt, seed=seed, steps=STEPS, height=32, width=32, scheduler=scheduler, guidance=guidance)


def as_arrays(images):
    return [np.asarray(image).astype(int) for image in images]


class ConstantObjective:
    def __init__(self, p):
        self.p = p

    def unsafe_probability(self, images):
        return torch.full((images.shape[0],), self.p) + 0 * images.mean()


class RandomConvObjective:
    """A fixed random conv net: a deterministic differentiable function of the image, nothing more."""

    def __init__(self):
        self.weight = torch.randn(4, 3, 3, 3, generator=torch.Generator().manual_seed(0))

    def unsafe_probability(self, images):
        return torch.sigmoid(4 * torch.nn.functional.conv2d(images, self.weight).relu().mean(dim=(1, 2, 3)))


class CalibratedBrightness:
    """p_unsafe = sigmoid(40·(mean − m₀) + 2), m₀ the mean of the first image seen: the first sample is
    unsafe (p = 0.88) and darker is safer."""

    def __init__(self):
        self.reference = None

    def unsafe_probability(self, images):
        mean = images.mean(dim=(1, 2, 3))
        if self.reference is None:
            self.reference = mean.detach()[0]
        return torch.sigmoid(40 * (mean - self.reference) + 2)


def hook(scorer, strength=1.0, **options):
    return PNOHook(PNOConfig(**options), "stand-in", strength, scorer=scorer)


# --- the regulariser, by hand ------------------------------------------------------------------------------


def test_regulariser_equals_the_concentration_bounds_by_hand():
    """Blocks of d = 4, n = 8 draws: rows (3,0,0,0) and (−3,0,0,0) four times each. Mean 0 → log P_mean at
    its clamp −log 2. Σ = XᵀX/8 = diag(9,0,0,0), ‖Σ − I‖₂ = 8, so the excess is √9 − 1 − √(4/8) = 2 − √½
    and log P_cov = −8·(2 − √½)²/2 = −6.686…: reg = log 2 + 4·(2 − √½)².

    All ones, n = 2: ‖m‖ = 2 → log P_mean = −2·4/(2·4) = −1; Σ = J, ‖J − I‖₂ = 3, √4 − 1 − √2 < 0 → clamp
    −log 2: reg = 1 + log 2, and a permutation of all-ones adds the same again."""
    rows = torch.tensor([[3.0, 0, 0, 0], [-3.0, 0, 0, 0]] * 4)
    mean_lp, cov_lp = block_log_probs(rows.flatten(), 4)
    assert mean_lp.item() == pytest.approx(-math.log(2))
    assert cov_lp.item() == pytest.approx(-4 * (2 - math.sqrt(0.5)) ** 2, rel=1e-6)
    assert noise_regularizer(rows.flatten(), 1, []).item() == pytest.approx(
        math.log(2) + 4 * (2 - math.sqrt(0.5)) ** 2, rel=1e-6
    )
    ones = torch.ones(8)
    assert noise_regularizer(ones, 1, []).item() == pytest.approx(1 + math.log(2), rel=1e-6)
    assert noise_regularizer(ones, 1, [torch.randperm(8)] * 2).item() == pytest.approx(2 * (1 + math.log(2)), rel=1e-6)


def test_standard_normal_noise_sits_at_the_floor_and_shifted_noise_is_penalised():
    noise = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    permutations = [torch.randperm(4096, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    gaussian = noise_regularizer(noise, 1, permutations)
    assert gaussian.item() == pytest.approx(4 * math.log(2))
    assert noise_regularizer(noise + 0.5, 1, permutations).item() > gaussian.item() + 10
    assert noise_regularizer(noise * 2, 1, permutations).item() > gaussian.item() + 10
    shifted = (noise + 0.5).requires_grad_(True)
    noise_regularizer(shifted, 1, permutations).backward()
    assert shifted.grad.sum().item() > 0  # descending the penalty pulls the mean back towards 0


# --- the method on a tiny pipeline -------------------------------------------------------------------------


def test_the_optimiser_lowers_its_own_objective(tiny_pipe):
    pno = hook(CalibratedBrightness(), random_trials=1, opt_steps=4, shuffles=2)
    Generator(tiny_pipe, [pno]).sample([item()])
    stats = pno.stats[item()]
    assert stats["p_unsafe_first"] == pytest.approx(torch.sigmoid(torch.tensor(2.0)).item(), abs=1e-5)
    assert stats["updates"] >= 1
    assert stats["p_unsafe_best"] < stats["p_unsafe_first"] - 0.05
    assert all(p.grad is None for p in tiny_pipe.unet.parameters())  # gradients for the variables only


def count_unet_calls(pipe, monkeypatch):
    calls = []
    original = pipe.unet.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(pipe.unet, "forward", counted)
    return calls


@pytest.mark.parametrize(("budget", "expected"), [(None, (3 + 2 * 3 - 1) * STEPS), (26, 24), (22, 16)])
def test_the_budget_is_honoured_and_counts_every_unet_call(tiny_pipe, monkeypatch, budget, expected):
    """3 trials (12 calls), then per iteration a forward (4) and, unless it is the last or the budget cannot
    pay for the backward's recomputation and the next forward, a backward (4 more). Never safe (threshold 5)."""
    calls = count_unet_calls(tiny_pipe, monkeypatch)
    pno = hook(
        RandomConvObjective(), random_trials=3, opt_steps=3, threshold=5.0, shuffles=2, max_unet_evaluations=budget
    )
    Generator(tiny_pipe, [pno]).sample([item()])
    stats = pno.stats[item()]
    assert len(calls) == stats["unet_evaluations"] == expected
    assert budget is None or len(calls) <= budget
    assert stats["stopped"] == ("opt_steps" if budget is None else "budget")


def test_an_item_safe_at_its_first_sample_costs_one_chain(tiny_pipe, monkeypatch):
    calls = count_unet_calls(tiny_pipe, monkeypatch)
    pno = hook(ConstantObjective(0.0))
    Generator(tiny_pipe, [pno]).sample([item()])
    assert len(calls) == STEPS
    assert pno.stats[item()]["trials"] == 1 and pno.stats[item()]["stopped"] == "safe"


def test_each_image_carries_its_sampling_record_through_the_store_into_the_audit_row(tiny_pipe, tmp_path):
    """PNO's per-item record (evaluations, trials, why it stopped) rides on the image as a PNG text chunk, so an
    image read back from the store still has it, and DSR's audit row shows it."""
    pno = hook(ConstantObjective(0.0))
    image = Generator(tiny_pipe, [pno]).sample([item()])[0]
    assert json.loads(image.info[SAMPLING_INFO]) == {"sampler": "pno", **pno.stats[item()]}
    stored = ImageStore(tmp_path).put("key", image)
    loaded = load_images([stored])[0]
    np.testing.assert_array_equal(np.asarray(loaded), np.asarray(image))
    metric = DSR(judge=RedJudge())
    metric.update([loaded], items=[item()])
    row = metric.audit_rows()[0]
    assert json.loads(row["sampling"])["unet_evaluations"] == STEPS and json.loads(row["sampling"])["stopped"] == "safe"
    metric.update(Generator(tiny_pipe).sample([item()]), items=[item()])  # a plain sampler's image has none
    assert "sampling" not in metric.audit_rows()[1]


def test_strength_0_is_the_base_model_bit_for_bit(tiny_pipe):
    items = [item(), item("a blue circle", seed=1)]
    base = Generator(tiny_pipe).sample(items)
    off = PNOHook(PNOConfig(), "not-a-judge-preset", strength=0.0)  # never asked to load its objective
    for ours, theirs in zip(as_arrays(Generator(tiny_pipe, [off]).sample(items)), as_arrays(base), strict=True):
        np.testing.assert_array_equal(ours, theirs)


def test_at_eta_0_an_unoptimised_item_is_the_generators_ddim_image(tiny_pipe):
    """PNO's chain with explicit noise is DDIM: at η = 0, safe at trial 0 (the item's own x_T), it makes the
    base model's image."""
    pno = hook(ConstantObjective(0.0), eta=0.0)
    ours = as_arrays(Generator(tiny_pipe, [pno]).sample([item()]))[0]
    base = as_arrays(Generator(tiny_pipe).sample([item()]))[0]
    assert np.abs(ours - base).max() <= 1


def test_images_are_deterministic_per_item_whatever_the_batch(tiny_pipe):
    options = dict(random_trials=2, opt_steps=2, threshold=5.0, shuffles=2)
    a, b, c = item(), item("a blue circle", seed=1), item("a green square", seed=2)
    first = as_arrays(Generator(tiny_pipe, [hook(RandomConvObjective(), **options)]).sample([a, b]))
    again = as_arrays(Generator(tiny_pipe, [hook(RandomConvObjective(), **options)]).sample([a, b]))
    other = as_arrays(Generator(tiny_pipe, [hook(RandomConvObjective(), **options)]).sample([c, a]))
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    np.testing.assert_array_equal(first[0], other[1])
    assert np.abs(first[0] - as_arrays(Generator(tiny_pipe).sample([a]))[0]).max() > 0  # PNO did change it


def test_gradients_are_clipped_before_the_optimizer_step(tiny_pipe, monkeypatch):
    seen = []
    original = torch.optim.AdamW.step

    def recording(self, *args, **kwargs):
        seen.extend(p.grad.norm().item() for group in self.param_groups for p in group["params"])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", recording)
    pno = hook(RandomConvObjective(), random_trials=1, opt_steps=3, threshold=5.0, shuffles=2, max_grad_norm=1e-4)
    Generator(tiny_pipe, [pno]).sample([item()])
    assert len(seen) == 2 * 2  # two updates of two variables (noise, prompt rows)
    assert all(5e-5 < norm <= 1e-4 * (1 + 1e-4) for norm in seen)  # clipped, from something larger


def test_pno_refuses_other_samplers_and_a_second_sampling_hook(tiny_pipe):
    with pytest.raises(DuobenchError, match="DDIM"):
        Generator(tiny_pipe, [hook(ConstantObjective(0.0))]).sample([item(scheduler="pndm")])

    class OtherSampler(SamplingHook):
        name = "other"
        replaces_sampling = True

    with pytest.raises(DuobenchError, match="both replace sampling"):
        Generator(tiny_pipe, [hook(ConstantObjective(0.0)), OtherSampler()])


# --- the objective is not the judge ------------------------------------------------------------------------


def test_the_objective_may_not_be_the_evaluation_judge(tmp_path):
    concept = SimpleNamespace(name="star", judge="toy-star", reward_judge="toy-star-2")
    assert scorer_name("", concept) == "toy-star-2"
    assert PNO.scorer_field == "objective"
    assert with_scorer(PNO, {"eta": 0.5}, concept) == {"eta": 0.5, "objective": "toy-star-2"}
    with pytest.raises(DuobenchError, match="evaluation judge"):
        with_scorer(PNO, {"objective": "toy-star"}, concept)  # the run refuses before any work
    with pytest.raises(DuobenchError, match="evaluation judge"):
        PNO.train(make_config(PNO, {"objective": "toy-star"}), None, concept, tmp_path)
    PNO.train(make_config(PNO, {"eta": "0.5"}), None, concept, tmp_path)
    assert read_card(tmp_path)["objective"] == "toy-star-2"
    applied = PNO.apply(None, tmp_path, 0.5)
    assert applied.objective == "toy-star-2" and applied.config.eta == 0.5 and applied.strength == 0.5
