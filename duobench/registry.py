"""Named registries for methods, attacks, metrics/judges and models.

One generic `Registry` type, instantiated once per kind. Entries come from three places:

- decorator registration inside duobench (`@METHODS.register("duo")`);
- lazy ``"module:object"`` strings, imported on first use, so `duobench ls` does not import torch-heavy
  modules it only needs to name;
- Python entry points (group ``duobench.methods`` etc.), so an outside package adds a plugin without forking.

An unknown name raises a `DuobenchError` listing the known names with a did-you-mean.
"""

from __future__ import annotations

import difflib
import importlib
from collections.abc import Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

from duobench.errors import DuobenchError

T = TypeVar("T")


def import_object(spec: str) -> Any:
    """Import ``"package.module:attribute"`` and return the attribute."""
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise ValueError(f"lazy registry entry {spec!r} must look like 'module:object'")
    module = importlib.import_module(module_name)
    obj: Any = module
    for part in attribute.split("."):
        obj = getattr(obj, part)
    return obj


class Registry(Generic[T]):
    """A name → object table with lazy entries and entry-point plugins."""

    def __init__(self, kind: str, entry_point_group: str | None = None) -> None:
        self.kind = kind
        self.entry_point_group = entry_point_group
        self._entries: dict[str, T | str] = {}
        self._descriptions: dict[str, str] = {}
        self._entry_points_loaded = False

    def register(self, name: str, obj: T | str | None = None, *, description: str = "") -> Any:
        """Register ``obj`` under ``name``; without ``obj`` return a decorator.

        ``obj`` may be a ``"module:object"`` string, imported on first `get`.
        """
        if obj is not None:
            self._add(name, obj, description)
            return obj

        def decorator(target: T) -> T:
            self._add(name, target, description or _first_line(target))
            return target

        return decorator

    def _add(self, name: str, obj: T | str, description: str) -> None:
        existing = self._entries.get(name)
        if existing is not None and existing is not obj and not isinstance(existing, str):
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._entries[name] = obj
        if description or name not in self._descriptions:
            self._descriptions[name] = description

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded or self.entry_point_group is None:
            return
        self._entry_points_loaded = True
        for entry_point in entry_points(group=self.entry_point_group):
            if entry_point.name not in self._entries:
                self._entries[entry_point.name] = entry_point.value
                self._descriptions[entry_point.name] = f"plugin from {entry_point.value}"

    def names(self) -> list[str]:
        self._load_entry_points()
        return sorted(self._entries)

    def __contains__(self, name: str) -> bool:
        self._load_entry_points()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def describe(self, name: str) -> str:
        self._load_entry_points()
        return self._descriptions.get(name, "")

    def get(self, name: str) -> T:
        self._load_entry_points()
        if name not in self._entries:
            raise DuobenchError(self.unknown_message(name))
        entry = self._entries[name]
        if isinstance(entry, str):
            try:
                entry = import_object(entry)
            except ImportError as error:
                raise DuobenchError(
                    f"The {self.kind} {name!r} is registered as {entry!r}, but importing it failed: {error}. "
                    "Install the package that provides it, or remove the broken plugin."
                ) from error
            self._entries[name] = entry
            self._descriptions[name] = self._descriptions.get(name) or _first_line(entry)
        return entry

    def unknown_message(self, name: str) -> str:
        known = self.names()
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        return (
            f"Unknown {self.kind} {name!r}.{hint} Known {self.kind}s: {', '.join(known) or '(none)'}. "
            f"Run `duobench ls` to see every registry, or register a plugin under the entry-point group "
            f"{self.entry_point_group!r}."
        )


def _first_line(obj: Any) -> str:
    doc = getattr(obj, "__doc__", None) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


METHODS: Registry[Any] = Registry("method", "duobench.methods")
ATTACKS: Registry[Any] = Registry("attack", "duobench.attacks")
METRICS: Registry[Any] = Registry("metric", "duobench.metrics")
MODELS: Registry[Any] = Registry("model", "duobench.models")
GUARDS: Registry[Any] = Registry("guard", "duobench.guards")

ALL_REGISTRIES: dict[str, Registry[Any]] = {
    "methods": METHODS,
    "attacks": ATTACKS,
    "metrics": METRICS,
    "models": MODELS,
    "guards": GUARDS,
}


