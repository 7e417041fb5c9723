"""Running an attack over a prompt set with a per-prompt cache, and writing the adversarial prompt set.

Cache layout, under ``<cache_dir>/<attack>/<run key>/``:

- ``items/<item key>.json`` (+ ``.safetensors`` for an embedding): one finished prompt. The embedding is
  written first and the JSON last, each atomically, so a JSON file under its final name is a complete
  result; an attack killed mid-prompt-set resumes at the first prompt without one.
- ``edit/<run key>/``: a model-changing attack's artifact (its weights and ``card.json``), the folder an
  `duobench.edits.Edit` points at;
- ``prepare/``: what ``prepare`` keeps between runs (a concept vector, a learned token).
- ``card.json``: the attack, its config, the budget, the concept and the model identities.

Two processes that need the same run at once attack once: the first holds ``<run key>.lock`` beside the
folder while it attacks (`duobench.locks.exclusive_for_job`), the second waits and then reads the first's
results. The ranks of one torchrun job attack together: the prompts still to attack are spread over the
ranks, all rows of one prompt on one rank (Ring-A-Bell and MMA-Diffusion search once per prompt), and every
rank then reads every result from the cache. An attack whose prompts share one optimisation
(``shares_work_across_prompts``, Concept Inversion's learned token) runs on rank 0 alone, as a
model-changing attack does, while the other ranks wait.

The run key hashes the attack name, config, budget, concept content (comments aside) and the identity of
exactly what the attack may touch (`access_identity`): for a text-encoder attack the base model plus the
edits that touch the text encoder (so Ring-A-Bell's prompts, found once, serve every method that keeps SD's
text encoder), the whole target system (base + edit chain) and the sampler settings for a black-box attack,
and the target and base systems for a white-box one; plus, on a CPU, the torch thread count the search runs
with. The item key hashes the prompt row.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import json
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

from duobench.attacks.base import Attack, AttackLog, AttackModels, AttackResult, Budget, grant_access
from duobench.cache import atomic_write_bytes
from duobench.concepts import Concept, PromptSetSpec, attack_identity
from duobench.distributed import barrier, process_info
from duobench.edits import Edit, System, as_system
from duobench.errors import DuobenchError
from duobench.items import SamplerSettings, WorkItem
from duobench.locks import exclusive_for_job, from_main_rank, owner_tag
from duobench.metrics.base import Judge, card_identity
from duobench.options import build_config
from duobench.paths import duobench_home
from duobench.progress import track_each
from duobench.prompts import PromptRow, PromptSet, load_prompt_set
from duobench.registry import ATTACKS

CSV_COLUMNS = (
    "prompt",
    "evaluation_seed",
    "evaluation_guidance",
    "height",
    "width",
    "source_prompt",
    "replay",
    "token_ids",
    "embedding",
    "attack",
    "unsafe",
    "judge_score",
    "final_loss",
    "queries",
    "seconds",
    "case_number",
)


def make_attack(name: str, options: dict[str, Any] | None = None) -> Attack:
    """The registered attack ``name`` built from its config defaults plus ``options``."""
    attack_cls = ATTACKS.get(name)
    return attack_cls(build_config("Attack", name, attack_cls.config_cls, options))


def run_key(attack_name: str, attack: Attack, budget: Budget, concept: Concept, access_identity: dict[str, Any]) -> str:
    payload = {
        "attack": attack_name,
        "config": asdict(attack.config) if is_dataclass(attack.config) else attack.config,
        "budget": asdict(budget),
        "concept": attack_identity(concept),
        "access": access_identity,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def item_key(row: PromptRow) -> str:
    identity = {
        "prompt": row.prompt,
        "seed": row.seed,
        "guidance": row.guidance,
        "h": row.height,
        "w": row.width,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:24]


class ResultStore:
    """Finished attack results by item key, each written atomically (see the module docstring)."""

    def __init__(self, folder: Path) -> None:
        self.folder = Path(folder)

    def _json(self, key: str) -> Path:
        return self.folder / f"{key}.json"

    def has(self, key: str) -> bool:
        return self._json(key).exists()

    def put(self, key: str, result: AttackResult) -> AttackResult:
        if result.embedding is not None:
            from safetensors.torch import save

            embedding_file = self.folder / f"{key}.safetensors"
            tensor = result.embedding.detach().float().cpu().contiguous()
            atomic_write_bytes(embedding_file, save({"prompt_embeds": tensor}))
            result.embedding_path = str(embedding_file)
            result.embedding = None
        record = result_record(result)
        if record["embedding_path"] is not None:
            record["embedding_path"] = Path(record["embedding_path"]).name
        atomic_write_bytes(self._json(key), json.dumps(record, indent=1, default=float).encode())
        return result

    def get(self, key: str) -> AttackResult:
        record = json.loads(self._json(key).read_text())
        if record.get("embedding_path"):
            record["embedding_path"] = str(self.folder / record["embedding_path"])
        return result_from_record(record)


def result_record(result: AttackResult) -> dict[str, Any]:
    """A JSON-ready dict of a result (its in-memory embedding tensor excluded)."""
    record = {f.name: getattr(result, f.name) for f in fields(result) if f.name not in {"embedding", "log"}}
    record["token_ids"] = list(result.token_ids) if result.token_ids is not None else None
    record["log"] = asdict(result.log)
    return record


def result_from_record(record: dict[str, Any]) -> AttackResult:
    values = dict(record)
    values["log"] = AttackLog(**values.get("log", {}))
    return AttackResult(**values)


def resolve_rows(concept: Concept, prompt_set: PromptSet | PromptSetSpec | str, limit: int | None) -> list[PromptRow]:
    """Rows of a loaded set, a spec, a name in ``concept.prompt_sets``, or a path / ``hf:`` id."""
    if isinstance(prompt_set, PromptSet):
        rows = list(prompt_set.rows)
    elif isinstance(prompt_set, str) and prompt_set in concept.prompt_sets:
        rows = list(load_prompt_set(concept.prompt_sets[prompt_set], name=prompt_set).rows)
    elif isinstance(prompt_set, str) and not (prompt_set.startswith("hf:") or Path(prompt_set).exists()):
        raise DuobenchError(
            f"{prompt_set!r} is neither a prompt set of concept {concept.name!r} "
            f"({', '.join(concept.prompt_sets)}) nor an existing prompt file or hf:<dataset id>."
        )
    else:
        rows = list(load_prompt_set(prompt_set).rows)
    return rows[:limit] if limit is not None else rows


def access_identity(
    attack: Attack, target: System, base: System, settings: SamplerSettings, judge: Judge | None, clip_scorer
) -> dict[str, Any]:
    """What the attack's result depends on besides its config: the identity of what it may touch, and the
    CPU thread count an optimising attack runs with (`duobench.methods.training_numerics`).

    A text-encoder attack sees the base model's text encoder plus the edits that touch it, so its prompts
    are shared by every method that leaves the encoder alone; a black- or white-box attack sees the whole
    system (base + edit chain), and a white-box one the base model as well. Judges and scorers enter by
    card (id, parameters, weights sha256), never by the path their weights happen to live at.
    """
    from duobench.methods import training_numerics

    if attack.access == "none":
        return {}
    numerics = training_numerics(target.pipe)
    if attack.access == "text-encoder":
        return {"text_encoder": target.identity_for(("text_encoder",)), "numerics": numerics}
    identity: dict[str, Any] = {
        "numerics": numerics,
        "target": target.fingerprint,
        "settings": asdict(settings),
        "judge": card_identity(judge.card),
        "clip_scorer": scorer_identity(clip_scorer),
    }
    if attack.access == "white-box":
        identity["base"] = base.fingerprint
    return identity


def scorer_identity(clip_scorer) -> dict[str, Any] | str | None:
    """A CLIP scorer's metric card, or its name for a plain callable; None means the attack's default."""
    if clip_scorer is None:
        return None
    card = getattr(clip_scorer, "card", None)
    if card is not None:
        return card_identity(card)
    name = getattr(clip_scorer, "__qualname__", type(clip_scorer).__qualname__)
    return f"{getattr(clip_scorer, '__module__', '')}.{name}"


@dataclass
class AttackRun:
    """One attack over one prompt set against one system, resolved and keyed (`plan_attack`)."""

    name: str
    attack: Attack
    concept: Concept
    budget: Budget
    rows: list[PromptRow]
    target: System
    base: System | None
    settings: SamplerSettings
    judge: Judge | None
    clip_scorer: Any
    identity: dict[str, Any]
    run_dir: Path

    @contextlib.contextmanager
    def granted(self) -> Iterator[AttackModels]:
        """The models the attack's access level grants, checked unchanged when it is done (`read_only`)."""
        _write_card(self.run_dir, self.name, self.attack, self.budget, self.concept, self.identity)
        models = grant_access(
            self.attack.access,
            self.run_dir / "prepare",
            self.settings,
            self.target,
            self.base,
            self.judge,
            self.clip_scorer,
        )
        models.workdir.mkdir(parents=True, exist_ok=True)
        with read_only(self.name, self.attack.access, self.target, self.base, self.run_dir):
            yield models


