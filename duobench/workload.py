"""What a run will do, counted before it starts, and how long that should take on the detected device.

`run_workload` counts a planned run's work from its plan alone: images per phase (attack, pre-attack, benign
on the base and on the unlearned model, the contact sheet's base-model column), the method's training
(steps, and whether its artifact is already cached, when the base model's fingerprint is known), DUO's pair
data and the attack's optimisation steps or queries. The image counts are exactly what a run on a cold cache
generates (images with equal keys, and cached images, are reused, so they are an upper bound otherwise).

An inference-time method (SLD, SD-NP, SAFREE, PNO) trains nothing; its stage is the extra cost of every image
the evaluated model draws (PNO: its per-item budget of UNet evaluations). A learned guard's training is a
stage. Where the work is a ceiling (P4D stops at a row's first success, PNO at the first safe sample) the
estimate says "at most". Under torchrun the stages whose work is dealt across ranks (images, metrics,
per-prompt attacks) take 1/ranks of their time; trainings and edit attacks keep theirs.

The estimate multiplies those counts by a small table of per-unit costs for one model family on one device:

- the toy model on a CPU: measured here with one torch thread on a 2-core CPU, idle and shared (a range;
  the units added with the wave-1 and wave-2 systems by `benchmarks/toy_unit_costs.py`);
- SD1.4 on a GPU: the duobench code review's estimates for one H100 (its section 2.3), *not measured*: no GPU
  was available; the output says so.

Anything else (SD1.4 on a CPU, the tiny random test model, an attack the table has no figure for) gets the
counts without a time for that part.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from duobench.concepts import Concept

# ------------------------------------------------------------------------------------------------ costs


@dataclass(frozen=True)
class CostTable:
    """Seconds per unit of work, as (low, high), for one model family on one device, and where they come
    from."""

    family: str
    device: str
    source: str
    seconds: dict[str, tuple[float, float]]


TOY_CPU = CostTable(
    family="toy",
    device="cpu",
    source="measured per unit here: toy model, 1 torch thread, a 2-core CPU, from idle (load average 0.2-1.2) "
    "to shared with other jobs (load average 6-7)",
    seconds={
        # plan (metric presets, 10 reference drawings per benign row), contact sheet and report
        "run overhead": (2.0, 7.0),
        "model load": (0.15, 0.6),
        # batch 16 (auto), DDIM 20 steps at 32 px, judged in line: 0.07 / 0.16 s per image over 64 images
        # (idle / shared); small sets cost more per image
        "judged image": (0.07, 0.25),
        "image": (0.07, 0.25),
        # prior preservation + CLIP-score stand-in + FID (toy), per benign image
        "metric image": (0.007, 0.022),
        # 40 pairs (80 kept images: draws, SDEdits at strength 0.3, toy-star judge): 9.0 / 25.1 s
        "duo pair": (0.23, 0.63),
        # the star concept's options: micro_batch_pairs=4 (one UNet call per step of 4 pairs)
        "duo step": (0.10, 0.26),
        # ddim_steps=20 (the star concept's options)
        "esd-u iteration": (0.15, 0.45),
        "esd-x iteration": (0.15, 0.46),
        "spm iteration": (0.33, 1.09),
        "uce training": (0.04, 0.1),
        # per generation of a population of 200 (k=16): 300 generations in 12.0 / 29.6 s
        "ring-a-bell generation": (0.040, 0.099),
        # one image, the judge and the toy reward per query
        "sneakyprompt query": (0.27, 0.61),
        "concept-inversion step": (0.043, 0.13),
        # one optimiser step; the judged generation after each timestep included (10 iterations per timestep)
        "unlearndiffatk step": (0.10, 0.31),
        "finetune step": (0.054, 0.16),
        # The entries below: benchmarks/toy_unit_costs.py, idle and beside five other jobs (load average 5.5-7).
        # training steps at the star concept's options (SafeGen: 5 triplets; ShieldDiff: 32 samples of 10 steps)
        "safegen step": (0.051, 0.15),
        "sdd iteration": (0.15, 0.51),
        "shielddiff epoch": (3.6, 10.0),
        "latent-guard epoch": (0.024, 0.064),
        # an inference-time method's cost per image on top of the base model's (SD-NP, SAFREE: none measurable)
        "sld image": (0.023, 0.057),
        "sd-np image": (0.0, 0.004),
        "safree image": (0.002, 0.004),
        # forward or checkpointed backward, as PNO's sampler counts them
        "pno unet evaluation": (0.024, 0.070),
        # one GCG iteration of a prompt's search (512 candidates)
        "mma-diffusion step": (0.10, 0.31),
        # one iteration of a row on the base model's UNet, its evaluations every 25 included (a method that adds
        # modules to the UNet, such as SPM, costs more)
        "p4d step": (0.06, 0.12),
    },
)

SD_CUDA = CostTable(
    family="sd",
    device="cuda",
    source="estimates for one H100 from the duobench code review (its section 2.3), not measured: no GPU was available",
    seconds={
        # "load SD x2, fingerprints: under 1 min warm"
        "model load": (15.0, 30.0),
        # "DSR images: 190 in small guidance groups: 1.5-2 min"
        "judged image": (0.47, 0.63),
        # "benign images: 1,000 base + 1,000 DUO: 8-11 min"; 512 px, 50 PNDM steps, fp16, batch 64
        "image": (0.24, 0.33),
        # "sheet + metrics: 1-2 min" for 1,000 benign pairs (LPIPS, CLIP, Inception) and 190 NudeNet verdicts
        "metric image": (0.06, 0.12),
        # "DUO pair data: 64 pairs, about 80 draws + 70 SDEdits at 37 steps, batch 8: 1-1.5 min"
        "duo pair": (0.94, 1.41),
        # "a DUO micro-step: 50-80 ms", 4 micro-steps per step: "1,000 steps: 4-6 min"
        "duo step": (0.24, 0.36),
        # "ESD-u: 1,000 iterations of a partial 50-step DDIM rollout plus an fp32 step: 12-15 min"
        "esd-u iteration": (0.72, 0.9),
        # no figure for ESD-x in the review: ESD-u's, whose rollout (the bulk of an iteration) is the same
        "esd-x iteration": (0.72, 0.9),
        # "SPM: 3,000 fp32 iterations: 25-40 min"
        "spm iteration": (0.5, 0.8),
        # "UCE: seconds"
        "uce training": (5.0, 30.0),
        # "Ring-A-Bell: about 8-12 ms per generation" (population 200)
        "ring-a-bell generation": (0.008, 0.012),
    },
)

COST_TABLES = {(table.family, table.device): table for table in (TOY_CPU, SD_CUDA)}


def cost_table(model: str, device: str) -> CostTable | None:
    """The per-unit costs for ``model``'s family on ``device`` (cpu, cuda), if we have them."""
    from duobench.run_config import model_family

    return COST_TABLES.get((model_family(model), device))


