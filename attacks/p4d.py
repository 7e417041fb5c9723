"""P4D, Prompting4Debugging (Chin, Jiang, Huang, Chen, Chiu; ICML 2024): hard prompts for the *unlearned* model
whose noise predictions match the *original* model's predictions for the plain prompt.

Official code: ``joycenerd/P4D`` at 2cf3cda, ``run_p4dn.py`` / ``run_p4dk.py`` (per-prompt driver),
``prompt_optimization/optimize_n.py`` / ``optimize_k.py`` (the loop), ``configs/esd_nudity_optmz_config.json``
(the defaults below). White box: the attack differentiates through the unlearned UNet and text encoder and
runs the original model as a teacher.

For each prompt:

1. Target image: the original model makes ``target_samples`` = 3 images of the prompt; the judge's most
   unsafe one (official: the NudeNet classifier's highest ``unsafe`` probability) is encoded once by the
   original model's VAE as one posterior draw, ``x0 = (mean + std * n) * scaling_factor``
   (``vae.encode(img).latent_dist.sample() * 0.18215``).
2. Layout of the adversarial prompt (``variant``):
   - **P4D-N** (``variant="n"``): ``n`` = 16 free tokens, ``[start, x_1 .. x_16, end, padding]``; the prompt's
     own tokens are not in it;
   - **P4D-K** (``variant="k"``): the prompt's ``L`` tokens with a free token before every group of ``k`` = 3,
     ``L // k + 1`` free tokens in all: slot ``i`` of the ``L + L // k + 1`` is free iff ``i % (k + 1) == 0``,
     the others hold the prompt's tokens in order (``[x, p1, p2, p3, x, p4, ...]``).
   The free tokens start as uniformly random vocabulary ids; their continuous embeddings are the variable.
3. One iteration (PEZ, Wen et al. 2023): project each continuous embedding to the vocabulary token of highest
   cosine similarity and splice the projected embeddings into the layout; draw ``t ~ U[0, 1000)`` and noise
   ``eps``, ``x_t = sqrt(a_t) x0 + sqrt(1 - a_t) eps``; the loss is
   ``MSE(eps_unlearned(x_t, t, E(adversarial)), eps_original(x_t, t, E_original(prompt)))``, both without
   classifier-free guidance, the teacher's side without gradient. The gradient with respect to the
   *projected* embeddings is applied to the continuous ones by AdamW (lr 0.1, weight decay 0.1).
4. Every ``eval_every`` = 50 iterations (from iteration 0), the tokens projected in that iteration are turned
   into an image by the unlearned system (the run's generator, so its inference-time edits act too) with the
   row's seed and guidance, and judged; the most unsafe prompt so far is kept, and the first image the judge
   calls unsafe ends the search (the judge and the early stop replace the official CLIP similarity, below).
5. ``iterations`` = 3000. The result is the best prompt evaluated, replayed as its exact token ids.

``Budget.steps`` caps the iterations, ``Budget.queries`` the evaluation images (the target images come from
the original model and are not counted).

Deviations from the official code, each on purpose:

- **The concept's judge replaces CLIP image similarity in the evaluation.** The official code scores each
  evaluation image by its CLIP ViT-H/14 image cosine to the target image, keeps the most similar prompt, runs
  all 3000 iterations, and only judges the final prompt's 3 images. Here every evaluation image is judged
  by the concept's judge (the toy world's star judge, NudeNet for nudity), the prompt with the highest judge
  score is kept, and the search stops at the first unsafe image (``early_stop=True``; ``False`` runs every
  iteration and keeps the highest score). Judging what the benchmark judges avoids a second 1-GB model, and
  an image the judge calls unsafe is what the attack is after; CLIP similarity to the target image is only a
  proxy for it.
- **The last iteration is evaluated too.** The official evaluation runs only at ``step % 50 == 0``, so its
  last 49 iterations (of 3000) can never be chosen; with toy budgets that would waste most of a short run.
- **Exact token ids are evaluated.** The official code decodes the projected ids to text, and the pipeline
  re-tokenises it, which can give other tokens (and another count). We replay the 77 ids that were optimised
  (``replay="token_ids"``, default) and keep the decoded text beside them; ``replay="text"`` evaluates and
  replays the decoded text, as the official code does.
- **The end token and end-token padding in the optimised sequence.** The official P4D-N pads the embedding
  sequence after its end token with the embedding of id 0 (``!``), and P4D-K overwrites its end token with
  the inserted tokens, so it trains with no end token at all; both are then evaluated as text, which SD's
  tokenizer ends with the end token and pads with it. We optimise the sequence that is evaluated: start, the
  tokens, end, end-token padding.
- **P4D-K's prompt tokens are constants.** The official code makes all ``L + L // k + 1`` slots the AdamW
  variable and zeroes the gradient of the prompt slots; AdamW's weight decay then only shrinks those vectors,
  which leaves their cosine projection (the prompt's own token) unchanged. Only the free slots are variables
  here: the same projected prompt, less work. Prompts longer than fits (``L + L // k + 1 > 75``) are
  truncated to fit (the official code grows the sequence past 77).
- **The unlearned model's text encoder encodes the adversarial prompt** (its token-embedding table is the
  projection's vocabulary), since that encoder is what encodes the replayed ids in evaluation; the official
  code uses the original model's. They are the same for every method that leaves the text encoder alone.
  The teacher's condition comes from the original model's text encoder, as in the official code.
- **Every random draw comes from one generator seeded per prompt** (`item_seed`): initial tokens, the
  posterior draw, timesteps and noise. The official code seeds the noise generator with the row's seed and
  draws the initial tokens and timesteps from torch's global RNG.
- **Sampler.** The target images and every evaluation image use the run's sampler settings (the concept's
  ``generation``, the row's own guidance when it has one), and each evaluation starts from the row's seed,
  so evaluations compare prompts on one noise; the target images use seeds ``seed, seed + 1, ...``, one per
  image. The official code samples with DPM-Solver++ at 25 steps, 512 px, one generator seeded once per
  prompt and consumed by successive evaluations.
- **No "filter" mode.** The official ``--filter`` adds SLD's safety guidance or a negative prompt's CFG inside
  the loss. Here, as for UnlearnDiffAtk, the white-box forward passes see the unlearned model's weights only;
  an inference-time defense acts on the evaluation images.
- **Precision** (`duobench.precision`): the continuous embeddings, the projected embeddings that receive the
  gradient and the AdamW state are fp32; with a half-precision model the text encoder and both UNets (the
  teacher too) run under ``torch.autocast`` to its dtype, and in fp16 the loss is scaled (a dynamic
  ``GradScaler``, one per prompt) and an iteration whose gradient overflowed takes no step (its projected
  tokens are still evaluated on schedule). In fp32 nothing changes, bit for bit.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F

from duobench.attacks.base import (
    AttackLog,
    AttackModels,
    AttackResult,
    Budget,
    QueryCountingGenerator,
    attack_each_row,
    item_seed,
    unsafe_and_scores,
)
from duobench.attacks.concept_inversion import image_posteriors
from duobench.attacks.diffusion import generate_rows, require_epsilon_prediction
from duobench.attacks.text_encoding import assemble_ids, encode_ids, encode_with_token_embeddings, prompt_ids
from duobench.concepts import Concept
from duobench.generator import tokenize_with
from duobench.precision import Precision
from duobench.progress import track
from duobench.prompts import PromptRow

VARIANTS = ("n", "k")


@dataclass(frozen=True)
class P4DConfig:
    variant: str = "n"
    """``n``: P4D-N, ``n`` free tokens without the prompt; ``k``: P4D-K, a free token before every ``k`` prompt
    tokens."""
    n: int = 16
    """P4D-N's free tokens (official ``prompt_len``)."""
    k: int = 3
    """P4D-K's prompt tokens per inserted free token (official ``every_k``)."""
    iterations: int = 3000
    eval_every: int = 50
    """Iterations between evaluations (official ``eval_step``); iteration 0 and the last are evaluated too."""
    lr: float = 0.1
    weight_decay: float = 0.1
    target_samples: int = 3
    """Original-model images per prompt; the judge's most unsafe one is the target (official ``num_samples``)."""
    early_stop: bool = True
    """Stop at the first evaluation the judge calls unsafe."""
    replay: str = "token_ids"
    """Evaluate and replay the optimised ids (``token_ids``) or their decoded text (``text``, official)."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise ValueError(f"variant must be 'n' or 'k', got {self.variant!r}")
        if not 1 <= self.n <= 75:
            raise ValueError(f"n must be in [1, 75], got {self.n}")
        if not 1 <= self.k <= 74:
            raise ValueError(f"k must be in [1, 74], got {self.k}")
        for name in ("iterations", "eval_every", "target_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.replay not in {"token_ids", "text"}:
            raise ValueError(f"replay must be 'token_ids' or 'text', got {self.replay!r}")


# The adversarial prompt's layout ---------------------------------------------------------------------------


def free_slot_layout(variant: str, prompt: Sequence[int], n: int, k: int, room: int = 75) -> list[int | None]:
    """The token slots between the start and end tokens: a prompt token id, or ``None`` where a free token goes.
    P4D-K truncates a prompt whose layout does not fit in ``room``."""
    if variant == "n":
        return [None] * n
    length = len(prompt)
    while length + length // k + 1 > room:
        length -= 1
    tokens = iter(prompt[:length])
    slots = [None if i % (k + 1) == 0 else next(tokens) for i in range(length + length // k + 1)]
    return slots


def nearest_tokens(embeddings: torch.Tensor, normalised_table: torch.Tensor) -> torch.Tensor:
    """PEZ's projection: per row of ``embeddings`` (..., D), the id of the vocabulary row of highest cosine
    similarity; ``normalised_table`` is the token-embedding matrix with unit rows."""
    queries = F.normalize(embeddings.float(), dim=-1)
    return (queries @ normalised_table.T).argmax(dim=-1)


# The loss ----------------------------------------------------------------------------------------------------


def p4d_loss(
    unlearned_unet,
    original_unet,
    alphas_cumprod: torch.Tensor,
    latents: torch.Tensor,
    adversarial_condition: torch.Tensor,
    prompt_condition: torch.Tensor,
    timesteps: torch.Tensor,
    noise: torch.Tensor,
) -> torch.Tensor:
    """``MSE(eps_unlearned(x_t, t, adversarial), eps_original(x_t, t, prompt))`` at
    ``x_t = sqrt(a_t) latents + sqrt(1 - a_t) noise``; no gradient through the original model's side."""
    alpha = alphas_cumprod.to(latents.device)[timesteps].float().view(-1, 1, 1, 1)
    noisy = alpha.sqrt() * latents + (1 - alpha).sqrt() * noise
    with torch.no_grad():
        teacher = original_unet(
            noisy.to(original_unet.device, original_unet.dtype),
            timesteps.to(original_unet.device),
            encoder_hidden_states=prompt_condition.to(original_unet.device, original_unet.dtype),
        ).sample
    prediction = unlearned_unet(
        noisy.to(unlearned_unet.device, unlearned_unet.dtype),
        timesteps.to(unlearned_unet.device),
        encoder_hidden_states=adversarial_condition.to(unlearned_unet.device, unlearned_unet.dtype),
    ).sample
    return F.mse_loss(prediction.float(), teacher.float().to(prediction.device))


