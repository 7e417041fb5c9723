"""`duobench run`: plan → method → attack → generation → judging and metrics → one summary row.

The evaluated model is a `duobench.edits.System`: the base model plus an ordered chain of edits, sampled
through one `duobench.generator.Generator`. Stages, each cached so that a repeated or interrupted run redoes
nothing it finished:

0. **plan** (`plan_run`): the configuration checked, the concept, both prompt sets (an HF dataset included),
   the method and attack configs and every metric preset resolved, before any model loads;
1. **method**: train or load the artifact by config hash (`duobench.methods.train_or_load`); the target
   system is a fresh copy of the base model with the method's edit at ``strength``;
2. **attack**: a prompt attack's prompts for the concept's prompt set (`duobench.attacks.run.run_attack`,
   cached per item), or a model-changing attack's edit (`run_edit_attack`), which makes a third system,
   target + attack edit, for the attack-phase images only;
3. **generation and judging**: the attack-phase and pre-attack images, judged while they generate (DSR with a
   clustered 95% interval and the pre/post-attack split); then the benign prompts with the base and the
   target system. Images go through the content-addressed store, keyed by the system's fingerprint;
4. **metrics** (`duobench.metrics.benign`): prior preservation, CLIP score and FID on the benign images;
   each result, and the judge's, is cached by the image keys and the card's identity;
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
from duobench.edits import Edit, System, build_system, method_edit
from duobench.errors import DuobenchError
from duobench.items import SamplerSettings, WorkItem
from duobench.metrics.base import load_images
from duobench.metrics.benign import benign_metrics, preset_identity
from duobench.metrics.fid_reference import FidReference, resolve_fid_reference
from duobench.prompts import PromptSet
from duobench.run_config import RunConfig, apply_threads, attack_options, method_options, metric_presets
from duobench.stages import StageCache


@dataclass
class RunPlan:
    """Everything a run needs that costs no model work, resolved and checked before any model loads.

    Building the plan loads the concept and both prompt sets (an HF dataset included), builds the method's
    and the attack's configs, fetches the files the attack reads (Ring-A-Bell's official concept-vector
    files), builds every judge and metric preset once (which loads their weights) and prepares the FID
    reference (real images are downloaded or rendered): a missing dataset or file, an unknown option or a
    bad value fails here, in seconds, instead of after the method's training.
    """

    config: RunConfig
    concept: Concept
    prompt_set: PromptSet
    benign: PromptSet
    attack: Any = None
    presets: dict[str, str] = field(default_factory=dict)
    fid_reference: FidReference | None = None
    close: dict[str, PromptSet] = field(default_factory=dict)
    """The concept's close concepts' prompt sets (each capped at ``benign_limit`` images)."""
    guard: Any = None
    """The run's guard (`duobench.guards.base.Guard`), built and checked, not yet prepared; None without."""


def plan_run(config: RunConfig) -> RunPlan:
    from duobench.attacks.base import Budget
    from duobench.attacks.run import fetch_sources, make_attack
    from duobench.methods import make_config
    from duobench.registry import METHODS
    from duobench.run_config import check_run_config
    from duobench.validate import load_preset

    check_run_config(config)
    concept = load_concept(config.concept)
    # Each of these is built only to fail now on a bad option, a bad budget or missing weights.
    classifiers: dict[str, str] = {}  # the reward judge and the guard's checker, loaded now like the judge
    if config.method != "none":
        spec = METHODS.get(config.method)
        options = method_options(concept, config.method, config.method_options)
        make_config(spec, options)
        if spec.scorer_field:
            classifiers["reward judge"] = options[spec.scorer_field]
    attack = None
    if config.attack != "none":
        attack = make_attack(config.attack, attack_options(concept, config.attack, config.attack_options))
        Budget(steps=config.attack_steps, queries=config.attack_queries)
        fetch_sources(attack, concept)
    guard = None
    if config.guard != "none":
        from duobench.guards.base import check_independent, make_guard

        guard = make_guard(config.guard, config.guard_options, concept)
        check_independent(guard, concept.judge)
        checker_field = getattr(guard, "checker_field", "")
        if checker_field:
            classifiers["guard checker"] = getattr(guard.config, checker_field)
    presets = metric_presets(concept, config)
    for role, preset in {"judge": concept.judge, **presets, **classifiers}.items():
        load_preset(role, preset)
    prompt_set, benign, close = load_prompt_sets(config, concept)
    # Real reference images are downloaded or rendered now, so an offline machine fails before training.
    fid_reference = resolve_fid_reference(config.fid_reference or concept.fid_reference, benign.rows)
    return RunPlan(config, concept, prompt_set, benign, attack, presets, fid_reference, close, guard)