# --------------------------------------------------------------------------------------------- workload


@dataclass
class Stage:
    """One line of the plan: what it is, the work in words, and the work in cost units."""

    name: str
    work: str
    units: list[tuple[float, str]] = field(default_factory=list)
    """(count, cost unit) pairs, e.g. [(300, "duo step")]."""
    cached: bool = False
    """Its result is already cached: it will cost nothing."""
    at_most: bool = False
    """The work is a ceiling (an attack that stops at a row's first success, PNO's per-item budget): the
    estimate is an upper bound."""
    dealt: bool = False
    """Its work is dealt across torchrun ranks (images, metrics, per-prompt attacks); a training runs on every
    rank at once, and an attack that shares one optimisation across prompts on rank 0 alone."""


@dataclass
class Workload:
    """A run's work, counted from its plan (`run_workload`), with the estimate for its device."""

    model: str
    device: str
    images: dict[str, int]
    """Images the run generates on a cold cache, per phase."""
    stages: list[Stage]
    costs: CostTable | None = None
    ranks: int = 1
    """Processes of the run (torchrun's world size): a dealt stage takes 1/ranks of its time."""

    @property
    def total_images(self) -> int:
        return sum(self.images.values())

    def stage_seconds(self, stage: Stage) -> tuple[float, float] | None:
        """(low, high) seconds for ``stage``; None when a unit has no cost on this device."""
        if stage.cached:
            return (0.0, 0.0)
        if self.costs is None or any(unit not in self.costs.seconds for _, unit in stage.units):
            return None
        share = 1 / self.ranks if stage.dealt else 1
        low = sum(count * self.costs.seconds[unit][0] for count, unit in stage.units) * share
        high = sum(count * self.costs.seconds[unit][1] for count, unit in stage.units) * share
        return (low, high)

    def seconds(self) -> tuple[float, float, bool] | None:
        """(low, high, complete): the estimate over every stage with a cost; ``complete`` is False when some
        stage has none (the total is then a lower bound). None without a cost table."""
        if self.costs is None:
            return None
        known = [self.stage_seconds(stage) for stage in self.stages]
        low = sum(seconds[0] for seconds in known if seconds is not None)
        high = sum(seconds[1] for seconds in known if seconds is not None)
        return low, high, all(seconds is not None for seconds in known)

    def rows(self) -> list[tuple[str, str, str]]:
        """(stage, work, estimate) per stage, then the total: the table `duobench validate` and a run print."""
        rows = []
        for stage in self.stages:
            seconds = self.stage_seconds(stage)
            estimate = "cached" if stage.cached else duration(seconds)
            rows.append((stage.name, stage.work, f"at most {estimate}" if stage.at_most and seconds else estimate))
        total = self.seconds()
        if total is None:
            estimate = f"no per-unit costs for {self.model} on {self.device}"
        else:
            estimate = duration(total[:2]) + ("" if total[2] else " + stages without an estimate")
            if any(stage.at_most and not stage.cached for stage in self.stages):
                estimate = f"at most {estimate}"
        rows.append(("total", f"{self.total_images} images", estimate))
        return rows

    def text(self) -> str:
        """The plan as aligned lines of text (for a log)."""
        rows = [("stage", "work", "estimate"), *self.rows()]
        widths = [max(len(row[column]) for row in rows) for column in range(2)]
        processes = f" x {self.ranks} processes" if self.ranks > 1 else ""
        lines = [f"plan for {self.model} on {self.device}{processes}:"]
        lines += [f"  {name:<{widths[0]}}  {work:<{widths[1]}}  {estimate}" for name, work, estimate in rows]
        lines.append(f"  ({self.note()})")
        return "\n".join(lines)

    def note(self) -> str:
        """Where the estimate comes from, and what the counts mean."""
        counts = "images: a cold cache's count; cached images and attack results are reused"
        if self.ranks > 1:
            counts += (
                f"; images, metrics and per-prompt attacks are dealt across the {self.ranks} processes, a training "
                "runs on every one at once"
            )
        if self.costs is None:
            return counts
        return f"estimate: {self.costs.source}; {counts}"