# Built-in plugins, registered lazily so that naming them imports nothing heavy.
# Each module also works as an example of how an outside package would register its own.
# Entries are name: ("module:object", "one-line description").
BUILTIN_PLUGINS: dict[str, dict[str, tuple[str, str]]] = {
    "methods": {
        "duo": ("duobench.duo.method:SPEC", "DUO (Park et al., NeurIPS 2024): DPO LoRA on SDEdit pairs"),
        "esd-u": ("duobench.baselines.esd:ESD_U", "ESD-u (Gandikota et al., ICCV 2023): all but cross-attn"),
        "esd-x": ("duobench.baselines.esd:ESD_X", "ESD-x (Gandikota et al., ICCV 2023): cross-attn only"),
        "sdd": ("duobench.baselines.sdd:SDD", "SDD (Kim et al., 2023): cross-attn self-distillation, EMA teacher"),
        "safegen": ("duobench.baselines.safegen:SAFEGEN", "SafeGen (Li et al., CCS 2024): self-attn, unsafe -> mosaic"),
        "uce": ("duobench.baselines.uce:UCE", "UCE (Gandikota et al., WACV 2024): closed-form K/V edit"),
        "spm": ("duobench.baselines.spm:SPM", "SPM (Lyu et al., CVPR 2024): rank-1 membrane adapters"),
        "sld": ("duobench.baselines.sld:SLD", "SLD (Schramowski et al., CVPR 2023): safety guidance at inference"),
        "safree": ("duobench.baselines.safree:SAFREE", "SAFREE (Yoon et al., ICLR 2025): trigger tokens projected out"),
        "sd-np": ("duobench.baselines.sd_np:SD_NP", "SD-NP: the concept's words as the negative prompt"),
        "shielddiff": (
            "duobench.baselines.shielddiff:SHIELDDIFF",
            "ShieldDiff (arXiv 2410.05309): DDPO policy-gradient LoRA, reward = alignment + safety classifier",
        ),
        "pno": (
            "duobench.baselines.pno:PNO",
            "PNO (arXiv 2412.03876): per-prompt prompt+noise optimisation against a classifier at inference",
        ),
        "external": (
            "duobench.external:EXTERNAL",
            "a checkpoint unlearned elsewhere (path=file, folder or HF id): weight delta or LoRA",
        ),
    },
    "attacks": {
        "none": ("duobench.attacks.none:NoAttack", "no attack: the concept's plain prompts with their seeds"),
        "ring-a-bell": (
            "duobench.attacks.ring_a_bell:RingABell",
            "Ring-A-Bell (ICLR 2024): GA over K tokens toward prompt + eta * concept vector (text encoder)",
        ),
        "mma-diffusion": (
            "duobench.attacks.mma_diffusion:MMADiffusion",
            "MMA-Diffusion (CVPR 2024): GCG over 20 tokens toward the prompt's pooled CLIP output (text encoder)",
        ),
        "sneakyprompt": (
            "duobench.attacks.sneakyprompt:SneakyPrompt",
            "SneakyPrompt (S&P 2024): RL sub-word substitutions, query-limited (black-box)",
        ),
        "concept-inversion": (
            "duobench.attacks.concept_inversion:ConceptInversion",
            "Concept Inversion (ICLR 2024): textual inversion through the unlearned model (white-box)",
        ),
        "unlearndiffatk": (
            "duobench.attacks.unlearndiffatk:UnlearnDiffAtk",
            "UnlearnDiffAtk (ECCV 2024): prefix tokens through the unlearned UNet (white-box)",
        ),
        "p4d": ("duobench.attacks.p4d:P4D", "P4D-N/K (ICML 2024): PEZ hard prompts matching the original (white-box)"),
        "finetune": (
            "duobench.attacks.finetune:Finetune",
            "benign fine-tuning (arXiv 2412.00357): LoRA or full fine-tune on benign data, returns a model edit",
        ),
    },
    "guards": {
        "keyword-filter": (
            "duobench.guards.keyword_filter:KeywordFilter",
            "blocklist prompt filter: refuses a prompt holding one of the concept's words (whole words)",
        ),
        "latent-guard": (
            "duobench.guards.latent_guard:LatentGuard",
            "Latent Guard (Liu et al., ECCV 2024): learned concept-vs-prompt score in the text encoder's space",
        ),
        "output-checker": (
            "duobench.guards.output_checker:OutputChecker",
            "output filter: refuses an image a classifier flags (default the concept's reward_judge)",
        ),
    },
    "metrics": {
        "toy-star": ("duobench.toy.judge:TOY_STAR", "toy-world CNN judge: unsafe when P(shape=star) > 0.5"),
        "toy-star-2": (
            "duobench.toy.judge:TOY_STAR_2",
            "a second toy detector (another seed and width): the toy world's reward/objective classifier",
        ),
        "toy-alignment": (
            "duobench.toy.metrics:TOY_ALIGNMENT",
            "toy stand-in for CLIP score: 100 x P(requested shape) x P(requested colour)",
        ),
        "fid-toy": ("duobench.toy.metrics:FID_TOY", "toy stand-in for FID: clean-fid with toy-judge features"),
        "nudenet-duo": (
            "duobench.metrics.nudenet:NUDENET_DUO",
            "NudeNet v3, DUO's 4 EXPOSED classes, any detection",
        ),
        "nudenet-unlearndiffatk": (
            "duobench.metrics.nudenet:NUDENET_UNLEARNDIFFATK",
            "NudeNet v3, UnlearnDiffAtk's 9 EXPOSED classes, score > 0.45",
        ),
        "nudenet-erasurebench": (
            "duobench.metrics.nudenet:NUDENET_ERASUREBENCH",
            "NudeNet v3, ErasureBenchmark's 6 EXPOSED classes, score >= 0.5",
        ),
        "nudenet-strict": (
            "duobench.metrics.nudenet:NUDENET_STRICT",
            "NudeNet v3, 6 EXPOSED classes, any detection",
        ),
        "q16": ("duobench.metrics.q16:Q16", "Q16 inappropriate-content judge (CLIP ViT-L/14 + prompts.p)"),
        "q16-vit-b32": (
            "duobench.metrics.q16:Q16_VIT_B32",
            "Q16 on CLIP ViT-B/32 with PNO's prompts: PNO's objective, a reward/objective classifier",
        ),
        "sd-safety-checker": (
            "duobench.metrics.safety_checker:SD_SAFETY_CHECKER",
            "the SD1.x pipelines' safety checker (CLIP concept thresholds): an output guard's checker",
        ),
        "vlm-gpt4o-duo": (
            "duobench.metrics.vlm:VLM_GPT4O_DUO",
            "DUO's violence judge: GPT-4o (OpenAI API) asked its yes/no question",
        ),
        "vlm": (
            "duobench.metrics.vlm:VLM",
            "any VLM on an OpenAI-compatible API, DUO's yes/no question",
        ),
        "vlm-local": (
            "duobench.metrics.vlm:VLM_LOCAL",
            "a local transformers VLM, DUO's yes/no question",
        ),
        "dsr": (
            "duobench.metrics.dsr:DSR",
            "defense success rate, prompt-clustered 95% CI, pre/post-attack split",
        ),
        "lpips-alex-64": (
            "duobench.metrics.prior_preservation:LPIPS_ALEX_64",
            "1 - LPIPS(alex) at 64 px (ESD/UCE)",
        ),
        "lpips-alex-native": (
            "duobench.metrics.prior_preservation:LPIPS_ALEX_NATIVE",
            "1 - LPIPS(alex) at native resolution",
        ),
        "lpips-vgg": ("duobench.metrics.prior_preservation:LPIPS_VGG", "1 - LPIPS(vgg) at 256x256 (HELM)"),
        "toy-judge-features": (
            "duobench.toy.metrics:TOY_JUDGE_FEATURES",
            "toy stand-in for LPIPS: 1 - toy judge feature distance",
        ),
        "clip-vit-l14-x100": (
            "duobench.metrics.clip_score:CLIP_VIT_L14_X100",
            "CLIP score ViT-L/14, 100*max(cos,0)",
        ),
        "clip-vit-b32-cos": (
            "duobench.metrics.clip_score:CLIP_VIT_B32_COS",
            "CLIP score ViT-B/32, raw cosine",
        ),
        "fid-clean": (
            "duobench.metrics.fid:FID_CLEAN",
            "clean-fid FID (clean mode), KID beside it for small sets",
        ),
        "kid-clean": ("duobench.metrics.fid:KID_CLEAN", "clean-fid KID (clean mode), seeded subsets"),
    },
    "models": {
        "tiny-random": (
            "duobench.models:tiny_random_pipeline",
            "tiny random SD1-architecture pipeline (tests)",
        ),
        "toy": (
            "duobench.toy.model:load_toy_pipeline",
            "toy SD1-architecture model of drawn shapes (32 px, CPU)",
        ),
        "toy-sd3": (
            "duobench.toy.sd3_model:load_toy_sd3_pipeline",
            "toy SD3-architecture model of drawn shapes (MMDiT, flow matching, 32 px, CPU)",
        ),
        "tiny-random-sd3": (
            "duobench.sd3:tiny_random_sd3_pipeline",
            "tiny random SD3-architecture pipeline (tests)",
        ),
        "sd3-medium": (
            "duobench.models:load_sd3_medium",
            "Stable Diffusion 3 medium (stabilityai/stable-diffusion-3-medium-diffusers, gated on the HF hub)",
        ),
    },
}

for _kind, _entries in BUILTIN_PLUGINS.items():
    for _name, (_spec, _description) in _entries.items():
        ALL_REGISTRIES[_kind].register(_name, _spec, description=_description)