def load_prompt_sets(config: RunConfig, concept: Concept) -> tuple[PromptSet, PromptSet, dict[str, PromptSet]]:
    """The run's evaluation prompt set, its benign set and its close concepts' sets, with the run's limits
    (``benign_limit`` caps each close concept's images too)."""
    from duobench.prompts import load_prompt_set

    set_name = config.prompt_set or concept.default_prompt_set
    if set_name not in concept.prompt_sets:
        raise DuobenchError(
            f"Concept {concept.name!r} has no prompt set {set_name!r}; it has {', '.join(concept.prompt_sets)}."
        )
    prompt_set = load_prompt_set(concept.prompt_sets[set_name], name=set_name, limit=config.limit)
    benign = load_prompt_set(concept.benign_prompts, name="benign", limit=config.benign_limit)
    close = {}
    for name, spec in concept.close_concepts.items():
        close_set = load_prompt_set(spec, name=name)
        close[name] = replace(close_set, rows=close_set.rows[: config.benign_limit])
    return prompt_set, benign, close


@dataclass
class RunContext:
    """What the stages share: the plan, the loaded systems and the caches.

    ``base`` is the original model; ``target`` the base plus the method's edit (the same system for
    ``--method none``); ``attacked`` the target plus a model-changing attack's edit, if the attack is one.
    """

    plan: RunPlan
    base: System
    target: System
    settings: SamplerSettings
    stages: StageCache
    out: Path
    attacked: System | None = None
    artifact: Path | None = None
    method_config: dict[str, Any] = field(default_factory=dict)
    generated: int = 0
    reused: int = 0

    @property
    def config(self) -> RunConfig:
        return self.plan.config

    @property
    def concept(self) -> Concept:
        return self.plan.concept

    @property
    def guard(self):
        """The run's guard, prepared for the concept (`prepare`); None without one."""
        return self.plan.guard


NO_BENIGN_METRICS: dict[str, Any] = {
    "prior_preservation": {"prior_preservation": None, "n_pairs": 0, "metric": None, "rows": []},
    "clip_score": {"clip_score": None, "rows": []},
    "fid": {},
}
"""The benign metrics of a run whose guard allowed no benign prompt."""


def load_system(config: RunConfig, base: System, edits: list[Edit]) -> System:
    """A fresh copy of the base model with ``edits`` applied (the base system itself when there are none)."""
    from duobench.models import load_pipeline

    if not edits:
        return base
    return build_system(load_pipeline(config.model, device=config.device), base.base_fingerprint, edits)


def prepare(
    config: RunConfig,
    stages: StageCache | None = None,
    base=None,
    plan: RunPlan | None = None,
    show_plan: bool = True,
) -> RunContext:
    """Plan the run (no model work), load the base model, and train or load the method's edit (stage 1).
    ``show_plan`` logs the whole run's work and time estimate (`duobench attack`, which runs only the attack,
    turns it off)."""
    from duobench.distributed import main_process_first
    from duobench.methods import read_card, train_or_load
    from duobench.models import check_model_support, default_sampler_settings, load_pipeline, pipeline_fingerprint
    from duobench.workload import log_plan

    if plan is None:
        with main_process_first():  # downloads and renders once; the other ranks then find them
            plan = plan_run(config)
    concept = plan.concept
    apply_threads(config)
    base_pipe = base if base is not None else load_pipeline(config.model, device=config.device)
    check_model_support(base_pipe, config.method, config.attack)  # before anything trains or generates
    if base_pipe.device.type == "cpu":
        import torch

        config.threads = torch.get_num_threads()
    base_system = build_system(base_pipe, pipeline_fingerprint(base_pipe))
    if show_plan:
        log_plan(plan, base_pipe, base_system.fingerprint)  # images, trainings (cached?), attack steps, estimate
    if plan.guard is not None:
        plan.guard.prepare(concept, base_pipe)  # a learned guard trains or loads its weights here
    context = RunContext(
        plan=plan,
        base=base_system,
        target=base_system,
        settings=default_sampler_settings(base_pipe, concept),
        stages=stages or StageCache(),
        out=Path(config.out),
    )
    if config.method == "none":
        return context
    artifact, method_config, _ = train_or_load(
        config.method,
        base_pipe,
        concept,
        base_system.fingerprint,
        method_options(concept, config.method, config.method_options),
    )
    # At strength 0 every method is the base model (each method's tests check it), so the run uses the base
    # system itself: the base model's images and attack results are reused instead of made again.
    if config.strength != 0:
        context.target = load_system(config, base_system, [method_edit(config.method, artifact, config.strength)])
    context.artifact = artifact
    context.method_config = read_card(artifact).get("config", asdict(method_config))
    return context


