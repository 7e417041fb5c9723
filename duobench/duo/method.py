"""DUO as a duobench method: its config, `train` (pair data → LoRA) and `apply` (LoRA at a strength).

A concept with sub-concepts (violence: blood, suffering, gun, horror) gets one LoRA per sub-concept, each
trained on its own pair set with the same config. At inference they are summed with the concept's
``duo_sub_concept_weights`` (default 1), as in the official ``inference.py``. The official horror data has
6 pairs, not 32: its prompt is a string where a list was meant, so ``len("horror")`` images are drawn. The
violence concept file asks for 32 horror pairs like the other sub-concepts, which is what the paper means.

The artifact folder holds ``card.json`` and one ``pytorch_lora_weights.safetensors`` per LoRA: at the top for
a single concept, in ``<sub_concept>/`` otherwise. Each file loads with ``pipe.load_lora_weights(folder)``.
Periodic ``checkpoint-<step>/`` folders and a ``training_log.jsonl`` sit beside each file.

On Stable Diffusion 3 (`duobench.models.pipeline_family`) the same steps run with SD3's pieces: pairs from
SD3 and its img2img (`duobench.duo.pairs`), the loss and loop of `duobench.duo.sd3_train`, a LoRA on the
transformer that ``apply`` loads into ``pipe.transformer``; the card adds ``model_family: sd3``. The config's
defaults are SD1's; the official SD3 recipe's ``base_lr=3e-5`` and ``t_min=1`` come from the SD3 concept
(``nudity-sd3``'s ``method_options``), as every model family's settings do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from duobench.concepts import Concept
from duobench.duo.loss import (
    effective_lambda,
    effective_learning_rate,
    encode_pairs,
    train_lora,
)
from duobench.duo.pairs import build_pair_set, load_judge, sub_concepts
from duobench.errors import DuobenchError
from duobench.methods import MethodSpec, apply_lora_artifact, write_card


@dataclass(frozen=True)
class DuoConfig:
    """DUO's hyper-parameters. The defaults are the official nudity script for SD1.4.

    For violence, the official script uses ``beta=1000, steps=500`` per sub-concept (the violence concept's
    ``method_options``). The paper's Table 1 also reports β = 250 for nudity, and Table 2 β = 500 for
    violence. β is part of the artifact key, so a β sweep is a list of configs: each trains once and is cached.

    ``pairs=0`` uses the concept file's pair counts; a positive value rescales them to that total per
    (sub-)concept, which is how a small world trains on a handful of pairs. ``pairs_per_step`` is the
    effective batch: 4, as 4 GPUs × 1 pair in the official run. Gradient accumulation over
    ``micro_batch_pairs`` gives it on any number of devices. Timesteps are drawn from ``[t_min, t_max)``.
    """

    beta: float = 500.0
    base_lr: float = 3e-4
    base_lambda: float = 1e6
    steps: int = 1000
    pairs: int = 0
    pairs_per_step: int = 4
    micro_batch_pairs: int = 1
    t_min: int = 0
    t_max: int = 750
    lora_rank: int = 32
    lora_alpha: float = 32.0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    seed: int = 42
    data_seed: int = 0
    max_tries: int = 10
    generation_batch_size: int = 8
    checkpoint_every: int = 250
    divergence_loss: float = 100.0
    """A loss above this (the loss starts at log 2 ≈ 0.69) is taken as divergence and stops training."""
    mixed_precision: str = "auto"
    """``auto`` follows the UNet's dtype (fp16: autocast with an fp32 LoRA, as official); or no/fp16/bf16."""

    def __post_init__(self) -> None:
        problems = []
        if self.beta <= 0:
            problems.append(f"beta must be > 0 (got {self.beta})")
        for name in (
            "steps",
            "pairs_per_step",
            "micro_batch_pairs",
            "lora_rank",
            "max_tries",
            "checkpoint_every",
        ):
            if getattr(self, name) < 1:
                problems.append(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.pairs < 0:
            problems.append(f"pairs must be >= 0 (got {self.pairs})")
        if not 0 <= self.t_min < self.t_max <= 1000:
            problems.append(f"need 0 <= t_min < t_max <= 1000 (got [{self.t_min}, {self.t_max}))")
        if self.mixed_precision not in {"auto", "no", "fp16", "bf16"}:
            problems.append(f"mixed_precision must be auto, no, fp16 or bf16 (got {self.mixed_precision!r})")
        if problems:
            raise DuobenchError("Bad DUO config: " + "; ".join(problems) + ".")


def train(config: DuoConfig, pipe, concept: Concept, out_dir: Path) -> None:
    """Build (or reuse) each pair set, train one LoRA per (sub-)concept, and write the artifact card.

    The base ``pipe`` is left as it was: the LoRA is removed after training and the scheduler restored.
    """
    from accelerate import PartialState

    from duobench.models import denoiser, pipeline_family, pipeline_fingerprint

    out_dir = Path(out_dir)
    family = pipeline_family(pipe)
    state = PartialState(cpu=denoiser(pipe).device.type == "cpu")
    base_fingerprint = pipeline_fingerprint(pipe)
    judge = load_judge(concept.data_judge)
    if family == "sd3":
        from duobench.duo.sd3_train import sd3_pair_trainer

        train_pairs = sd3_pair_trainer(pipe, config)
    else:
        train_pairs = _sd1_pair_trainer(pipe, config)
    loras = []
    for sub_concept in sub_concepts(concept):
        with state.main_process_first():  # rank 0 builds the pair set; the others then find it cached
            pair_set = build_pair_set(
                pipe,
                concept,
                sub_concept=sub_concept,
                pairs=config.pairs,
                seed=config.data_seed,
                judge=judge,
                base_fingerprint=base_fingerprint,
                batch_size=config.generation_batch_size,
                max_tries=config.max_tries,
            )
        folder = out_dir / sub_concept if sub_concept else out_dir
        history = train_pairs(pair_set, folder)
        if state.is_main_process:
            (folder / "training_log.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
        loras.append(
            {
                "name": sub_concept or concept.name,
                "folder": sub_concept or ".",
                "weight": float(concept.duo_sub_concept_weights.get(sub_concept, 1.0)) if sub_concept else 1.0,
                "pair_set": pair_set.key,
                "pairs": len(pair_set),
                "final_step": history[-1],
            }
        )
    if state.is_main_process:
        write_card(
            out_dir,
            "duo",
            config,
            concept,
            beta=config.beta,
            learning_rate=effective_learning_rate(config.base_lr, config.beta),
            lambda_effective=effective_lambda(config.base_lambda, config.beta),
            steps=config.steps,
            data_judge=judge.card.id if judge is not None else "none",
            base_model=base_fingerprint,
            loras=loras,
            **({"model_family": family} if family != "sd1" else {}),  # SD1 cards stay as they were
        )
    state.wait_for_everyone()


def _sd1_pair_trainer(pipe, config: DuoConfig):
    """``train(pair_set, folder) -> history`` on SD1's UNet: ε-prediction with the DDPM training schedule and
    the CLIP embedding of the empty prompt (`duobench.duo.loss.train_lora`)."""
    from diffusers import DDPMScheduler

    from duobench.generator import encode_token_ids, tokenize

    null_embedding = encode_token_ids(pipe, tokenize(pipe, [""])).detach()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    def train_pairs(pair_set, folder: Path) -> list[dict]:
        latents = encode_pairs(pipe.vae, *pair_set.pixels())
        return train_lora(pipe.unet, noise_scheduler, latents, null_embedding, config, folder)

    return train_pairs


def apply(pipe, artifact_dir: Path, strength: float = 1.0) -> None:
    """Load the artifact's LoRA(s) into ``pipe`` and scale them: ``strength`` is the LoRA scale.

    0 gives the base model and 1 the trained model. Sub-concept LoRAs are each scaled by
    ``strength × weight``. Calling again with another strength only rescales: the weights load once per pipe.
    """
    apply_lora_artifact(pipe, artifact_dir, strength, "DUO")


SPEC = MethodSpec(
    name="duo",
    config_cls=DuoConfig,
    train=train,
    apply=apply,
    description="DUO (Park et al., NeurIPS 2024): preference-optimised LoRA on SDEdit (unsafe, safe) pairs",
    seed_fields=("seed", "data_seed"),
)