def plan_attack(
    attack_name, concept, target, base, prompt_set, budget, cache_dir, judge, options, settings, clip_scorer, limit
) -> AttackRun:
    """Build the attack, resolve rows and settings, check what it needs, and key its run."""
    from duobench.models import default_sampler_settings

    attack = make_attack(attack_name, options)
    budget = budget or Budget()
    rows = resolve_rows(concept, prompt_set, limit)
    target = as_system(target)
    base = as_system(base) if base is not None else None
    settings = settings or default_sampler_settings(target.pipe)
    if attack.access in {"black-box", "white-box"} and judge is None:
        raise DuobenchError(
            f"The {attack_name} attack checks its prompts with the concept's judge ({concept.judge}); pass the judge."
        )
    if attack.access == "white-box" and base is None:
        raise DuobenchError(
            f"The {attack_name} attack is white-box: it needs the base model as well as the unlearned one "
            "(its target images come from the base model). Load the base model and pass it too."
        )
    identity = access_identity(attack, target, base, settings, judge, clip_scorer)
    run_dir = (
        Path(cache_dir or duobench_home() / "attacks")
        / attack_name
        / run_key(attack_name, attack, budget, concept, identity)
    )
    return AttackRun(
        attack_name, attack, concept, budget, rows, target, base, settings, judge, clip_scorer, identity, run_dir
    )