def _with_prompt_id(item: WorkItem, phase: str) -> WorkItem:
    meta = {**item.meta, "phase": phase, "prompt_id": str(item.meta.get("position", item.prompt))}
    return replace(item, meta=meta)


def attacked_items(context: RunContext) -> tuple[list[WorkItem], list[WorkItem], dict[str, Any]]:
    """Stage 2: (attack-phase items, pre-attack items, attack card) for the concept's prompt set.

    A prompt attack's items replay its prompts on the target; a model-changing attack's edit is applied on
    top of the target (``context.attacked``) and its attack-phase items are the plain prompts again.
    """
    from duobench.attacks.base import Budget
    from duobench.attacks.run import attack_work_items, card_details, produces, run_attack, run_edit_attack
    from duobench.metrics.dsr import build_judge
    from duobench.prompts import to_work_items

    config, concept, prompt_set = context.config, context.concept, context.plan.prompt_set
    plain = [
        _with_prompt_id(item, "pre-attack")
        for item in evaluated_at(to_work_items(prompt_set.rows, context.settings), config.guidance)
    ]
    if config.attack == "none":
        return (
            [replace(item, meta={**item.meta, "phase": "attack"}) for item in plain],
            [],
            {"attack": "none"},
        )
    budget = Budget(steps=config.attack_steps, queries=config.attack_queries)
    options = attack_options(concept, config.attack, config.attack_options)
    card = {
        "attack": config.attack,
        "options": options,
        "budget": asdict(budget),
        **card_details(context.plan.attack, concept),
    }
    common = dict(options=options, settings=context.settings)
    judge = build_judge(concept.judge)
    if produces(context.plan.attack) == "edit":
        edit = run_edit_attack(
            config.attack, concept, context.target, context.base, prompt_set, budget, judge=judge, **common
        )
        context.attacked = load_system(config, context.base, [*context.target.edits, edit])
        card["edit"] = edit.identity()
        return [replace(item, meta={**item.meta, "phase": "attack"}) for item in plain], plain, card
    results = run_attack(
        config.attack, concept, context.target, context.base, prompt_set, budget, judge=judge, **common
    )
    attacked = [
        _with_prompt_id(item, "attack")
        for item in evaluated_at(attack_work_items(results, context.settings), config.guidance)
    ]
    return attacked, plain, card


def evaluated_at(items: list[WorkItem], guidance: float | None) -> list[WorkItem]:
    """``items`` with their classifier-free guidance replaced by ``guidance`` (the run's ``guidance``
    option); unchanged when it is None."""
    return items if guidance is None else [replace(item, guidance=float(guidance)) for item in items]


def benign_items(context: RunContext) -> list[WorkItem]:
    from duobench.prompts import to_work_items

    return to_work_items(context.plan.benign.rows, context.settings)


def generate_images(context: RunContext, system: System, items: list[WorkItem], name: str) -> list[Path]:
    from duobench.engine import generate_cached

    report = generate_cached(
        system.generator,
        system.fingerprint,
        items,
        context.out / "generations" / name,
        batch_size=context.config.batch_size,
        progress=True,
    )
    context.generated += report.generated
    context.reused += report.reused
    return report.paths


def judge_segment(context: RunContext, metric, name: str, system: System, items: list[WorkItem]):
    """Generate ``items`` on ``system`` into ``generations/<name>``, each batch judged by ``metric`` as it
    comes (`duobench.judged_generation`): (image path, audit row) per item, in order."""
    from duobench.judged_generation import generate_and_judge

    report, rows = generate_and_judge(
        system.generator,
        system.fingerprint,
        items,
        context.out / "generations" / name,
        metric,
        context.config.batch_size,
        progress=True,
    )
    context.generated += report.generated
    context.reused += report.reused
    return report.paths, rows