def duration(seconds: tuple[float, float] | None) -> str:
    """(75, 140) → ``about 1-2 min``; (4, 4) → ``about 4 s``; None → ``no estimate``."""
    if seconds is None:
        return "no estimate"
    low, high = seconds
    if high < 1:
        return "under 1 s"
    scale, unit, digits = (1, "s", 0) if high < 90 else (60, "min", 0) if high < 5400 else (3600, "h", 1)
    low_text, high_text = f"{low / scale:.{digits}f}", f"{high / scale:.{digits}f}"
    return "about " + (high_text if low_text == high_text else f"{low_text}-{high_text}") + f" {unit}"


def run_workload(
    plan, device: str, trained: bool | None = None, sampler_steps: int | None = None, ranks: int = 1
) -> Workload:
    """Count a planned run's work (a `duobench.runner.RunPlan`; only its config, concept, prompt sets and attack
    are read) and attach the per-unit costs for ``device``.

    ``trained``: whether the method's artifact is already cached (`artifact_cached`); None when unknown.
    ``sampler_steps``: the steps of the run's images (PNO's cost scales with them); None when unknown.
    ``ranks``: the run's processes (torchrun), over which its dealt stages are shared.
    """
    config, concept = plan.config, plan.concept
    rows, benign = plan.prompt_set.rows, plan.benign.rows
    method, attack = config.method, config.attack
    attack_phase = len(rows)
    pre_attack = len(rows) if attack != "none" else 0
    distinct_prompts = len({row.meta.get("position", row.prompt) for row in rows})
    images = {
        "attack": attack_phase,
        "pre-attack": pre_attack,
        "benign base": len(benign),
        # with no method the unlearned model is the base model: its benign and sheet images are the base's
        "benign unlearned": len(benign) if method != "none" else 0,
        "contact sheet": min(8, distinct_prompts) if method != "none" else 0,
    }
    close = sum(len(close_set.rows) for close_set in plan.close.values())
    images["close concepts base"] = close
    images["close concepts unlearned"] = close if method != "none" else 0
    loads = 1 + (method != "none") + (attack != "none" and _produces_edit(plan.attack))
    stages = [
        Stage("load models", f"{loads} model load(s)", [(loads, "model load")]),
        Stage("plan and report", "metric presets, FID reference, contact sheet, report", [(1, "run overhead")]),
    ]
    stages += method_stages(config, concept, trained)
    if plan.guard is not None:
        stages += guard_stages(plan.guard)
    if plan.attack is not None:
        stages.append(dealt_if_per_prompt(attack_stage(attack, plan.attack, rows, config), plan.attack))
    judged = attack_phase + pre_attack
    stages.append(
        Stage("attack + pre-attack images", f"{judged} images, judged", [(judged, "judged image")], dealt=True)
    )
    if method != "none" and inference_time(method):
        evaluated = judged + images["benign unlearned"] + images["close concepts unlearned"]
        stages.append(sampling_stage(config, concept, evaluated, sampler_steps))
    other = images["benign base"] + images["benign unlearned"] + images["contact sheet"]
    stages.append(
        Stage(
            "benign images",
            f"{images['benign base']} base + {images['benign unlearned']} unlearned + {images['contact sheet']} sheet",
            [(other, "image")],
            dealt=True,
        )
    )
    if close:
        pairs = images["close concepts base"] + images["close concepts unlearned"]
        work = f"{close} base + {images['close concepts unlearned']} unlearned ({', '.join(plan.close)})"
        stages.append(Stage("close-concept images", work, [(pairs, "image")], dealt=True))
    metric_pairs = len(benign) + close
    stages.append(Stage("metrics", f"{metric_pairs} pairs", [(metric_pairs, "metric image")], dealt=True))
    return Workload(config.model, device, images, stages, cost_table(config.model, device), ranks)