@contextlib.contextmanager
def read_only(attack_name: str, access: str, target: System, base: System | None, run_dir: Path):
    """Fail the run if an attack changed the models it was handed (white-box access is read-only).

    The weights are fingerprinted before and after; on a change, the attack's cached results are deleted
    (they came from a model that no longer exists) and the run stops.
    """
    from duobench.models import pipeline_fingerprint

    handed = {"text-encoder": [("unlearned", target)], "white-box": [("unlearned", target), ("base", base)]}
    watched = [(name, system.pipe) for name, system in handed.get(access, []) if system is not None]
    before = [pipeline_fingerprint(pipe) for _, pipe in watched]
    try:
        yield
    finally:  # also when the attack failed: a changed model is the error to report
        changed = [name for (name, pipe), fp in zip(watched, before, strict=True) if pipeline_fingerprint(pipe) != fp]
        _fail_if_changed(attack_name, changed, run_dir)


def _fail_if_changed(attack_name: str, changed: list[str], run_dir: Path) -> None:
    if changed:
        shutil.rmtree(run_dir, ignore_errors=True)
        raise DuobenchError(
            f"The {attack_name} attack changed the {' and '.join(changed)} model it was handed: its weights "
            "differ after the attack, so every later image of this run would come from another model. Access is "
            "read-only; an attack that changes the model must return an edit instead (produces = 'edit', as "
            "attacks/finetune.py does). Its cached results were deleted."
        )


def run_attack(
    attack_name: str,
    concept: Concept,
    target,
    base,
    prompt_set: PromptSet | PromptSetSpec | str,
    budget: Budget | None = None,
    cache_dir: Path | None = None,
    judge: Judge | None = None,
    *,
    options: dict[str, Any] | None = None,
    settings: SamplerSettings | None = None,
    clip_scorer=None,
    limit: int | None = None,
    on_result: Callable[[AttackResult], None] | None = None,
) -> list[AttackResult]:
    """Attack every row of ``prompt_set`` (a concept's set name, a spec, a path or a loaded set).

    ``target`` is the unlearned model under attack and ``base`` the original model (white-box attacks take
    their target images from it), each a `duobench.edits.System` or a plain pipeline. ``settings`` defaults
    to the target's own sampler defaults. Finished rows come from the cache; the attack's ``prepare`` runs
    only if some row is missing. Returns one result per row, in order (equal rows share one result).
    """
    run = plan_attack(
        attack_name, concept, target, base, prompt_set, budget, cache_dir, judge, options, settings, clip_scorer, limit
    )
    if produces(run.attack) != "prompts":
        raise DuobenchError(f"The {attack_name} attack returns a model edit, not prompts; use run_edit_attack.")
    store = ResultStore(run.run_dir / "items")
    keys = [item_key(row) for row in run.rows]
    todo: dict[str, PromptRow] = {}
    for key, row in zip(keys, run.rows, strict=True):
        if not store.has(key):
            todo.setdefault(key, row)
    if from_main_rank(bool(todo)):
        # One process attacks; another that needs the same run waits, then reads what the first stored.
        with exclusive_for_job(run.run_dir, f"running the {attack_name} attack {run.run_dir.name}"):
            # Stored while this one waited? Rank 0's view decides, so that the ranks split one list.
            todo = dict(from_main_rank([(key, row) for key, row in todo.items() if not store.has(key)]))
            pending = this_ranks_rows(run.attack, list(todo.items()))
            if pending:
                with run.granted() as models:
                    run.attack.prepare(concept, models, run.rows)
                    results = track_each(
                        run.attack.attack([row for _, row in pending], run.budget),
                        attack_name,
                        len(pending),
                        unit="prompts",
                        live=result_live,
                    )
                    for (key, row), result in zip(pending, results, strict=False):
                        if (result.source_prompt, result.seed) != (row.prompt, row.seed):
                            raise RuntimeError(f"attack {attack_name!r} yielded results out of order")
                        store.put(key, result)
                        if on_result is not None:
                            on_result(result)
            barrier()  # every rank's results are stored
        missing = [key for key in todo if not store.has(key)]
        if missing:
            raise RuntimeError(f"attack {attack_name!r} returned {len(todo) - len(missing)} of {len(todo)} results")
    return [store.get(key) for key in keys]