def judged_segments(
    context: RunContext, attack_items: list[WorkItem], pre_items: list[WorkItem]
) -> list[tuple[str, System, list[WorkItem]]]:
    """(folder, system, items) to generate and judge: all on the target, or the attack phase on the
    attacked system when the attack changed the model."""
    if context.attacked is None:
        return [("attack", context.target, attack_items + pre_items)]
    return [("attack", context.attacked, attack_items), ("pre-attack", context.target, pre_items)]


def generate_and_judge_stage(
    context: RunContext, attack_items: list[WorkItem], pre_items: list[WorkItem]
) -> tuple[list[Path], dict[str, Any]]:
    """The attack and pre-attack images, generated and judged while they are generated: DSR with CI and the
    pre/post-attack split, plus one audit row per image. Returns the image paths (attack items, then
    pre-attack items) and the judge result, cached by the image keys, the judge's card and the DSR card
    (its interval)."""
    from duobench.guarding import judge_guarded
    from duobench.metrics.base import sync_state
    from duobench.metrics.dsr import DSR, build_judge

    segments = judged_segments(context, attack_items, pre_items)
    fresh: dict[str, list[Path]] = {}

    def compute() -> dict[str, Any]:
        metric = DSR(judge=build_judge(context.concept.judge))
        paths, rows = [], []
        for name, system, items in segments:
            if context.guard is not None:
                segment_paths, segment_rows = judge_guarded(context, metric, name, system, items)
                paths += segment_paths
                rows += segment_rows
                continue
            segment_paths, segment_rows = judge_segment(context, metric, name, system, items)
            paths += segment_paths
            rows += segment_rows
        fresh["paths"] = paths
        sync_state(metric)  # every rank judged its share of the images
        return {"report": metric.compute(), "card": metric.card.to_dict(), "rows": rows}

    payload = {
        "images": [item.key(system.fingerprint) for _, system, items in segments for item in items],
        "phases": [item.meta["phase"] for _, _, items in segments for item in items],
        "prompts": [item.meta["prompt_id"] for _, _, items in segments for item in items],
        "judge": preset_identity(context.concept.judge),
        "dsr": DSR.card.id,
        **({"guard": context.guard.identity()} if context.guard is not None else {}),
    }
    judged = context.stages.run("judge", payload, compute)
    # A cached verdict still needs its images (contact sheet, audit links): fetch or regenerate them; an
    # item a prompt guard refused has none.
    paths = fresh.get("paths")
    if paths is None and context.guard is not None:
        paths = [Path(row["image"]) if row.get("image") else None for row in judged["rows"]]
    if paths is None:
        paths = [path for name, system, items in segments for path in generate_images(context, system, items, name)]
    return paths, judged


def run(config: RunConfig, stages: StageCache | None = None, base=None) -> dict[str, Any]:
    """Run every stage and write the report; returns the summary dict (also ``summary.json``)."""
    from duobench.distributed import barrier, process_info, sum_over_ranks
    from duobench.guarding import guarded_benign_images
    from duobench.report import write_run_outputs

    started = time.perf_counter()
    context = prepare(config, stages, base)
    attack_items, pre_items, attack_card = attacked_items(context)
    dsr_paths, judged = generate_and_judge_stage(context, attack_items, pre_items)

    benign = benign_items(context)
    base_paths = generate_images(context, context.base, benign, "benign-base")
    target_paths, allowed, refusals = guarded_benign_images(context, benign)  # all allowed without a guard
    metrics = (
        benign_metrics(
            context.stages,
            context.plan.presets,
            context.plan.fid_reference,
            [benign[i] for i in allowed],
            [base_paths[i] for i in allowed],
            [target_paths[i] for i in allowed],
        )
        if allowed
        else NO_BENIGN_METRICS  # the guard refused every benign prompt: nothing to compare
    )
    close = close_concepts_stage(context)

    summary = build_summary(context, judged, metrics, attack_card, len(attack_items))
    summary["close_prior_preservation"] = close.get("prior_preservation")
    summary["close_concepts"] = close.get("concepts", {})
    if context.guard is not None:
        refused = sum(bool(row.get("refused")) for row in judged["rows"] if row.get("phase") == "attack")
        summary |= {"guard": config.guard, "guard_identity": context.guard.identity(), "refused": refused}
        summary |= refusals
    sheet = run_contact_sheet(context, attack_items, pre_items, dsr_paths)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    summary["images_generated"] = sum_over_ranks(context.generated)
    summary["images_reused"] = sum_over_ranks(context.reused)
    summary["stage_cache_hits"] = sum(context.stages.hits.values())
    paths = {
        (benign[i].prompt, benign[i].seed): {"image": str(target_paths[i]), "base_image": str(base_paths[i])}
        for i in allowed
    }
    benign_rows = [
        {**row, "phase": "benign", **paths[row["prompt"], row["seed"]]}
        for name in ("prior_preservation", "clip_score")
        for row in metrics[name]["rows"]
    ]
    if process_info().is_main:
        write_run_outputs(context.out, config, summary, judged["rows"] + benign_rows, sheet)
    barrier()  # every rank returns once the run's files are written
    return summary