def dealt_if_per_prompt(stage: Stage, attack: Any) -> Stage:
    """An attack's stage is dealt across ranks when each prompt is its own optimisation (`this_ranks_rows`); an
    edit, or an optimisation shared by all prompts (Concept Inversion's token), runs on one rank."""
    per_prompt = not _produces_edit(attack) and not getattr(type(attack), "shares_work_across_prompts", False)
    return replace(stage, dealt=per_prompt)


def _produces_edit(attack: Any) -> bool:
    from duobench.attacks.run import produces

    return attack is not None and produces(attack) == "edit"


def method_stages(config, concept: Concept, trained: bool | None) -> list[Stage]:
    """The method's training (and DUO's pair data) as plan stages."""
    from duobench.methods import make_config
    from duobench.registry import METHODS
    from duobench.run_config import method_options

    method = config.method
    if method == "none":
        return []
    method_config = make_config(METHODS.get(method), method_options(concept, method, config.method_options))
    status = {True: "cached", False: "not trained yet", None: "cache not checked"}[trained]
    stages = []
    if method == "duo":
        from duobench.duo.pairs import recipe_rows, sub_concepts

        loras = sub_concepts(concept)
        pairs = sum(row.count for sub in loras for row in recipe_rows(concept, sub, method_config.pairs))
        stages.append(
            Stage(
                "DUO pair data",
                f"{pairs} pairs: at least {pairs} draws and {pairs} SDEdits ({status})",
                [(pairs, "duo pair")],
                cached=bool(trained),
            )
        )
        steps = method_config.steps * len(loras)
        work = f"{len(loras)} LoRA(s) x {method_config.steps} steps of {method_config.pairs_per_step} pairs"
        stages.append(Stage("DUO training", f"{work} ({status})", [(steps, "duo step")], cached=bool(trained)))
        return stages
    if inference_time(method):
        return [Stage(f"{method} training", "none: it acts while sampling", [])]
    steps, unit = training_steps(method_config)
    if steps:
        stages.append(
            Stage(f"{method} training", f"{steps} {unit} ({status})", [(steps, f"{method} {unit[:-1]}")], bool(trained))
        )
    else:
        stages.append(
            Stage(f"{method} training", f"no optimisation steps ({status})", [(1, f"{method} training")], bool(trained))
        )
    return stages


