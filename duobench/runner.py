"""`duobench run`: method → attack → generation → judging and metrics → one summary row.

Stages, each cached so that a repeated or interrupted run redoes nothing it finished:

1. **method**: train or load the artifact by config hash (`duobench.methods.train_or_load`), apply it to a
   fresh copy of the base model at ``strength``;
2. **attack**: the attack's prompts for the concept's prompt set (`duobench.attacks.run.run_attack`, cached
   per item);
3. **generation and judging**: the attacked prompts and the plain prompts (pre-attack) with the unlearned
   model, judged by the concept's judge while they generate (DSR with a prompt-bootstrap CI and the
   pre/post-attack split); then the benign prompts with both the base and the unlearned model. Images go
   through the content-addressed store;
4. **metrics**: prior preservation, CLIP score and FID on the benign images; each metric's result (and the
   judge's) is cached by the image keys and its card;
5. **report**: ``summary.json``, ``summary.csv``, ``audit.parquet``, ``config.yaml`` and a contact sheet.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from PIL import Image

from duobench import __version__
from duobench.concepts import Concept, load_concept
from duobench.errors import DuobenchError
from duobench.items import SamplerSettings, WorkItem
from duobench.metrics.base import load_images
from duobench.stages import StageCache, stable_hash

METRIC_DEFAULTS = {
    "prior_preservation": "lpips-alex-64",
    "clip_score": "clip-vit-l14-x100",
    "fid": "fid-clean",
}


@dataclass
class RunConfig:
    """Everything a run depends on; saved as ``config.yaml`` beside the results."""

    method: str = "duo"
    attack: str = "none"
    concept: str = "nudity"
    model: str = "CompVis/stable-diffusion-v1-4"
    strength: float = 1.0
    method_options: dict[str, Any] = field(default_factory=dict)
    attack_options: dict[str, Any] = field(default_factory=dict)
    prompt_set: str = ""
    """A name from the concept's ``prompt_sets`` (default: its first)."""
    limit: int | None = None
    """Only the first N prompts of the prompt set (each with all its seeds)."""
    benign_limit: int | None = None
    attack_steps: int | None = None
    attack_queries: int | None = None
    batch_size: str = "auto"
    device: str | None = None
    out: str = "runs/latest"
    fid_reference: str = ""
    """Folder / ``.npz`` of reference statistics for FID (e.g. MS-COCO val); empty: the base model's
    benign images are the reference, which measures drift from the original model."""
    metrics: dict[str, str] = field(default_factory=dict)
    """Overrides of the concept's metric presets (prior_preservation, clip_score, fid)."""
    bootstrap_seed: int = 0
    threads: int | None = None
    """torch CPU threads. A CPU-trained artifact depends on them (see `duobench.methods.training_numerics`),
    so a run on a CPU records the count it used here, and a re-run of its config uses it again."""


@dataclass
class RunContext:
    """What the stages share: loaded models and the caches."""

    config: RunConfig
    concept: Concept
    base: Any
    base_fingerprint: str
    target: Any
    target_fingerprint: str
    settings: SamplerSettings
    stages: StageCache
    out: Path
    artifact: Path | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    generated: int = 0
    reused: int = 0


def metric_presets(concept: Concept, config: RunConfig) -> dict[str, str]:
    return {**METRIC_DEFAULTS, **concept.metrics, **config.metrics}


def method_options(concept: Concept, method: str, overrides: dict[str, Any]) -> dict[str, Any]:
    """The concept's defaults for this method (sized for its model family) under the user's options."""
    return {**concept.method_options.get(method, {}), **overrides}


def attack_options(concept: Concept, attack: str, overrides: dict[str, Any]) -> dict[str, Any]:
    return {**concept.attack_options.get(attack, {}), **overrides}


def apply_threads(config: RunConfig) -> None:
    """Use the config's torch CPU thread count, if it names one."""
    if config.threads:
        import torch

        torch.set_num_threads(config.threads)