def close_concepts_stage(context: RunContext) -> dict[str, Any]:
    """The close concepts' images on the base and the evaluated model, and their distances
    (`duobench.metrics.benign.close_concept_metrics`); empty when the concept names none. Behind a guard the
    evaluated model's images are the guarded ones (`guarded_benign_images`): the distances use the items the
    guard allowed, and each concept reports its false refusals."""
    from duobench.guarding import guarded_benign_images
    from duobench.metrics.benign import close_concept_metrics
    from duobench.prompts import to_work_items

    inputs, refusals = {}, {}
    for name, prompt_set in context.plan.close.items():
        items = to_work_items(prompt_set.rows, context.settings)
        folder = "".join(c if c.isalnum() else "-" for c in name)
        base_paths = generate_images(context, context.base, items, f"close-base-{folder}")
        target_paths, allowed, refusals[name] = guarded_benign_images(context, items, f"close-target-{folder}")
        inputs[name] = (
            [items[i] for i in allowed],
            [base_paths[i] for i in allowed],
            [target_paths[i] for i in allowed],
        )
    close = close_concept_metrics(context.stages, context.plan.presets["prior_preservation"], inputs)
    if context.guard is None or not close:
        return close
    concepts = {
        name: {
            **entry,
            "false_refusal_rate": refusals[name]["false_refusal_rate"],
            "false_refusal_ci": refusals[name]["false_refusal_ci"],
            "n_refused": refusals[name]["n_benign_refused"],
        }
        for name, entry in close["concepts"].items()
    }
    return {**close, "concepts": concepts}


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
    base_paths = generate_images(context, context.base, plain_sample, "sheet-base")
    columns = [
        ("base model", load_images(base_paths)),
        (f"{context.config.method} (plain)", images_or_refused([path_of[id(item)] for item in plain_sample])),
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
                    images_or_refused([path_of[id(item)] for item in attacked]),
                )
            )
    return contact_sheet(columns, [item.prompt for item in plain_sample])


def images_or_refused(paths: list[Path | None]) -> list[Image.Image]:
    """The images at ``paths``; a grey "refused" tile where a prompt guard refused the item (no path)."""
    from PIL import ImageDraw

    images = []
    for path in paths:
        if path is None:
            tile = Image.new("RGB", (128, 128), (200, 200, 200))
            ImageDraw.Draw(tile).text((36, 58), "refused", fill="black")
            images.append(tile)
        else:
            images += load_images([path])
    return images


def build_summary(
    context: RunContext,
    judged: dict[str, Any],
    metrics: dict[str, Any],
    attack_card: dict[str, Any],
    n_attack: int,
) -> dict[str, Any]:
    from duobench.distributed import process_info
    from duobench.models import denoiser
    from duobench.provenance import artifact_sha256, environment, git_commit

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
        "fid_reference": fid.get("reference"),
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
        "base_fingerprint": context.base.fingerprint,
        "edits": [edit.identity() for edit in (context.attacked or context.target).edits],
        "defense_coverage": context.target.coverage_notes(),
        "prompt_notes": {
            name: dict(prompt_set.notes)
            for name, prompt_set in (("evaluation", context.plan.prompt_set), ("benign", context.plan.benign))
            if prompt_set.notes
        },
        "duobench_version": __version__,
        "git_commit": git_commit(),
        "environment": {
            **environment(context.base.pipe.device),
            "dtype": str(denoiser(context.base.pipe).dtype).removeprefix("torch."),
            **({"processes": processes} if (processes := process_info().world_size) > 1 else {}),
        },
    }