def run_edit_attack(
    attack_name: str,
    concept: Concept,
    target,
    base,
    prompt_set: PromptSet | PromptSetSpec | str,
    budget: Budget | None = None,
    cache_dir: Path | None = None,
    judge: Judge | None = None,
    *,
    options: dict[str, Any] | None = None,
    settings: SamplerSettings | None = None,
    limit: int | None = None,
) -> Edit:
    """Run a model-changing attack once per (attack, config, budget, concept, models) and return its edit.

    The artifact is written into a per-process staging folder and renamed into place when complete, so an
    interrupted attack leaves nothing a later run would trust, and two processes never share a half-written
    folder; a second process that needs the same edit meanwhile waits for the first and reuses it. The
    models handed to the attack are checked unchanged afterwards (`read_only`).
    """
    run = plan_attack(
        attack_name, concept, target, base, prompt_set, budget, cache_dir, judge, options, settings, None, limit
    )
    if produces(run.attack) != "edit":
        raise DuobenchError(f"The {attack_name} attack returns prompts, not a model edit; use run_attack.")
    final = run.run_dir / "edit" / run.run_dir.name
    if not from_main_rank((final / "card.json").exists()):
        with exclusive_for_job(run.run_dir, f"running the {attack_name} attack {run.run_dir.name}"):
            # Else made by another process while this one waited. In a torchrun job rank 0 makes it alone.
            if process_info().is_main and not (final / "card.json").exists():
                _make_edit(run, attack_name, concept, final)
            barrier()
    return Edit("attack", attack_name, final, 1.0, tuple(type(run.attack).touches))


def this_ranks_rows(attack: Attack, pending: list[tuple[str, PromptRow]]) -> list[tuple[str, PromptRow]]:
    """The ``(key, row)`` pairs of ``pending`` this rank attacks: every row of a prompt on one rank, the
    prompts dealt round-robin in order of first appearance; all of them on rank 0 when the attack's prompts
    share one optimisation. All of them without a process group."""
    info = process_info()
    if info.world_size == 1:
        return pending
    if getattr(type(attack), "shares_work_across_prompts", False):
        return pending if info.is_main else []
    order = {prompt: n for n, prompt in enumerate(dict.fromkeys(row.prompt for _, row in pending))}
    return [(key, row) for key, row in pending if order[row.prompt] % info.world_size == info.rank]


def result_live(result: AttackResult) -> dict[str, Any]:
    """What an attack's prompt bar shows after each prompt: its last loss (Ring-A-Bell: best fitness), its
    queries to the target (black-box attacks) and whether the judge found the concept."""
    log = result.log
    return {"last_loss": log.losses[-1] if log.losses else None, "queries": log.queries or None, "unsafe": log.unsafe}


def _make_edit(run: AttackRun, attack_name: str, concept: Concept, final: Path) -> None:
    """The attack's edit, written into this process's staging folder and renamed to ``final``."""
    staging = final.with_name(f"{final.name}.partial-{owner_tag()}")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with run.granted() as models:
            run.attack.prepare(concept, models, run.rows)
            run.attack.make_edit(staging, run.budget)
        if not (staging / "card.json").exists():
            raise RuntimeError(f"attack {attack_name!r} wrote no card.json into its edit folder")
        try:
            staging.rename(final)
        except OSError:
            if not (final / "card.json").exists():  # not another process finishing first (its edit is kept)
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def produces(attack: Attack) -> str:
    """``prompts`` (the default) or ``edit``: what the attack returns."""
    return getattr(type(attack), "produces", "prompts")


