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
5. AdamW lr 1e-4, cosine with 3 hard restarts after 500 warm-up steps, 3000 iterations, batch 1, fp32
   (mixed precision on a half-precision pipe, below).

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
- Facilitated transport is computed per UNet row, as an edit that wraps the generator (`SPMHook`, the seam
  of `duobench.generator`): around each sampling loop γ is set for every row from the conditioning the
  generator built, the row's embedding for the cosine term and, where known, the ids it was encoded from for
  the token term (text and token-id prompts, and the negative prompt; not a replayed embedding such as an
  inverted concept, nor another edit's extra rows, which get the cosine term alone). So under
  classifier-free guidance the unconditional row gets γ(negative prompt) rather than the prompt's γ (the
  official code scaled the whole network by the prompt's γ for both rows). Callers that bypass the generator
  and call the UNet directly (white-box attacks) still meet SPM: a UNet pre-hook computes γ from the call's
  own ``encoder_hidden_states``, with the cosine term only, since token ids are known only to the generator.
- Precision (`duobench.precision`): the adapters and their AdamW state are fp32 in every case. The official
  code trains everything in fp32; with a half-precision pipe we instead train on the pipe's own UNet (no
  fp32 copy of it, 3.4 GB on SD1.4) with the loss's forward passes under ``torch.autocast`` to the pipe's
  dtype, and in fp16 the loss is scaled (a dynamic ``GradScaler``; an iteration whose gradient overflowed
  takes no step, its loss is still recorded, and the learning-rate schedule advances regardless). The
  rollout that draws x_t is sampling without gradient and runs as inference does. In fp32 nothing changes,
  bit for bit. At inference the base UNet keeps the pipe's dtype and the fp32 adapters' output is cast to it.

Artifact: ``spm.safetensors`` in the official kohya-style layout (``lora_unet_<module>.lora_down.weight``,
``.lora_up.weight``, ``.alpha``; metadata ``prompts``, ``rank``, ``alpha``), so the authors' released SPMs
load the same way, plus ``card.json``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from duobench.baselines.rollout import denoise_partially, initial_noise, loss_summary, predict_noise
from duobench.concepts import Concept
from duobench.errors import DuobenchError
from duobench.generator import Conditioning, SamplingHook, encode_token_ids, tokenize
from duobench.methods import MethodSpec, read_card, write_card
from duobench.precision import Precision
from duobench.progress import track

ADAPTER_FILE = "spm.safetensors"
KEY_PREFIX = "lora_unet_"
MODULES_PER_TRANSFORMER = 2  # proj_in, proj_out
MODULES_PER_BLOCK = 10  # attn1 q/k/v/out, attn2 q/k/v/out, ff in, ff out


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

    The token term needs the ids a row was encoded from. They are passed in where they are known (the
    generator's conditioning, see `SPMHook`); a row without them (a replayed embedding, another hook's extra
    row, a direct UNet call) gets the cosine term alone.
    """

    def __init__(self, pipe, erased_prompts: list[str]) -> None:
        ids = tokenize(pipe, erased_prompts)
        self.special_ids = set(pipe.tokenizer.all_special_ids)
        self.erased_embeddings = F.normalize(encode_token_ids(pipe, ids).flatten(1).float(), dim=1)
        self.erased_tokens = [self.tokens(row) for row in ids]

    def tokens(self, ids: torch.Tensor) -> set[int]:
        """The prompt's words: its non-special token ids (start, end and padding carry no concept)."""
        return set(ids.tolist()) - self.special_ids

    def gammas(self, embeddings: torch.Tensor, token_ids: Sequence[torch.Tensor | None] = ()) -> torch.Tensor:
        """γ for each row of ``embeddings`` (N × L × D); ``token_ids[i]`` None, or missing, means unknown."""
        flat = F.normalize(embeddings.detach().flatten(1).float(), dim=1)
        clip_cosine = flat @ self.erased_embeddings.to(flat.device).T
        token_overlap = torch.zeros_like(clip_cosine)
        for row, ids in enumerate(token_ids):
            if ids is None:
                continue
            tokens = self.tokens(ids)
            for column, erased in enumerate(self.erased_tokens):
                token_overlap[row, column] = len(tokens & erased) / max(len(erased), 1)
        return torch.maximum(clip_cosine, token_overlap).amax(dim=1)


