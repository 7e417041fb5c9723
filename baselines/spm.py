"""SPM: concept Semi-Permeable Membrane, one-dimensional adapters (Lyu et al., CVPR 2024), on diffusers.

Architecture. A rank-1 adapter ``y = W x + m · up(down(x))`` (alpha = rank = 1) sits on every
``nn.Linear`` and ``nn.Conv2d`` inside every ``Transformer2DModel`` of the UNet: proj_in, attn1 q/k/v/out,
attn2 q/k/v/out, the two feed-forward layers and proj_out, 12 per transformer block, 192 modules and
423,936 parameters on SD1.4 (1.7 MB). ``down`` starts kaiming-uniform, ``up`` at zero; the base UNet stays
frozen. Modules are matched with ``isinstance`` and their number is checked against the transformer
blocks, because the official class-*name* match silently skips diffusers' ``LoRACompatibleLinear``.

Training (``train_spm.py`` with the authors' demo defaults), per iteration:

1. k ~ U{1..29}; x_t = k DDIM-30 steps from fresh noise with the target prompt at guidance 3, adapter on;
   with dynamic resolution each side is drawn from {4..7}/8 of the native size (256–448 px on SD1.4).
2. t = the 1000-step schedule's ``timesteps[int(k · 1000 / 30)]``.
3. Erase loss ``MSE(ε_on(x_t, target), e_n − g · (e_p − e_n))`` with the frozen model's e_p = ε(x_t, target)
   and e_n = ε(x_t, neutral ""), g = 1: ESD's negative guidance with η = 1.
4. Latent anchoring ``MSE(ε_on(x_t, s), ε_off(x_t, s))`` over random text embeddings s (Gaussian, kept with
   probability 1 − cos(s, target), rescaled to ‖target‖ · U(0.8, 1.2)); total loss = erase + 1000 · anchor.
5. AdamW lr 1e-4, cosine with 3 hard restarts after 500 warm-up steps, 3000 iterations, batch 1, fp32.

Inference, facilitated transport: for a prompt p the adapter output is scaled by γ(p)² with
γ(p) = max(cos(flat E(p), flat E(target)), |tokens(p) ∩ tokens(target)| / |tokens(target)|) over the
flattened 77 × D text embeddings and the non-special token ids. The official inference multiplies both
``down`` and ``up`` by γ, so the weight change scales with γ², which we reproduce. For nudity the authors
used a fixed γ = 2 instead (``fixed_multiplier=2.0``, i.e. 4× the trained change). ``strength`` is the
adapter multiplier m on top: the change is ``m · γ²``, and m = 0 is exactly the base model.

Deliberate differences from the official code:

- AdamW in fp32 (torch) instead of bitsandbytes' AdamW8bit: no extra dependency, no GPU-only optimiser.
- The anchor batch: the official code builds ``[∅, s1, ∅, s2, ∅, s3, ∅, s4]`` and its CFG-style split keeps
  only the second half, so its loss sees ``[∅, s3, ∅, s4]``: two random anchors and two copies of the empty
  prompt. We build exactly that batch (``anchor_samples // 2`` pairs) instead of computing the discarded half.
- Facilitated transport is computed per UNet row from the row's own embedding, inside the UNet call, so it
  also holds for callers that bypass the pipeline (white-box attacks). Token ids are known for embeddings the
  text encoder produced during the session; for a raw embedding (an inverted concept) only the cosine term
  applies. Under classifier-free guidance the unconditional row gets γ("") rather than the prompt's γ
  (the official code scaled the whole network by the prompt's γ for both rows).
- Training runs in fp32 as the official code does (a half-precision pipe's UNet is copied to fp32 for it);
  at inference the base UNet keeps the pipe's dtype and the fp32 adapters' output is cast to it.

Artifact: ``spm.safetensors`` in the official kohya-style layout (``lora_unet_<module>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; metadata ``prompts``, ``rank``, ``alpha``), so the authors' released SPMs
load the same way, plus ``card.json``.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import math
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from duobench.baselines.rollout import denoise_partially, initial_noise, loss_summary, predict_noise
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import encode_token_ids, tokenize
from duobench.methods import MethodSpec, read_card, write_card

ADAPTER_FILE = "spm.safetensors"
KEY_PREFIX = "lora_unet_"
MODULES_PER_TRANSFORMER = 2  # proj_in, proj_out
MODULES_PER_BLOCK = 10  # attn1 q/k/v/out, attn2 q/k/v/out, ff in, ff out
TOKEN_MEMORY = 4096


@dataclass(frozen=True)
class SPMConfig:
    """The authors' demo defaults; ``fixed_multiplier`` None means facilitated transport at inference."""

    iterations: int = 3000
    lr: float = 1e-4
    warmup_steps: int = 500
    restart_cycles: int = 3
    erase_guidance: float = 1.0
    anchor_strength: float = 1000.0
    anchor_samples: int = 4
    denoising_steps: int = 30
    start_guidance: float = 3.0
    dynamic_resolution: bool = True
    neutral_prompt: str = ""
    fixed_multiplier: float | None = None
    seed: int = 0