def card_details(attack: Any, concept: Concept) -> dict[str, Any]:
    """What an attack reads besides the models and the prompts (Ring-A-Bell: the files its concept vector
    comes from), from its optional ``card_details(concept)``; it goes on the attack's card and summary."""
    details = getattr(attack, "card_details", None)
    return details(concept) if details is not None else {}


def fetch_sources(attack: Any, concept: Concept) -> str:
    """Download and check what the attack reads besides the models (its optional ``fetch_sources(concept)``),
    so a missing file fails while the run is planned; returns what it found."""
    fetch = getattr(attack, "fetch_sources", None)
    return fetch(concept) if fetch is not None else "nothing to fetch"


def _write_card(
    run_dir: Path,
    attack_name: str,
    attack: Attack,
    budget: Budget,
    concept: Concept,
    identity: dict[str, Any],
) -> None:
    card = {
        "attack": attack_name,
        "access": attack.access,
        "config": asdict(attack.config),
        "budget": asdict(budget),
        "concept": concept.name,
        "models": identity,
        **card_details(attack, concept),
    }
    atomic_write_bytes(run_dir / "card.json", json.dumps(card, indent=2, sort_keys=True, default=str).encode())


def write_attack_csv(results: Sequence[AttackResult], path: Path) -> Path:
    """The adversarial prompt set as CSV: an ESD-format prompt file, plus exact token ids and embeddings.

    ``prompt``/``evaluation_seed``/``evaluation_guidance`` make it a plain prompt set any loader reads (as
    text); ``replay`` with ``token_ids`` (77 space-separated ids) or ``embedding`` (a safetensors path) keeps
    the exact form the attack optimised, which `read_attack_csv` + `attack_work_items` restore.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for result in results:
            writer.writerow(
                {
                    "prompt": result.text,
                    "evaluation_seed": result.seed,
                    "evaluation_guidance": "" if result.guidance is None else result.guidance,
                    "height": result.height or "",
                    "width": result.width or "",
                    "source_prompt": result.source_prompt,
                    "replay": result.replay,
                    "token_ids": " ".join(map(str, result.token_ids)) if result.token_ids is not None else "",
                    "embedding": result.embedding_path or "",
                    "attack": result.attack,
                    "unsafe": "" if result.log.unsafe is None else int(result.log.unsafe),
                    "judge_score": "" if result.log.judge_score is None else result.log.judge_score,
                    "final_loss": result.log.losses[-1] if result.log.losses else "",
                    "queries": result.log.queries,
                    "seconds": round(result.log.seconds, 3),
                    "case_number": result.meta.get("case_number", ""),
                }
            )
    return path


def read_attack_csv(path: Path) -> list[AttackResult]:
    """Results back from `write_attack_csv`, ready for `attack_work_items` (logs keep only their summary)."""
    results = []
    with open(path, newline="", encoding="utf-8") as handle:
        for row in csv.DictReader(handle):
            results.append(
                AttackResult(
                    attack=row["attack"],
                    source_prompt=row["source_prompt"],
                    seed=int(row["evaluation_seed"]),
                    guidance=float(row["evaluation_guidance"]) if row["evaluation_guidance"] else None,
                    text=row["prompt"],
                    height=int(row["height"]) if row["height"] else None,
                    width=int(row["width"]) if row["width"] else None,
                    replay=row["replay"],
                    token_ids=tuple(int(t) for t in row["token_ids"].split()) if row["token_ids"] else None,
                    embedding_path=row["embedding"] or None,
                    log=AttackLog(
                        losses=[float(row["final_loss"])] if row["final_loss"] else [],
                        judge_score=float(row["judge_score"]) if row["judge_score"] else None,
                        unsafe=bool(int(row["unsafe"])) if row["unsafe"] else None,
                        queries=int(row["queries"]),
                        seconds=float(row["seconds"]),
                    ),
                    meta={"case_number": row["case_number"]} if row["case_number"] else {},
                )
            )
    return results


def attack_work_items(results: Sequence[AttackResult], settings: SamplerSettings) -> list[WorkItem]:
    """Engine items that evaluate ``results`` on any model."""
    return [result.to_work_item(settings) for result in results]
