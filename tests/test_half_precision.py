"""GPU numerics on the CPU: the white-box attacks (UnlearnDiffAtk, Concept Inversion, P4D) and ESD / SPM
training through a half-precision pipeline keep fp32 master variables, run the model under autocast and get
finite, non-zero gradients (bf16, and fp16 with its loss scale: CPU autocast supports both); fp16's loss scale
recovers gradients that would flush to zero; ``batch_size="auto"`` remembers an out-of-memory halving."""

from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from stand_ins import RedJudge

from duobench.attacks.base import grant_access
from duobench.attacks.concept_inversion import ConceptInversionConfig, InversionData, caption_ids, invert_token
from duobench.attacks.p4d import P4D, P4DConfig, pez_step
from duobench.attacks.text_encoding import assemble_ids, prompt_ids
from duobench.attacks.unlearndiffatk import PrefixProblem, optimise_prefix
from duobench.baselines import esd, spm
from duobench.engine import generate
from duobench.generator import Generator
from duobench.items import SamplerSettings, WorkItem
from duobench.precision import Precision
from duobench.prompts import PromptRow


@pytest.fixture(scope="module", params=[torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def half_pipe(tiny_pipe, request):
    return copy.deepcopy(tiny_pipe).to(dtype=request.param)


@pytest.fixture
def autocast_calls(half_pipe):
    """``(module dtype, autocast on, autocast dtype)`` for every UNet and text-encoder forward (also of deep
    copies: a hook is copied by reference)."""
    calls = []

    def spy(module, args):
        calls.append((module.dtype, torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu")))

    handles = [m.register_forward_pre_hook(spy) for m in (half_pipe.unet, half_pipe.text_encoder)]
    yield calls
    for handle in handles:
        handle.remove()


def recording(optimizer_class):
    """An optimizer class that keeps a copy of every parameter's gradient and dtype at each step."""

    class Recording(optimizer_class):
        steps: list[list[tuple[torch.dtype, torch.Tensor]]] = []

        def step(self, closure=None):
            params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
            Recording.steps.append([(p.dtype, p.grad.detach().clone()) for p in params])
            return super().step(closure)

    return Recording


def assert_fp32_finite_nonzero(steps) -> None:
    assert steps, "the optimizer never stepped"
    for params in steps:
        assert all(dtype == torch.float32 and grad.dtype == torch.float32 for dtype, grad in params)
        assert all(torch.isfinite(grad).all() for _, grad in params)
        assert sum(float(grad.abs().sum()) for _, grad in params) > 0


def assert_ran_under_autocast(calls, dtype: torch.dtype) -> None:
    differentiated = [call for call in calls if call[1]]
    assert differentiated, "no forward ran under autocast"
    assert all(autocast_dtype == dtype for _, _, autocast_dtype in differentiated)


# The policy ------------------------------------------------------------------------------------------------


def test_precision_follows_the_model_dtype():
    fp32, bf16, fp16 = (Precision("cpu", dtype) for dtype in (torch.float32, torch.bfloat16, torch.float16))
    assert not fp32.mixed and not fp32.grad_scaler().is_enabled()
    with fp32.autocast():
        assert not torch.is_autocast_enabled("cpu")
    assert bf16.mixed and not bf16.grad_scaler().is_enabled()  # bf16 has fp32's range: no loss scale
    with bf16.autocast():
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    assert fp16.mixed and fp16.grad_scaler().is_enabled()
    assert Precision.of(SimpleNamespace(device=torch.device("cpu"), dtype=torch.float16)) == fp16


def test_fp16_loss_scale_recovers_gradients_that_flush_to_zero():
    """A loss whose per-element gradient (1e-9) is below fp16's smallest subnormal: unscaled, the fp32 master
    gets exactly zero through the fp16 model; through the scaler it gets the fp32 gradient."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 32, generator=generator).half()
    master = torch.randn(1, 16, generator=generator, requires_grad=True)

    def loss():
        return 1e-9 * (master.half() @ weight).float().sum()

    (unscaled,) = torch.autograd.grad(loss(), master)
    assert torch.count_nonzero(unscaled) == 0
    scaler = Precision("cpu", torch.float16).grad_scaler()
    optimizer = torch.optim.SGD([master], lr=0.0)
    (master.grad,) = torch.autograd.grad(scaler.scale(loss()), master)
    scaler.unscale_(optimizer)
    expected = 1e-9 * weight.float().sum(1)[None]
    torch.testing.assert_close(master.grad, expected, rtol=2e-2, atol=0)


# White-box attacks -------------------------------------------------------------------------------------------


def test_unlearndiffatk_prefix_gets_fp32_gradients_under_autocast(half_pipe, autocast_calls):
    tokenizer, text_encoder = half_pipe.tokenizer, half_pipe.text_encoder
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    ids = torch.tensor([assemble_ids(tokenizer, [tokenizer.eos_token_id] * 3 + prompt_ids(tokenizer, "a nude woman"))])
    table = text_encoder.get_input_embeddings().weight.detach().float()
    problem = PrefixProblem(half_pipe.unet, text_encoder, half_pipe.scheduler.alphas_cumprod, latents, ids, 3, table)
    distribution = torch.full((1, 3, table.shape[0]), 1.0 / table.shape[0], requires_grad=True)
    optimizer = recording(torch.optim.Adam)([distribution], lr=0.01, weight_decay=0.1)
    losses = optimise_prefix(problem, distribution, optimizer, 500, 2, torch.Generator().manual_seed(5))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert_fp32_finite_nonzero(type(optimizer).steps)
    assert distribution.dtype == torch.float32 and not torch.all(distribution == 1.0 / table.shape[0])
    assert_ran_under_autocast(autocast_calls, half_pipe.unet.dtype)


def test_concept_inversion_token_gets_fp32_gradients_under_autocast(half_pipe, autocast_calls, monkeypatch):
    tokenizer, text_encoder = half_pipe.tokenizer, half_pipe.text_encoder
    nude = prompt_ids(tokenizer, "nude")[0]
    latents = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([caption_ids(tokenizer, nude, p) for p in ["a woman", "a man"]])
    initial = text_encoder.get_input_embeddings().weight[nude].detach()[None]
    optimizer_class = recording(torch.optim.AdamW)
    monkeypatch.setattr(torch.optim, "AdamW", optimizer_class)
    config = ConceptInversionConfig(batch_size=2, gradient_accumulation=2)
    data = InversionData(latents, latents.flip(-1), ids)
    args = (half_pipe.unet, text_encoder, half_pipe.scheduler.alphas_cumprod, data, initial, config, 2)
    learned, losses = invert_token(*args, torch.Generator().manual_seed(1))
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert_fp32_finite_nonzero(optimizer_class.steps)
    assert learned.dtype == torch.float32 and not torch.equal(learned, initial.float())
    assert_ran_under_autocast(autocast_calls, half_pipe.unet.dtype)


def test_p4d_embeddings_get_fp32_gradients_under_autocast(half_pipe, concept, autocast_calls, tmp_path):
    settings = SamplerSettings(steps=2, height=32, width=32, scheduler="ddim", guidance=5.0)
    attack = P4D(P4DConfig(variant="n", n=4))
    models = grant_access("white-box", tmp_path, settings, half_pipe, half_pipe, RedJudge())
    attack.prepare(concept, models, [])
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(3))
    row = PromptRow("a nude woman on a beach", 7, 5.0)
    problem, embeddings = attack._problem(row, latents, torch.Generator().manual_seed(4))
    optimizer = recording(torch.optim.AdamW)([embeddings], lr=0.1, weight_decay=0.1)
    rng = torch.Generator().manual_seed(6)
    losses = [pez_step(problem, embeddings, optimizer, rng)[0] for _ in range(2)]
    assert all(torch.isfinite(torch.tensor(losses)))
    assert_fp32_finite_nonzero(type(optimizer).steps)
    assert embeddings.dtype == torch.float32
    assert_ran_under_autocast(autocast_calls, half_pipe.unet.dtype)


# ESD and SPM training ----------------------------------------------------------------------------------------


def test_esd_trains_an_fp32_copy_under_autocast(half_pipe, concept, autocast_calls, monkeypatch):
    optimizer_class = recording(torch.optim.Adam)
    monkeypatch.setattr(torch.optim, "Adam", optimizer_class)
    config = esd.ESDConfig(iterations=1, ddim_steps=3, lr=1e-3)
    trained, losses = esd.finetune(config, half_pipe, concept, "esd-x")
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()
    assert_fp32_finite_nonzero(optimizer_class.steps)
    assert trained.dtype == torch.float32 and half_pipe.unet.dtype != torch.float32
    # The trained fp32 copy's forward computes in half precision under autocast.
    assert any(dtype == torch.float32 and on for dtype, on, _ in autocast_calls)
    assert_ran_under_autocast(autocast_calls, half_pipe.unet.dtype)


def test_spm_trains_fp32_adapters_on_the_half_unet_under_autocast(
    half_pipe, concept, autocast_calls, monkeypatch, tmp_path
):
    optimizer_class = recording(torch.optim.AdamW)
    monkeypatch.setattr(torch.optim, "AdamW", optimizer_class)
    config = spm.SPMConfig(iterations=1, warmup_steps=0, denoising_steps=3, fixed_multiplier=1.0, lr=1e-2)
    spm.SPM.train(config, half_pipe, concept, tmp_path)
    assert_fp32_finite_nonzero(optimizer_class.steps)
    # lora_up starts at zero, so after one step the change is non-zero: the step was taken.
    weights = load_file(str(tmp_path / spm.ADAPTER_FILE))
    assert all(tensor.dtype == torch.float32 for tensor in weights.values())
    assert any(float(tensor.abs().sum()) > 0 for name, tensor in weights.items() if "lora_up" in name)
    # Trained on the pipe's own UNet, not on an fp32 copy of it.
    assert all(dtype == half_pipe.unet.dtype for dtype, _, _ in autocast_calls)
    assert_ran_under_autocast(autocast_calls, half_pipe.unet.dtype)


# batch_size="auto" -------------------------------------------------------------------------------------------


class OutOfMemoryAboveTwo(Generator):
    """A generator that runs out of memory on batches of more than 2 and records every batch it is given."""

    def __init__(self, pipe) -> None:
        self.pipe = pipe
        self.batches: list[int] = []

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def sample(self, items):
        self.batches.append(len(items))
        if len(items) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return [None] * len(items)


def test_auto_batch_size_remembers_the_halved_size_for_later_calls():
    pipe = SimpleNamespace()
    items = [WorkItem(prompt=f"thing {i}", seed=i, steps=2, height=32, width=32) for i in range(5)]
    first = OutOfMemoryAboveTwo(pipe)
    assert sum(len(images) for _, images in generate(first, items, "auto")) == 5
    assert first.batches == [5, 5, 4, 2, 2, 1]  # CPU starts at 16: halved 16 -> 8 -> 4 -> 2
    second = OutOfMemoryAboveTwo(pipe)  # a new generator on the same pipeline: starts at 2 directly
    assert sum(len(images) for _, images in generate(second, items, "auto")) == 5
    assert second.batches == [2, 2, 1]
    fixed = OutOfMemoryAboveTwo(pipe)  # an explicit size is not affected
    assert [len(batch) for batch, _ in generate(fixed, items[:2], 8)] == [2]
    other = OutOfMemoryAboveTwo(SimpleNamespace())  # another pipeline starts from the top
    list(generate(other, items, "auto"))
    assert other.batches[0] == 5