WEIGHTS = ("text_encoder", "unet", "vae")


def inference_time(method: str) -> bool:
    """Whether ``method`` changes no weights: it edits the conditioning or the guidance while sampling (SLD,
    SD-NP, SAFREE, PNO), so it trains nothing and every image of the evaluated model costs more instead."""
    from duobench.registry import METHODS

    return not set(METHODS.get(method).touches) & set(WEIGHTS)


def sampling_stage(config, concept: Concept, images: int, steps: int | None) -> Stage:
    """What an inference-time method adds to the ``images`` the evaluated model draws with ``steps`` sampler
    steps (None: unknown): PNO's search, at most its per-item budget of UNet evaluations; another method's
    guidance, a cost per image."""
    from duobench.methods import make_config
    from duobench.registry import METHODS
    from duobench.run_config import method_options

    method = config.method
    if method != "pno":
        work = f"{images} images of the evaluated model"
        return Stage(f"{method} sampling", work, [(images, f"{method} image")], dealt=True)
    if steps is None:
        return Stage("PNO sampling", f"{images} images, sampler steps unknown", [(images, "pno image")], dealt=True)
    options = make_config(METHODS.get(method), method_options(concept, method, config.method_options))
    worst = (options.random_trials + 2 * options.opt_steps - 1) * steps
    per_item = min(worst, options.max_unet_evaluations or worst)
    work = f"{images} images x at most {per_item} UNet evaluations (an item safe at once: {steps})"
    return Stage("PNO sampling", work, [(images * per_item, "pno unet evaluation")], at_most=True, dealt=True)


def guard_stages(guard: Any) -> list[Stage]:
    """A learned guard's training (Latent Guard's epochs), once per guard config; none for a guard that
    trains nothing."""
    steps, unit = training_steps(guard.config)
    if not steps:
        return []
    work = f"{steps} {unit} (trained once per guard config and base model; cache not checked)"
    return [Stage(f"{guard.name} training", work, [(steps, f"{guard.name} {unit[:-1]}")])]


def training_steps(method_config: Any) -> tuple[int, str]:
    """(count, "iterations" / "steps" / "epochs") from the config's field of that name; (0, "") if none."""
    for name in ("iterations", "steps", "epochs"):
        value = getattr(method_config, name, None)
        if isinstance(value, int) and value > 0:
            return value, name
    return 0, ""