class SPMNetwork(nn.Module):
    """The adapters of one UNet, run by forward hooks on the layers they sit beside.

    The network is never registered in the UNet, so the UNet's state dict stays the base model's: the image
    cache tells SPM settings apart by the edit chain (`duobench.edits.Edit.identity`), not by weights. The
    adapter output is scaled by ``multiplier · γ²``; ``gammas`` is one γ for every row (1 in training, the
    fixed γ of ``fixed_multiplier``) or, for facilitated transport, a tensor with one γ per UNet row that
    `SPMHook` sets for each UNet call (None until it has).
    """

    def __init__(self, unet, seed: int = 0) -> None:
        super().__init__()
        targets = adapted_modules(unet)
        generator = torch.Generator().manual_seed(seed)
        self.adapters = nn.ModuleDict(
            {KEY_PREFIX + path.replace(".", "_"): RankOneAdapter(module, generator) for path, module in targets.items()}
        )
        self.adapters.to(device=unet.device, dtype=torch.float32)
        self.multiplier = 0.0
        self.gammas: torch.Tensor | float | None = 1.0
        self._adapter_hooks = [
            module.register_forward_hook(self._adapter_hook(adapter))
            for module, adapter in zip(targets.values(), self.adapters.values(), strict=True)
        ]

    @contextlib.contextmanager
    def active(self, multiplier: float) -> Iterator[None]:
        """Run with the adapters scaled by ``multiplier`` (0: the frozen base model), restoring after."""
        saved = self.multiplier
        self.multiplier = float(multiplier)
        try:
            yield
        finally:
            self.multiplier = saved

    def _scale(self, output: torch.Tensor) -> torch.Tensor | float | None:
        if self.multiplier == 0.0:
            return None
        if self.gammas is None:
            raise RuntimeError("SPM's facilitated transport has no γ for this UNet call.")
        if isinstance(self.gammas, float):
            return self.multiplier * self.gammas**2
        gammas = self.gammas.to(output.device)
        if gammas.shape[0] != output.shape[0]:
            raise RuntimeError(f"SPM got {gammas.shape[0]} transport multipliers for a batch of {output.shape[0]}")
        return (self.multiplier * gammas**2).view(-1, *[1] * (output.dim() - 1))

    def _adapter_hook(self, adapter: RankOneAdapter):
        def hook(module, inputs, output):
            scale = self._scale(output)
            if scale is None:
                return None
            change = adapter(inputs[0].to(adapter.lora_up.weight.dtype))
            return output + (scale * change).to(output.dtype)

        return hook

    def remove(self) -> None:
        """Unhook the adapters: the UNet computes the base model again."""
        for handle in self._adapter_hooks:
            handle.remove()
        self._adapter_hooks = []