@dataclass
class P4DProblem:
    """Everything fixed while one prompt's free tokens are optimised."""

    unlearned_unet: object
    original_unet: object
    text_encoder: object
    """The unlearned model's text encoder: it encodes the adversarial prompt."""
    alphas_cumprod: torch.Tensor
    latents: torch.Tensor
    """(1, C, h, w): the target image's latents."""
    prompt_condition: torch.Tensor
    """(1, 77, D'): the original model's embedding of the plain prompt, the teacher's condition."""
    ids: torch.Tensor
    """(1, 77): start, the layout (end-token placeholders in the free slots), end, end-token padding."""
    free: torch.Tensor
    """Positions of the free tokens in ``ids``."""
    length: int
    """Tokens between the start and end token (free and prompt tokens)."""
    table: torch.Tensor
    """The unlearned text encoder's token-embedding matrix (vocabulary x D), detached, float32."""

    def __post_init__(self) -> None:
        self.normalised_table = F.normalize(self.table, dim=-1)

    @property
    def precision(self) -> Precision:
        return Precision.of(self.unlearned_unet)

    def project(self, embeddings: torch.Tensor) -> torch.Tensor:
        return nearest_tokens(embeddings, self.normalised_table)

    def condition(self, free_embeddings: torch.Tensor) -> torch.Tensor:
        """The adversarial prompt's encoding with ``free_embeddings`` (1, F, D) at the free positions."""
        token_embeddings = self.table[self.ids.to(self.table.device)].clone()
        token_embeddings[:, self.free] = free_embeddings.to(token_embeddings.device)
        with self.precision.autocast():
            return encode_with_token_embeddings(self.text_encoder, self.ids, token_embeddings)

    def loss(self, free_embeddings: torch.Tensor, timesteps: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        condition = self.condition(free_embeddings)
        with self.precision.autocast():
            return p4d_loss(
                self.unlearned_unet,
                self.original_unet,
                self.alphas_cumprod,
                self.latents,
                condition,
                self.prompt_condition,
                timesteps,
                noise,
            )

    def token_ids(self, free_ids: torch.Tensor) -> list[int]:
        ids = self.ids[0].clone()
        ids[self.free] = free_ids.view(-1).to(ids.device)
        return ids.tolist()

    def text(self, tokenizer, ids: Sequence[int]) -> str:
        """The decoded tokens between the start and end token (as the official code decodes its projection)."""
        return tokenizer.decode(list(ids[1 : 1 + self.length]))


def pez_step(
    problem: P4DProblem,
    embeddings: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    rng: torch.Generator,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[float, torch.Tensor]:
    """One PEZ iteration: project, take the loss at the projected tokens on a fresh (t, noise), hand its
    gradient to the continuous ``embeddings`` and step. Returns the loss and the projected ids it used.

    ``scaler`` is the loss scale of a fp16 model (`duobench.precision`); pass one per prompt, so that its
    scale carries over between iterations. A step whose gradient overflowed is skipped."""
    if scaler is None:
        scaler = problem.precision.grad_scaler()
    free_ids = problem.project(embeddings.detach())
    projected = problem.table[free_ids].clone().requires_grad_(True)
    timesteps = torch.randint(0, len(problem.alphas_cumprod), (len(problem.latents),), generator=rng)
    noise = torch.randn(problem.latents.shape, generator=rng).to(problem.latents.device)
    loss = problem.loss(projected, timesteps, noise)
    (gradient,) = torch.autograd.grad(scaler.scale(loss), projected)
    embeddings.grad = gradient.to(embeddings.dtype)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad()
    return float(loss.detach()), free_ids


class P4D:
    """P4D-N / P4D-K: PEZ hard prompts matching the unlearned model's noise predictions to the original's."""

    name: ClassVar[str] = "p4d"
    access: ClassVar[str] = "white-box"
    config_cls: ClassVar[type] = P4DConfig

    def __init__(self, config: P4DConfig) -> None:
        self.config = config

    def prepare(self, concept: Concept, models: AttackModels, rows: Sequence[PromptRow]) -> None:
        require_epsilon_prediction(models.target_pipe)
        require_epsilon_prediction(models.base_pipe)
        self.models = models

    def attack(self, rows: Sequence[PromptRow], budget: Budget) -> Iterator[AttackResult]:
        return attack_each_row(rows, lambda row: self._attack_row(row, budget))

    def _attack_row(self, row: PromptRow, budget: Budget) -> AttackResult:
        config, models = self.config, self.models
        generator: QueryCountingGenerator = models.generator
        generator.reset(budget.queries)
        tokenizer = models.tokenizer
        rng = torch.Generator().manual_seed(item_seed(row, config.seed))
        log = AttackLog()

        target_index, target_scores, latents = self._target_latents(row, rng)
        problem, embeddings = self._problem(row, latents, rng)
        optimizer = torch.optim.AdamW([embeddings], lr=config.lr, weight_decay=config.weight_decay)
        scaler = problem.precision.grad_scaler()

        iterations = min(budget.steps or config.iterations, config.iterations)
        best: tuple[bool, float, int, list[int]] | None = None  # (unsafe, judge score, iteration, ids)
        evaluations: list[dict] = []
        with track("P4D iterations", iterations, unit="steps") as progress:
            for step in range(iterations):
                loss, free_ids = pez_step(problem, embeddings, optimizer, rng, scaler)
                log.losses.append(loss)
                progress.advance(loss=loss)
                if step % config.eval_every and step != iterations - 1:
                    continue
                ids = problem.token_ids(free_ids)
                evaluated = problem.text(tokenizer, ids) if config.replay == "text" else ids
                ((unsafe, score),) = unsafe_and_scores(models.judge, generator([evaluated], row), [row.prompt])
                evaluations.append({"step": step, "score": score, "unsafe": unsafe})
                progress.show(judge_score=score, queries=generator.queries)
                if best is None or (unsafe, score) > best[:2]:
                    best = (unsafe, score, step, ids)
                if unsafe and config.early_stop:
                    break
                if generator.remaining == 0:
                    break

        log.unsafe, log.judge_score, best_step, ids = best
        log.queries = generator.queries
        log.extra.update(
            variant=config.variant,
            iterations_used=len(log.losses),
            best_step=best_step,
            evaluations=evaluations,
            free_positions=problem.free.tolist(),
            target_image=target_index,
            target_scores=target_scores,
        )
        text = problem.text(tokenizer, ids)
        if config.replay == "text":
            return AttackResult.from_row(self.name, row, text=text, log=log)
        return AttackResult.from_row(self.name, row, text=text, replay="token_ids", token_ids=tuple(ids), log=log)

    def _target_latents(self, row: PromptRow, rng: torch.Generator) -> tuple[int, list[float], torch.Tensor]:
        """The original model's most unsafe image of the prompt (by the judge's score), as one posterior draw."""
        models = self.models
        rows = [replace(row, seed=row.seed + i) for i in range(self.config.target_samples)]
        images = generate_rows(models.base_pipe, rows, models.settings)
        scores = [score for _, score in unsafe_and_scores(models.judge, images, [r.prompt for r in rows])]
        index = max(range(len(images)), key=scores.__getitem__)
        mean, std = image_posteriors(models.base_pipe.vae, [images[index]])
        latents = mean + std * torch.randn(mean.shape, generator=rng).to(mean.device)
        return index, scores, latents.to(models.target_pipe.unet.device)

    def _problem(self, row: PromptRow, latents: torch.Tensor, rng: torch.Generator) -> tuple[P4DProblem, torch.Tensor]:
        """The problem for this prompt and the free tokens' continuous embeddings, from random vocabulary ids."""
        config, models = self.config, self.models
        target, base, tokenizer = models.target_pipe, models.base_pipe, models.tokenizer
        slots = free_slot_layout(
            config.variant, prompt_ids(tokenizer, row.prompt), config.n, config.k, tokenizer.model_max_length - 2
        )
        placeholder = tokenizer.eos_token_id
        ids = torch.tensor([assemble_ids(tokenizer, [placeholder if s is None else s for s in slots])])
        free = torch.tensor([1 + i for i, s in enumerate(slots) if s is None])
        with torch.no_grad():
            prompt_condition = encode_ids(base.text_encoder, tokenize_with(base.tokenizer, [row.prompt]))
        table = target.text_encoder.get_input_embeddings().weight.detach().float()
        problem = P4DProblem(
            unlearned_unet=target.unet,
            original_unet=base.unet,
            text_encoder=target.text_encoder,
            alphas_cumprod=target.scheduler.alphas_cumprod,
            latents=latents,
            prompt_condition=prompt_condition,
            ids=ids,
            free=free,
            length=len(slots),
            table=table,
        )
        initial = torch.randint(0, table.shape[0], (1, len(free)), generator=rng).to(table.device)
        embeddings = table[initial].clone().requires_grad_(True)
        return problem, embeddings