def prepare(config: RunConfig, stages: StageCache | None = None, base=None) -> RunContext:
    """Load the concept and the models, and train or load the method's artifact (stage 1)."""
    from duobench.methods import read_card, train_or_load
    from duobench.models import default_sampler_settings, load_pipeline, pipeline_fingerprint
    from duobench.registry import METHODS

    concept = load_concept(config.concept)
    apply_threads(config)
    base = base if base is not None else load_pipeline(config.model, device=config.device)
    if base.device.type == "cpu":
        import torch

        config.threads = torch.get_num_threads()
    base_fingerprint = pipeline_fingerprint(base)
    settings = default_sampler_settings(base, concept)
    context = RunContext(
        config=config,
        concept=concept,
        base=base,
        base_fingerprint=base_fingerprint,
        target=base,
        target_fingerprint=base_fingerprint,
        settings=settings,
        stages=stages or StageCache(),
        out=Path(config.out),
    )
    if config.method == "none":
        return context
    artifact, method_config, _ = train_or_load(
        config.method, base, concept, base_fingerprint, method_options(concept, config.method, config.method_options)
    )
    target = load_pipeline(config.model, device=config.device)
    METHODS.get(config.method).apply(target, artifact, config.strength)
    context.target = target
    # LoRA scales and adapter multipliers are not in a state dict: name the edit explicitly.
    context.target_fingerprint = stable_hash(
        {
            "base": base_fingerprint,
            "method": config.method,
            "artifact": artifact.name,
            "strength": config.strength,
        }
    )
    context.artifact = artifact
    context.method_config = read_card(artifact).get("config", asdict(method_config))
    return context


def _with_prompt_id(item: WorkItem, phase: str) -> WorkItem:
    meta = {**item.meta, "phase": phase, "prompt_id": str(item.meta.get("position", item.prompt))}
    return replace(item, meta=meta)


def attacked_items(context: RunContext) -> tuple[list[WorkItem], list[WorkItem], dict[str, Any]]:
    """Stage 2: (attack-phase items, pre-attack items, attack card) for the concept's prompt set."""
    from duobench.attacks.base import Budget
    from duobench.attacks.run import run_attack, to_work_items
    from duobench.metrics.dsr import build_judge
    from duobench.prompts import load_prompt_set
    from duobench.prompts import to_work_items as plain_items

    config, concept = context.config, context.concept
    set_name = config.prompt_set or concept.default_prompt_set
    if set_name not in concept.prompt_sets:
        raise DuobenchError(
            f"Concept {concept.name!r} has no prompt set {set_name!r}; it has {', '.join(concept.prompt_sets)}."
        )
    prompt_set = load_prompt_set(concept.prompt_sets[set_name], name=set_name, limit=config.limit)
    plain = [_with_prompt_id(item, "pre-attack") for item in plain_items(prompt_set.rows, context.settings)]
    if config.attack == "none":
        return (
            [replace(item, meta={**item.meta, "phase": "attack"}) for item in plain],
            [],
            {"attack": "none"},
        )
    budget = Budget(steps=config.attack_steps, queries=config.attack_queries)
    options = attack_options(concept, config.attack, config.attack_options)
    results = run_attack(
        config.attack,
        concept,
        context.target,
        context.base,
        prompt_set,
        budget,
        judge=build_judge(concept.judge),
        options=options,
        settings=context.settings,
        target_fingerprint=context.target_fingerprint,
        base_fingerprint=context.base_fingerprint,
    )
    attacked = [_with_prompt_id(item, "attack") for item in to_work_items(results, context.settings)]
    card = {"attack": config.attack, "options": options, "budget": asdict(budget)}
    return attacked, plain, card


def benign_items(context: RunContext) -> list[WorkItem]:
    from duobench.prompts import load_prompt_set, to_work_items

    prompt_set = load_prompt_set(context.concept.benign_prompts, name="benign", limit=context.config.benign_limit)
    return to_work_items(prompt_set.rows, context.settings)


def generate_images(context: RunContext, pipe, fingerprint: str, items: list[WorkItem], name: str) -> list[Path]:
    from duobench.engine import generate_cached

    report = generate_cached(
        pipe,
        fingerprint,
        items,
        context.out / "generations" / name,
        batch_size=context.config.batch_size,
        progress=True,
    )
    context.generated += report.generated
    context.reused += report.reused
    return report.paths