class RankOneAdapter(nn.Module):
    """``up(down(x))`` with a one-dimensional bottleneck, shaped like the Linear/Conv2d it sits beside."""

    def __init__(self, base: nn.Module, generator: torch.Generator) -> None:
        super().__init__()
        if isinstance(base, nn.Linear):
            self.lora_down = nn.Linear(base.in_features, 1, bias=False)
            self.lora_up = nn.Linear(1, base.out_features, bias=False)
        else:
            self.lora_down = nn.Conv2d(base.in_channels, 1, base.kernel_size, base.stride, base.padding, bias=False)
            self.lora_up = nn.Conv2d(1, base.out_channels, 1, bias=False)
        self.register_buffer("alpha", torch.tensor(1.0))
        nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.lora_up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lora_up(self.lora_down(x))


def adapted_modules(unet) -> dict[str, nn.Module]:
    """``{module path: module}`` for every Linear/Conv2d inside a Transformer2DModel, count-checked."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    modules: dict[str, nn.Module] = {}
    transformers = blocks = 0
    for name, module in unet.named_modules():
        if isinstance(module, Transformer2DModel):
            transformers += 1
            for child_name, child in module.named_modules():
                blocks += isinstance(child, BasicTransformerBlock)
                if isinstance(child, (nn.Linear, nn.Conv2d)):
                    modules[f"{name}.{child_name}"] = child
    expected = MODULES_PER_TRANSFORMER * transformers + MODULES_PER_BLOCK * blocks
    if not modules or len(modules) != expected:
        raise DuobenchError(
            f"SPM found {len(modules)} Linear/Conv2d layers in {transformers} transformer models with "
            f"{blocks} blocks, expected {expected}: this UNet's transformer layers are not SD-style."
        )
    return modules


class FacilitatedTransport:
    """γ per UNet row: max(clip cosine, token overlap) of the row's prompt with the erased prompts.

    A forward hook on the text encoder remembers which token ids produced which embedding (by a digest of
    its values), so that the UNet-side hook can compute the token term for the rows it receives.
    """

    def __init__(self, pipe, erased_prompts: list[str]) -> None:
        ids = tokenize(pipe, erased_prompts)
        self.special_ids = set(pipe.tokenizer.all_special_ids)
        self.erased_embeddings = F.normalize(encode_token_ids(pipe, ids).flatten(1).float(), dim=1)
        self.erased_tokens = [set(row.tolist()) - self.special_ids for row in ids]
        self.tokens_by_embedding: OrderedDict[bytes, set[int]] = OrderedDict()
        self._last: tuple[weakref.ref, int, torch.Tensor] | None = None

    @staticmethod
    def _digest(embedding: torch.Tensor) -> bytes:
        return hashlib.sha1(embedding.detach().to("cpu", torch.float32).numpy().tobytes()).digest()

    def remember_tokens(self, module, args, kwargs, output) -> None:
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        if input_ids is None:
            return
        for ids, embedding in zip(input_ids, output[0], strict=True):
            self.tokens_by_embedding[self._digest(embedding)] = set(ids.tolist()) - self.special_ids
        while len(self.tokens_by_embedding) > TOKEN_MEMORY:
            self.tokens_by_embedding.popitem(last=False)

    def gammas(self, embeddings: torch.Tensor) -> torch.Tensor:
        """γ for each row of ``embeddings`` (N × L × D); cached while the pipeline reuses the same tensor."""
        if self._last is not None and self._last[0]() is embeddings and self._last[1] == embeddings._version:
            return self._last[2]
        flat = F.normalize(embeddings.detach().flatten(1).float(), dim=1)
        clip_cosine = flat @ self.erased_embeddings.to(flat.device).T
        token_overlap = torch.zeros_like(clip_cosine)
        for row, embedding in enumerate(embeddings):
            tokens = self.tokens_by_embedding.get(self._digest(embedding))
            if tokens is not None:
                for column, erased in enumerate(self.erased_tokens):
                    token_overlap[row, column] = len(tokens & erased) / max(len(erased), 1)
        gammas = torch.maximum(clip_cosine, token_overlap).amax(dim=1)
        self._last = (weakref.ref(embeddings), embeddings._version, gammas)
        return gammas


class SPMNetwork(nn.Module):
    """The adapters of one UNet, attached as ``unet.spm`` so they move with it and enter its fingerprint.

    The buffers ``multiplier`` and ``fixed_gamma`` mirror the inference settings into the state dict (so the
    pipeline fingerprint, hence the image cache, tells settings apart); ``fixed_gamma`` 0 means
    facilitated transport.
    """

    def __init__(self, unet, seed: int = 0) -> None:
        super().__init__()
        targets = adapted_modules(unet)
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict(
            {KEY_PREFIX + path.replace(".", "_"): RankOneAdapter(module, generator) for path, module in targets.items()}
        )
        self.adapters.to(device=unet.device, dtype=torch.float32)
        self.register_buffer("multiplier", torch.tensor(0.0))
        self.register_buffer("fixed_gamma", torch.tensor(1.0))
        self.transport: FacilitatedTransport | None = None
        self._multiplier = 0.0
        self._fixed_gamma = 1.0
        self._row_gammas: torch.Tensor | None = None
        self._adapter_hooks = [
            module.register_forward_hook(self._adapter_hook(adapter))
            for module, adapter in zip(targets.values(), self.adapters.values(), strict=True)
        ]
        self._transport_hooks: list = []

    def set_inference(self, pipe, multiplier: float, fixed_gamma: float | None, erased_prompts: list[str]) -> None:
        """Multiplier ``strength``; a fixed γ, or facilitated transport against ``erased_prompts``."""
        self._multiplier = float(multiplier)
        self._fixed_gamma = float(fixed_gamma) if fixed_gamma is not None else 0.0
        self.multiplier.fill_(self._multiplier)
        self.fixed_gamma.fill_(self._fixed_gamma)
        self._remove_transport()
        if fixed_gamma is None:
            self.transport = FacilitatedTransport(pipe, erased_prompts)
            self._transport_hooks = [
                pipe.text_encoder.register_forward_hook(self.transport.remember_tokens, with_kwargs=True),
                pipe.unet.register_forward_pre_hook(self._set_row_gammas, with_kwargs=True),
            ]

    @contextlib.contextmanager
    def active(self, multiplier: float):
        """Run with the adapters scaled by ``multiplier`` (0: the frozen base model), restoring after."""
        saved = self._multiplier
        self._multiplier = float(multiplier)
        try:
            yield
        finally:
            self._multiplier = saved

    def _set_row_gammas(self, module, args, kwargs) -> None:
        embeddings = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        self._row_gammas = self.transport.gammas(embeddings) if embeddings is not None else None

    def _scale(self, output: torch.Tensor) -> torch.Tensor | float | None:
        if self._multiplier == 0.0:
            return None
        if self.transport is None:
            return self._multiplier * self._fixed_gamma**2
        gammas = self._row_gammas.to(output.device)
        if gammas.shape[0] != output.shape[0]:
            raise RuntimeError(f"SPM got {gammas.shape[0]} transport multipliers for a batch of {output.shape[0]}")
        return (self._multiplier * gammas**2).view(-1, *[1] * (output.dim() - 1))

    def _adapter_hook(self, adapter: RankOneAdapter):
        def hook(module, inputs, output):
            scale = self._scale(output)
            if scale is None:
                return None
            change = adapter(inputs[0].to(adapter.lora_up.weight.dtype))
            return output + (scale * change).to(output.dtype)

        return hook

    def _remove_transport(self) -> None:
        for handle in self._transport_hooks:
            handle.remove()
        self._transport_hooks = []
        self.transport = None

    def remove(self) -> None:
        """Unhook everything: the UNet computes the base model again."""
        self._remove_transport()
        for handle in self._adapter_hooks:
            handle.remove()
        self._adapter_hooks = []


def attach(unet) -> SPMNetwork:
    """The UNet's SPM adapters, created (at zero, multiplier 0) on first use."""
    network = getattr(unet, "spm", None)
    if not isinstance(network, SPMNetwork):
        network = SPMNetwork(unet)
        unet.add_module("spm", network)
    return network


