"""`duobench validate`: catch a bad run configuration in seconds, not after hours of GPU time.

Each check is independent and reports ok/fail with the reason, so one run of `validate` lists every
problem at once. Nothing is generated or trained; metric presets are built (which loads their weights, the
only reliable proof that the weights are present and match their card). When every check passes,
`plan_workload` counts the run's work (images, trainings and whether they are cached, attack steps) and
estimates its time on the detected device (`duobench.workload`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

from duobench.errors import DuobenchError
from duobench.run_config import RunConfig, attack_options, method_options, metric_presets


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


def _check(name: str, action) -> Check:
    try:
        detail = action() or "ok"
        return Check(name, True, str(detail))
    except DuobenchError as error:
        return Check(name, False, str(error))


def model_reachable(model: str) -> str:
    """Registered names and local paths are checked on disk; a hub id by asking the hub (or its cache)."""
    from duobench.models import _looks_like_registered_name
    from duobench.registry import MODELS

    path = Path(model).expanduser()
    if model in MODELS or _looks_like_registered_name(model):
        MODELS.get(model)
        return f"registered model {model!r}"
    if path.is_dir():
        if not (path / "model_index.json").exists():
            raise DuobenchError(f"{path} has no model_index.json (not a diffusers pipeline folder).")
        return f"local diffusers folder {path}"
    if path.suffix in {".ckpt", ".safetensors"}:
        if not path.exists():
            raise DuobenchError(f"Model file {path} does not exist.")
        return f"single-file checkpoint {path}"
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(model, "model_index.json"), str):
        return f"{model} is in the local HF cache"
    try:
        from huggingface_hub import model_info

        model_info(model, timeout=10)
    except Exception as error:  # offline, unknown id, gated: all mean "cannot get it from here"
        raise DuobenchError(
            f"{model} is neither in the local HF cache nor reachable on the hub ({type(error).__name__}). "
            "Run once with internet, or pass a local folder or single-file checkpoint."
        ) from error
    return f"{model} is reachable on the HF hub"


def validate_run(config: RunConfig) -> list[Check]:
    from duobench.concepts import load_concept
    from duobench.prompts import load_prompt_set
    from duobench.registry import ATTACKS, METHODS

    checks = [_check("model", lambda: model_reachable(config.model))]
    concept_check = _check("concept", lambda: load_concept(config.concept).path)
    checks.append(concept_check)
    if concept_check.ok:
        checks.append(_check("model family", lambda: _model_family(config)))
    checks.append(
        _check(
            "method",
            lambda: (
                "base model"
                if config.method == "none"
                else METHODS.get(config.method) and f"registered method {config.method!r}"
            ),
        )
    )
    checks.append(_check("attack", lambda: ATTACKS.get(config.attack) and f"registered attack {config.attack!r}"))
    if not concept_check.ok:
        return checks
    concept = load_concept(config.concept)
    set_name = config.prompt_set or concept.default_prompt_set
    if set_name not in concept.prompt_sets:
        checks.append(Check("prompt set", False, f"{concept.name!r} has no prompt set {set_name!r}"))
    else:
        checks.append(
            _check(
                f"prompt set {set_name}",
                lambda: f"{len(load_prompt_set(concept.prompt_sets[set_name]))} rows",
            )
        )
    checks.append(_check("benign prompts", lambda: f"{len(load_prompt_set(concept.benign_prompts))} rows"))
    checks.append(_check("method options", lambda: _method_config(config, concept)))
    checks.append(_check("attack options", lambda: _attack_config(config, concept)))
    checks.append(_check("FID reference", lambda: _fid_reference(config, concept)))
    if config.guard != "none":
        checks.append(_check("guard", lambda: _guard(config, concept)))
    presets = {
        "judge": concept.judge,
        **metric_presets(concept, config),
        **_reward_judge(config, concept),
        **_guard_checker(config, concept),
    }
    for role, preset in presets.items():
        checks.append(_check(f"{role} weights", lambda preset=preset, role=role: load_preset(role, preset)))
    return checks


def load_preset(role: str, preset: str) -> str:
    """Build a judge or metric preset, which loads (and, where pinned, checks) its weights: the only reliable
    proof that they are present. Returns its card id and weights."""
    from duobench.metrics.dsr import build_judge
    from duobench.registry import METRICS

    if role in JUDGE_ROLES:
        built = build_judge(preset, role)
    else:
        built = METRICS.get(preset)(**({"reference": (None, None)} if role == "fid" else {}))
    return f"{built.card.id} ({built.card.weights or 'no weights'})"


JUDGE_ROLES = ("judge", "reward judge", "guard checker")
"""The roles `load_preset` builds that must be judge presets (a classifier with verdicts)."""


def _model_family(config: RunConfig) -> str:
    from duobench.run_config import check_model_family, model_family

    check_model_family(config.concept, config.model)
    return f"{config.concept} is made for --model {config.model} (family {model_family(config.model)})"


def _method_config(config: RunConfig, concept) -> str:
    """Build the method's config as a run would (concept defaults under the user's options): unknown or
    invalid options, and a missing checkpoint for ``external``, fail here instead of after the model loads."""
    from duobench.methods import make_config
    from duobench.registry import METHODS

    if config.method == "none":
        return "no method"
    options = method_options(concept, config.method, config.method_options)
    make_config(METHODS.get(config.method), options)
    return f"{config.method} with {options or 'its defaults'}"


def _reward_judge(config: RunConfig, concept) -> dict[str, str]:
    """``{"reward judge": preset}`` for a method that optimises against a classifier (`MethodSpec.scorer_field`),
    so its weights are checked like the judge's; empty otherwise, or when the method's options are invalid
    (the method-options check reports that)."""
    from duobench.registry import METHODS

    if config.method == "none":
        return {}
    try:
        spec = METHODS.get(config.method)
        options = method_options(concept, config.method, config.method_options)
    except DuobenchError:
        return {}
    return {"reward judge": options[spec.scorer_field]} if spec.scorer_field else {}


def _guard(config: RunConfig, concept) -> str:
    """Build the guard as a run would and check it is not the evaluation judge."""
    from duobench.guards.base import check_independent, make_guard

    guard = make_guard(config.guard, config.guard_options, concept)
    check_independent(guard, concept.judge)
    return f"{guard.stage}-stage guard {config.guard!r} with {guard.config}"


def _guard_checker(config: RunConfig, concept) -> dict[str, str]:
    """``{"guard checker": preset}`` for a guard that classifies with a judge preset (``checker_field``), so its
    weights are checked like the judge's; empty otherwise, or when the guard cannot be built (the guard check
    reports that)."""
    from duobench.guards.base import make_guard

    if config.guard == "none":
        return {}
    try:
        guard = make_guard(config.guard, config.guard_options, concept)
    except DuobenchError:
        return {}
    field = getattr(guard, "checker_field", "")
    return {"guard checker": getattr(guard.config, field)} if field else {}


def _attack_config(config: RunConfig, concept) -> str:
    from duobench.attacks.run import fetch_sources, make_attack

    options = attack_options(concept, config.attack, config.attack_options)
    attack = make_attack(config.attack, options)
    return f"{config.attack} with {options or 'its defaults'}; {fetch_sources(attack, concept)}"


def _fid_reference(config: RunConfig, concept) -> str:
    from duobench.metrics.fid_reference import resolve_fid_reference
    from duobench.prompts import load_prompt_set

    benign = load_prompt_set(concept.benign_prompts, limit=config.benign_limit)
    return resolve_fid_reference(config.fid_reference or concept.fid_reference, benign.rows).source


def plan_workload(config: RunConfig):
    """The run's plan and time estimate (`duobench.workload.Workload`), as `duobench run` logs it.

    To say whether the method's artifact is already trained, the base model is loaded (its fingerprint is
    part of the artifact key) when it is on this machine already: a registered model, a local folder or file,
    or a hub model in the HF cache. A model that would have to be downloaded is not: its trainings are then
    reported as not checked.
    """
    import torch

    from duobench.attacks.run import make_attack
    from duobench.concepts import load_concept
    from duobench.models import default_device, default_sampler_settings, load_pipeline, pipeline_fingerprint
    from duobench.run_config import apply_threads
    from duobench.runner import RunPlan, load_prompt_sets
    from duobench.workload import artifact_cached, run_workload

    apply_threads(config)
    concept = load_concept(config.concept)
    prompt_set, benign, close = load_prompt_sets(config, concept)
    attack = None
    if config.attack != "none":
        attack = make_attack(config.attack, attack_options(concept, config.attack, config.attack_options))
    device = torch.device(config.device) if config.device else default_device()
    trained, steps = None, concept.generation.get("steps")
    if config.method != "none" and model_on_disk(config.model):
        pipe = load_pipeline(config.model, device=device)
        trained = artifact_cached(config, concept, pipe, pipeline_fingerprint(pipe))
        steps = default_sampler_settings(pipe, concept).steps
    guard = None
    if config.guard != "none":
        from duobench.guards.base import make_guard

        with contextlib.suppress(DuobenchError):  # the guard's own row reports why it cannot be built
            guard = make_guard(config.guard, config.guard_options, concept)
    plan = RunPlan(config, concept, prompt_set, benign, attack, close=close, guard=guard)
    return run_workload(plan, device.type, trained, steps)


def model_on_disk(model: str) -> bool:
    """Whether loading ``model`` needs no download: a registered model, a local path, or the HF cache."""
    from duobench.models import _looks_like_registered_name
    from duobench.registry import MODELS

    if model in MODELS or _looks_like_registered_name(model) or Path(model).expanduser().exists():
        return True
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "model_index.json"), str)