def attack_stage(name: str, attack: Any, rows: list, config) -> Stage:
    """The attack's optimisation (or queries), at most what its budget allows."""
    from duobench.attacks.base import Budget

    budget = Budget(steps=config.attack_steps, queries=config.attack_queries)
    options = attack.config
    prompts = len(rows)
    if name == "ring-a-bell":
        searches = len({row.prompt for row in rows})  # rows repeating a prompt share its search
        generations = budget.steps or options.generations
        work = f"{searches_text(searches)} x {generations} generations"
        work += f" (population {options.population})"
        # a generation's cost is one encoder pass over its unscored genomes: about proportional to the population
        units = searches * generations * options.population / 200
        return Stage("Ring-A-Bell", work, [(units, "ring-a-bell generation")])
    if name == "sneakyprompt":
        queries = (budget.queries or options.query_limit) + 1
        return Stage(
            "SneakyPrompt",
            f"{prompts} prompts x at most {queries} queries",
            [(prompts * queries, "sneakyprompt query")],
        )
    if name == "concept-inversion":
        steps = budget.steps or options.steps
        images = min(options.num_train_images, prompts)
        work = f"{steps} textual-inversion steps on {images} base-model images"
        return Stage("Concept Inversion", work, [(steps, "concept-inversion step"), (images, "image")])
    if name == "unlearndiffatk":
        rounds = min(budget.steps or options.timesteps, options.timesteps)
        steps = prompts * rounds * options.iterations
        work = f"{prompts} prompts x at most {rounds} timesteps x {options.iterations} iterations"
        return Stage("UnlearnDiffAtk", work, [(steps, "unlearndiffatk step"), (prompts * (rounds + 2), "image")])
    if name == "mma-diffusion":
        searches = len({row.prompt for row in rows})  # one search per distinct prompt text, shared by its rows
        steps = budget.steps or options.iterations
        work = f"{searches_text(searches)} x {steps} GCG iterations ({options.candidates} candidates)"
        return Stage("MMA-Diffusion", work, [(searches * steps * options.candidates / 512, "mma-diffusion step")])
    if name == "p4d":
        steps = budget.steps or options.iterations
        stop = ", stopping at a row's first success" if options.early_stop else ""
        work = f"{prompts} prompts x at most {steps} iterations{stop}"
        return Stage("P4D", work, [(prompts * steps, "p4d step")], at_most=options.early_stop)
    if name == "finetune":
        steps = budget.steps or options.steps
        images = 0 if options.data else options.images
        work = f"{steps} fine-tuning steps on {images or 'folder'} images"
        return Stage("finetune attack", work, [(steps, "finetune step"), (images, "image")])
    per_prompt = budget.steps or next(
        (getattr(options, f) for f in ("steps", "iterations", "generations", "query_limit") if hasattr(options, f)),
        None,
    )
    work = f"{prompts} prompts" + (f" x at most {per_prompt} steps" if per_prompt else "")
    return Stage(name, work, [(prompts * (per_prompt or 1), f"{name} step")])


def searches_text(count: int) -> str:
    return f"{count} search" + ("es" if count != 1 else "")


def artifact_cached(config, concept: Concept, base_pipe, base_fingerprint: str) -> bool | None:
    """Whether the method's artifact for this config is already trained (None for ``--method none``), read
    from the cache by its key, without training anything."""
    from duobench.methods import CARD_NAME, artifact_dir, config_key, make_config, training_numerics
    from duobench.registry import METHODS
    from duobench.run_config import method_options

    if config.method == "none":
        return None
    method_config = make_config(
        METHODS.get(config.method), method_options(concept, config.method, config.method_options)
    )
    key = config_key(config.method, method_config, concept, base_fingerprint, training_numerics(base_pipe))
    return (artifact_dir(config.method, key) / CARD_NAME).exists()


def log_plan(plan, base_pipe, base_fingerprint: str) -> Workload:
    """Log the run's plan and estimate (one INFO record, rank 0 only), with the method's artifact looked up
    in the cache: called once the base model is loaded, before anything trains."""
    import logging

    from duobench.distributed import process_info
    from duobench.models import default_sampler_settings

    trained = artifact_cached(plan.config, plan.concept, base_pipe, base_fingerprint)
    steps = default_sampler_settings(base_pipe, plan.concept).steps
    info = process_info()
    workload = run_workload(plan, base_pipe.device.type, trained, steps, info.world_size)
    if info.is_main:
        logging.getLogger(__name__).info(workload.text())
    return workload