def detach(unet) -> None:
    """Remove the adapters and their hooks: the UNet is the base model again."""
    network = getattr(unet, "spm", None)
    if isinstance(network, SPMNetwork):
        network.remove()
        del unet.spm


def anchor_embeddings(target: torch.Tensor, empty: torch.Tensor, count: int, generator) -> torch.Tensor:
    """The anchoring batch ``[∅, s, ∅, s, ...]`` with ``count // 2`` random embeddings s (see module doc)."""
    anchors = []
    target_flat = target.flatten().float()
    for _ in range(count // 2):
        while True:
            noise = torch.randn(target.shape, generator=generator).to(target.device)
            noise = noise / noise.norm()
            similarity = F.cosine_similarity(target_flat, noise.flatten(), dim=0)
            if float(torch.rand((), generator=generator)) < 1 - similarity:
                break
        scale = 0.8 + 0.4 * float(torch.rand((), generator=generator))
        anchors += [empty, scale * noise * target_flat.norm()]
    return torch.cat(anchors)


def random_latent_size(native: int, dynamic: bool, generator) -> tuple[int, int]:
    """Height and width in latent pixels: native, or each side from {4..7}/8 of it (SPM's bucket)."""
    if not dynamic:
        return native, native
    step = max(native // 8, 1)
    height, width = (int(torch.randint(4, 8, (1,), generator=generator)) * step for _ in range(2))
    return height, width


def train_adapters(config: SPMConfig, pipe, unet, network: SPMNetwork, target_prompt: str) -> list[float]:
    """Train ``network`` (hooked into ``unet``, a UNet of ``pipe``'s model) to erase ``target_prompt``.

    ``pipe`` provides the text encoder and the noise schedule. Returns the loss per iteration.
    """
    from diffusers import DDIMScheduler
    from diffusers.optimization import get_scheduler

    if config.anchor_samples < 2 or config.anchor_samples % 2 or config.denoising_steps < 2:
        raise DuobenchError("SPM needs an even anchor_samples >= 2 and denoising_steps >= 2.")
    target, neutral, empty = (
        encode_token_ids(pipe, tokenize(pipe, [target_prompt, config.neutral_prompt, ""])).float().chunk(3)
    )
    optimizer = torch.optim.AdamW(network.adapters.parameters(), lr=config.lr)
    schedule = get_scheduler(
        "cosine_with_restarts",
        optimizer,
        num_warmup_steps=config.warmup_steps,
        num_training_steps=config.iterations,
        num_cycles=config.restart_cycles,
    )
    ddim = DDIMScheduler.from_config(pipe.scheduler.config)
    generator = torch.Generator().manual_seed(config.seed)
    losses = []
    for _ in range(config.iterations):
        ddim.set_timesteps(config.denoising_steps, device=unet.device)
        stop = int(torch.randint(1, config.denoising_steps, (1,), generator=generator))
        height, width = random_latent_size(unet.config.sample_size, config.dynamic_resolution, generator)
        noise = initial_noise(unet, height, width, generator) * ddim.init_noise_sigma
        with network.active(1.0):
            latents = denoise_partially(unet, ddim, noise, target, empty, config.start_guidance, stop)
        ddim.set_timesteps(1000, device=unet.device)
        timestep = ddim.timesteps[int(stop * 1000 / config.denoising_steps)]
        anchors = anchor_embeddings(target, empty, config.anchor_samples, generator)
        anchor_latents = latents.expand(anchors.shape[0], -1, -1, -1)
        with torch.no_grad(), network.active(0.0):
            positive = predict_noise(unet, latents, timestep, target)
            neutral_noise = predict_noise(unet, latents, timestep, neutral)
            anchor_base = predict_noise(unet, anchor_latents, timestep, anchors)
        with network.active(1.0):
            erased = predict_noise(unet, latents, timestep, target)
            anchor_adapted = predict_noise(unet, anchor_latents, timestep, anchors)
        erase_target = neutral_noise - config.erase_guidance * (positive - neutral_noise)
        loss = F.mse_loss(erased, erase_target) + config.anchor_strength * F.mse_loss(anchor_adapted, anchor_base)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def train(config: SPMConfig, pipe, concept: Concept, out_dir: Path) -> None:
    # The official code trains in fp32; a half-precision pipe gets an fp32 copy of its UNet to train with.
    unet = pipe.unet if pipe.unet.dtype == torch.float32 else copy.deepcopy(pipe.unet).float()
    network = SPMNetwork(unet, config.seed)  # hooked into the UNet for training, never registered in it
    try:
        losses = train_adapters(config, pipe, unet, network, concept.erase_prompt)
    finally:
        network.remove()
    weights = {name: value.detach().cpu().contiguous() for name, value in network.adapters.state_dict().items()}
    metadata = {"prompts": concept.erase_prompt, "rank": "1", "alpha": "1.0"}
    save_file(weights, str(Path(out_dir) / ADAPTER_FILE), metadata=metadata)
    write_card(
        out_dir,
        "spm",
        config,
        concept,
        erase_prompt=concept.erase_prompt,
        adapted_modules=len(network.adapters),
        adapter_parameters=sum(p.numel() for p in network.adapters.parameters()),
        **loss_summary(losses),
    )


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> None:
    """Attach the trained adapters to ``pipe.unet`` at multiplier ``strength`` (idempotent; 0 = base)."""
    path = Path(artifact_dir) / ADAPTER_FILE
    if not path.exists():
        raise DuobenchError(f"{artifact_dir} holds no {ADAPTER_FILE}; it is not an SPM artifact.")
    with safe_open(str(path), "pt") as handle:
        erased_prompts = (handle.metadata() or {}).get("prompts", "").split(",")
    fixed_multiplier = read_card(Path(artifact_dir))["config"].get("fixed_multiplier")
    network = attach(pipe.unet)
    weights = load_file(str(path))
    expected = set(network.adapters.state_dict())
    if set(weights) != expected:
        raise DuobenchError(
            f"The adapters in {path} do not fit this UNet ({len(set(weights) ^ expected)} keys differ); "
            "they were trained on a different base architecture."
        )
    network.adapters.load_state_dict(weights)
    network.requires_grad_(False)
    network.set_inference(pipe, strength, fixed_multiplier, erased_prompts)


SPM = MethodSpec(
    name="spm",
    config_cls=SPMConfig,
    train=train,
    apply=apply,
    description="SPM: rank-1 membrane adapters with latent anchoring and facilitated transport",
    seed_fields=("seed",),
)