class SPMHook(SamplingHook):
    """SPM at inference: trained adapters hooked into the UNet, and each UNet row's γ.

    Through the generator, γ is computed once per batch from the conditioning (`unet_call`), for the rows in
    the generator's layout: each row's embedding gives the cosine term, and its token ids the token term
    (prompt rows: the conditioning's ids, None for a replayed embedding; negative rows: the tokenised
    negative prompt; another hook's extra rows: unknown, so the cosine term alone). A UNet call outside a
    sampling loop (white-box attacks call ``pipe.unet`` directly) gets γ from its own
    ``encoder_hidden_states`` by a forward pre-hook: the cosine term only, as the ids are not known there.
    With a fixed γ there is nothing to compute per row.
    """

    name = "spm"

    def __init__(self, pipe, network: SPMNetwork, transport: FacilitatedTransport | None) -> None:
        self.pipe = pipe
        self.network = network
        self.transport = transport
        self._in_loop = False
        self._fallback = (
            pipe.unet.register_forward_pre_hook(self._fallback_hook(), with_kwargs=True) if transport else None
        )

    def row_token_ids(self, rows: torch.Tensor, conditioning: Conditioning) -> list[torch.Tensor | None]:
        """Each UNet row's token ids where known: ``[negative rows, prompt rows, extra rows]`` under
        classifier-free guidance, the prompt rows alone without (`duobench.generator.Generator.denoise`)."""
        count = len(conditioning.token_ids)
        if rows.shape[0] == count:
            return list(conditioning.token_ids)
        negative = list(tokenize(self.pipe, conditioning.negative_prompts))
        return [*negative, *conditioning.token_ids] + [None] * (rows.shape[0] - 2 * count)

    def row_gammas(self, rows: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        return self.transport.gammas(rows, self.row_token_ids(rows, conditioning))

    @contextlib.contextmanager
    def unet_call(self, rows: torch.Tensor, conditioning: Conditioning) -> Iterator[None]:
        if self.transport is None:
            yield
            return
        saved = self.network.gammas, self._in_loop
        self.network.gammas, self._in_loop = self.row_gammas(rows, conditioning), True
        try:
            yield
        finally:
            self.network.gammas, self._in_loop = saved

    def _fallback_hook(self):
        """The UNet pre-hook for calls outside a sampling loop (a closure, like the adapter hooks, so that a
        deep copy of the UNet keeps driving the same adapters)."""

        def hook(module, args, kwargs) -> None:
            if self._in_loop:
                return
            embeddings = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
            self.network.gammas = self.transport.gammas(embeddings) if embeddings is not None else None

        return hook

    def remove(self) -> None:
        """Unhook the adapters and the UNet pre-hook: the UNet computes the base model again."""
        self.network.remove()
        if self._fallback is not None:
            self._fallback.remove()
            self._fallback = None


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


@contextlib.contextmanager
def frozen(*modules: nn.Module | None) -> Iterator[None]:
    """The modules' parameters with ``requires_grad`` off, their flags restored after (the pipe is shared)."""
    flags = {id(p): (p, p.requires_grad) for module in modules if module is not None for p in module.parameters()}
    for parameter, _ in flags.values():
        parameter.requires_grad_(False)
    try:
        yield
    finally:
        for parameter, flag in flags.values():
            parameter.requires_grad_(flag)


def train_adapters(config: SPMConfig, pipe, unet, network: SPMNetwork, target_prompt: str) -> list[float]:
    """Train ``network`` (hooked into ``unet``, a UNet of ``pipe``'s model) to erase ``target_prompt``.

    ``pipe`` provides the text encoder and the noise schedule. Returns the loss per iteration. Only the
    adapters train: the base UNet, text encoder and VAE are frozen meanwhile, as in the official code (else
    every step would compute and keep a gradient for every base tensor).
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
    precision = Precision.of(unet)
    scaler = precision.grad_scaler()
    losses = []
    with (
        frozen(unet, pipe.unet, pipe.text_encoder, getattr(pipe, "vae", None)),
        track("SPM training", config.iterations, unit="iterations") as progress,
    ):
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
            with torch.no_grad(), network.active(0.0), precision.autocast():
                positive = predict_noise(unet, latents, timestep, target)
                neutral_noise = predict_noise(unet, latents, timestep, neutral)
                anchor_base = predict_noise(unet, anchor_latents, timestep, anchors)
            with network.active(1.0), precision.autocast():
                erased = predict_noise(unet, latents, timestep, target)
                anchor_adapted = predict_noise(unet, anchor_latents, timestep, anchors)
            erase_target = neutral_noise - config.erase_guidance * (positive - neutral_noise)
            loss = F.mse_loss(erased, erase_target) + config.anchor_strength * F.mse_loss(anchor_adapted, anchor_base)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.item())
            progress.advance(loss=losses[-1])
    return losses


def train(config: SPMConfig, pipe, concept: Concept, out_dir: Path) -> None:
    # fp32 adapters on the pipe's own UNet, whatever its dtype (mixed precision for a half pipe: module doc).
    network = SPMNetwork(pipe.unet, config.seed)  # hooked into the UNet for training, never registered in it
    try:
        losses = train_adapters(config, pipe, pipe.unet, network, concept.erase_prompt)
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


def load_adapters(unet, path: Path) -> SPMNetwork:
    """The adapters saved at ``path``, hooked into ``unet`` at multiplier 0 (the base model)."""
    weights = load_file(str(path))
    network = SPMNetwork(unet)
    expected = set(network.adapters.state_dict())
    if set(weights) != expected:
        network.remove()
        raise DuobenchError(
            f"The adapters in {path} do not fit this UNet ({len(set(weights) ^ expected)} keys differ); "
            "they were trained on a different base architecture."
        )
    network.adapters.load_state_dict(weights)
    network.requires_grad_(False)
    return network


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> SPMHook:
    """Hook the trained adapters into ``pipe.unet`` at multiplier ``strength`` (0: the base model, bit for bit).

    Every call adds its own adapters (two SPM edits in a chain both act); the returned hook's ``remove``
    takes them out. The adapters stay on the device the UNet was on when applied.
    """
    path = Path(artifact_dir) / ADAPTER_FILE
    if not path.exists():
        raise DuobenchError(f"{artifact_dir} holds no {ADAPTER_FILE}; it is not an SPM artifact.")
    with safe_open(str(path), "pt") as handle:
        erased_prompts = (handle.metadata() or {}).get("prompts", "").split(",")
    fixed_multiplier = read_card(Path(artifact_dir))["config"].get("fixed_multiplier")
    network = load_adapters(pipe.unet, path)
    network.multiplier = float(strength)
    if fixed_multiplier is not None:
        network.gammas = float(fixed_multiplier)
        return SPMHook(pipe, network, None)
    network.gammas = None
    return SPMHook(pipe, network, FacilitatedTransport(pipe, erased_prompts))


SPM = MethodSpec(
    name="spm",
    config_cls=SPMConfig,
    train=train,
    apply=apply,
    description="SPM: rank-1 membrane adapters with latent anchoring and facilitated transport",
    touches=("unet",),
    seed_fields=("seed",),
)