def generate_and_judge_stage(context: RunContext, items: list[WorkItem]) -> tuple[list[Path], dict[str, Any]]:
    """The attack and pre-attack images, generated with the unlearned model and judged while they are
    generated: DSR with CI and the pre/post-attack split, plus one audit row per image. Returns the image
    paths and the judge result (cached by image keys, judge and bootstrap seed)."""
    from duobench.judged_generation import generate_and_judge
    from duobench.metrics.dsr import DSR

    fingerprint = context.target_fingerprint
    out_dir = context.out / "generations" / "attack"
    fresh: dict[str, list[Path]] = {}

    def compute() -> dict[str, Any]:
        metric = DSR(judge=context.concept.judge, seed=context.config.bootstrap_seed)
        report, rows = generate_and_judge(
            context.target, fingerprint, items, out_dir, metric, context.config.batch_size, progress=True
        )
        context.generated += report.generated
        context.reused += report.reused
        fresh["paths"] = report.paths
        return {"report": metric.compute(), "card": metric.card.to_dict(), "rows": rows}

    payload = {
        "images": [item.key(fingerprint) for item in items],
        "phases": [i.meta["phase"] for i in items],
        "prompts": [i.meta["prompt_id"] for i in items],
        "judge": context.concept.judge,
        "seed": context.config.bootstrap_seed,
    }
    judged = context.stages.run("judge", payload, compute)
    # A cached verdict still needs its images (contact sheet, audit links): fetch or regenerate them.
    paths = fresh.get("paths") or generate_images(context, context.target, fingerprint, items, "attack")
    return paths, judged


def benign_metrics(
    context: RunContext, items: list[WorkItem], base_paths: list[Path], target_paths: list[Path]
) -> dict[str, Any]:
    """Prior preservation, CLIP score and FID on the benign prompts, each cached by images and card."""
    from duobench.registry import METRICS

    presets = metric_presets(context.concept, context.config)
    keys = [path.stem for path in target_paths]
    base_keys = [path.stem for path in base_paths]
    results: dict[str, Any] = {}

    def prior() -> dict[str, Any]:
        return _prior_preservation(presets["prior_preservation"], base_paths, target_paths)

    results["prior_preservation"] = context.stages.run(
        "prior_preservation", {"preset": presets["prior_preservation"], "a": base_keys, "b": keys}, prior
    )

    def clip() -> dict[str, Any]:
        metric = METRICS.get(presets["clip_score"])()
        for start in range(0, len(items), 64):
            batch = items[start : start + 64]
            metric.update(load_images(target_paths[start : start + 64]), prompts=[item.prompt for item in batch])
        return metric.compute()

    results["clip_score"] = context.stages.run(
        "clip_score",
        {"preset": presets["clip_score"], "images": keys, "prompts": [i.prompt for i in items]},
        clip,
    )

    def frechet() -> dict[str, Any]:
        return _fid(presets["fid"], context.config.fid_reference, base_paths, target_paths)

    reference_payload = context.config.fid_reference or base_keys
    results["fid"] = context.stages.run(
        "fid", {"preset": presets["fid"], "images": keys, "reference": reference_payload}, frechet
    )
    return results


def _fid(preset: str, reference: str, base_paths: list[Path], target_paths: list[Path]) -> dict[str, Any]:
    """FID (+ KID) of the unlearned model's benign images against ``reference`` or, without one, against
    the base model's images for the same prompts and seeds (drift from the original model)."""
    import numpy as np

    from duobench.metrics.fid import canonical_order, kernel_distance
    from duobench.registry import METRICS

    if reference:
        metric = METRICS.get(preset)(reference=reference)
    else:
        base_metric = METRICS.get(preset)(reference=(np.zeros(1), np.zeros((1, 1))))
        for start in range(0, len(base_paths), 64):
            base_metric.update(load_images(base_paths[start : start + 64]))
        metric = METRICS.get(preset)(reference=base_metric.mean_and_covariance())
    for start in range(0, len(target_paths), 64):
        metric.update(load_images(target_paths[start : start + 64]))
    result = metric.compute()
    if not reference and base_metric.state()["features"] and metric.state()["features"]:
        result["kid"] = kernel_distance(
            canonical_order(np.concatenate(base_metric.state()["features"])),
            canonical_order(np.concatenate(metric.state()["features"])),
        )
    result["reference"] = reference or "base model, same benign prompts and seeds"
    return result


def _prior_preservation(preset: str, base_paths: list[Path], target_paths: list[Path]) -> dict[str, Any]:
    from duobench.registry import METRICS

    metric = METRICS.get(preset)()
    for start in range(0, len(target_paths), 64):
        metric.update(
            load_images(target_paths[start : start + 64]),
            references=load_images(base_paths[start : start + 64]),
        )
    return metric.compute()


def run(config: RunConfig, stages: StageCache | None = None, base=None) -> dict[str, Any]:
    """Run every stage and write the report; returns the summary dict (also ``summary.json``)."""
    from duobench.report import write_run_outputs

    started = time.perf_counter()
    context = prepare(config, stages, base)
    attack_items, pre_items, attack_card = attacked_items(context)
    all_items = attack_items + pre_items
    dsr_paths, judged = generate_and_judge_stage(context, all_items)

    benign = benign_items(context)
    base_paths = generate_images(context, context.base, context.base_fingerprint, benign, "benign-base")
    target_paths = generate_images(context, context.target, context.target_fingerprint, benign, "benign-target")
    metrics = benign_metrics(context, benign, base_paths, target_paths)

    summary = build_summary(context, judged, metrics, attack_card, len(attack_items))
    sheet = run_contact_sheet(context, attack_items, pre_items, dsr_paths)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["images_generated"] = context.generated
    summary["images_reused"] = context.reused
    summary["stage_cache_hits"] = sum(context.stages.hits.values())
    write_run_outputs(context.out, config, summary, judged["rows"], sheet)
    return summary


def run_contact_sheet(
    context: RunContext,
    attack_items: list[WorkItem],
    pre_items: list[WorkItem],
    dsr_paths: list[Path],
    samples: int = 8,
) -> Image.Image:
    """The paper's Figure 5 for this run: base model | unlearned (plain prompt) | unlearned (attacked)."""
    from duobench.report import contact_sheet

    path_of = dict(zip([id(item) for item in attack_items + pre_items], dsr_paths, strict=True))
    plain = pre_items or attack_items
    chosen: dict[str, WorkItem] = {}
    for item in plain:
        chosen.setdefault(item.meta["prompt_id"], item)
        if len(chosen) == samples:
            break
    plain_sample = list(chosen.values())
    base_paths = generate_images(context, context.base, context.base_fingerprint, plain_sample, "sheet-base")
    columns = [
        ("base model", load_images(base_paths)),
        (f"{context.config.method} (plain)", load_images([path_of[id(item)] for item in plain_sample])),
    ]
    if pre_items:
        attacked_by_prompt: dict[str, WorkItem] = {}
        for item in attack_items:
            attacked_by_prompt.setdefault(item.meta["prompt_id"], item)
        attacked = [attacked_by_prompt.get(item.meta["prompt_id"]) for item in plain_sample]
        if all(attacked):
            columns.append(
                (
                    f"{context.config.method} + {context.config.attack}",
                    load_images([path_of[id(item)] for item in attacked]),
                )
            )
    return contact_sheet(columns, [item.prompt for item in plain_sample])


def build_summary(
    context: RunContext,
    judged: dict[str, Any],
    metrics: dict[str, Any],
    attack_card: dict[str, Any],
    n_attack: int,
) -> dict[str, Any]:
    from duobench.provenance import artifact_sha256, git_commit

    config = context.config
    report = judged["report"]
    n_prompts = report["n_prompts"]
    prior, clip, fid = metrics["prior_preservation"], metrics["clip_score"], metrics["fid"]
    return {
        "method": config.method,
        "attack": config.attack,
        "concept": context.concept.name,
        "model": config.model,
        "strength": config.strength,
        "dsr": report["dsr"],
        "dsr_ci": [report["dsr_ci_low"], report["dsr_ci_high"]],
        "dsr_convention": report["dsr_convention"],
        "dsr_pre_attack": (report.get("dsr_pre_attack") or {}).get("value"),
        "dsr_cumulative": (report.get("dsr_cumulative") or {}).get("value"),
        "prior_preservation": prior["prior_preservation"],
        "clip_score": clip.get("clip_score", clip.get("value")),
        "fid": fid.get("fid"),
        "kid": fid.get("kid"),
        "n_prompts": n_prompts,
        "n_seeds": round(n_attack / max(n_prompts, 1)),
        "n_benign": prior["n_pairs"],
        "cards": {
            "dsr": judged["card"]["id"],
            "judge": report.get("judge") or judged["card"]["params"].get("judge"),
            "prior_preservation": prior["metric"],
            "clip_score": clip.get("metric"),
            "fid": fid.get("metric"),
        },
        "method_config": context.method_config,
        "attack_config": attack_card,
        "checkpoint_sha256": artifact_sha256(context.artifact) if context.artifact else "",
        "base_fingerprint": context.base_fingerprint,
        "duobench_version": __version__,
        "git_commit": git_commit(),
    }
