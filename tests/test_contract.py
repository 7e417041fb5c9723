"""Core contract 2.0: identities from base + edit chain, card-keyed stages, read-only access, fail fast."""

from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from duobench.attacks.base import Budget
from duobench.attacks.run import access_identity, make_attack, run_attack, run_key
from duobench.concepts import load_concept, training_identity
from duobench.edits import Edit, System, build_system, chain_fingerprint
from duobench.errors import DuobenchError
from duobench.generator import Generator
from duobench.items import SamplerSettings
from duobench.metrics.base import card_identity, with_weights
from duobench.run_config import RunConfig
from duobench.stages import StageCache

SETTINGS = SamplerSettings(steps=2, height=32, width=32)


def system_with(pipe, *edits: Edit) -> System:
    """A system that names ``edits`` (identity only: nothing is applied)."""
    return System(pipe=pipe, generator=Generator(pipe), base_fingerprint="base-fp", edits=tuple(edits))


def edit(name: str, touches: tuple[str, ...], key: str = "k1") -> Edit:
    return Edit("method", name, Path("/anywhere") / key, 1.0, touches)


def attack_key(name: str, target: System, base: System, judge=None) -> str:
    attack = make_attack(name)
    identity = access_identity(attack, target, base, SETTINGS, judge, None)
    return run_key(name, attack, Budget(), load_concept("star"), identity)


def test_text_encoder_attack_keys_follow_the_edits_that_touch_the_text_encoder(tiny_pipe):
    base = system_with(tiny_pipe)
    unet_only = system_with(tiny_pipe, edit("duo", ("unet",)))
    text_side = system_with(tiny_pipe, edit("text-defense", ("text_encoder",)))
    assert attack_key("ring-a-bell", unet_only, base) == attack_key("ring-a-bell", base, base)
    assert attack_key("ring-a-bell", text_side, base) != attack_key("ring-a-bell", base, base)


def test_black_box_attack_keys_follow_the_whole_edit_chain(tiny_pipe):
    from duobench.metrics.dsr import build_judge

    judge = build_judge("toy-star")
    base = system_with(tiny_pipe)
    keys = {
        attack_key("sneakyprompt", system, base, judge)
        for system in (
            base,
            system_with(tiny_pipe, edit("sd-np", ("conditioning",))),
            system_with(tiny_pipe, edit("text-defense", ("text_encoder",))),
            system_with(tiny_pipe, edit("duo", ("unet",)), edit("finetune", ("unet",), "k2")),
        )
    }
    assert len(keys) == 4


def test_system_fingerprints_name_the_chain_in_order_and_never_a_path():
    a, b = edit("duo", ("unet",), "k1"), edit("finetune", ("unet",), "k2")
    assert chain_fingerprint("fp", []) == "fp"
    assert chain_fingerprint("fp", [a, b]) != chain_fingerprint("fp", [b, a])
    moved = replace(a, artifact=Path("/elsewhere/on/disk") / "k1")
    assert chain_fingerprint("fp", [moved, b]) == chain_fingerprint("fp", [a, b])
    assert chain_fingerprint("fp", [replace(a, strength=0.5), b]) != chain_fingerprint("fp", [a, b])


def test_moving_judge_weights_keeps_attack_keys(tiny_pipe):
    from duobench.metrics.dsr import build_judge

    judge = build_judge("toy-star")

    class Moved:
        card = with_weights(judge.card, "/another/venv/site-packages/judge.safetensors", judge.card.weights_sha256)

    base = system_with(tiny_pipe)
    assert card_identity(Moved.card) == card_identity(judge.card)
    assert attack_key("sneakyprompt", base, base, Moved) == attack_key("sneakyprompt", base, base, judge)
    other_weights = type("Other", (), {"card": with_weights(judge.card, judge.card.weights, "0" * 64)})
    assert attack_key("sneakyprompt", base, base, other_weights) != attack_key("sneakyprompt", base, base, judge)


@dataclass(frozen=True)
class NoOptions:
    pass


class MutatingAttack:
    """A white-box attack that (wrongly) edits the unlearned UNet it was handed."""

    name = "test-mutating"
    access = "white-box"
    config_cls = NoOptions

    def __init__(self, config) -> None:
        self.config = config

    def prepare(self, concept, models, rows) -> None:
        import torch

        with torch.no_grad():
            next(models.target_pipe.unet.parameters()).add_(1.0)

    def attack(self, rows, budget):
        from duobench.attacks.base import AttackResult

        for row in rows:
            yield AttackResult.from_row(self.name, row, row.prompt)


def test_an_attack_that_changes_its_target_fails_the_run(monkeypatch, tmp_path):
    from duobench.metrics.dsr import build_judge
    from duobench.models import load_pipeline
    from duobench.registry import ATTACKS

    monkeypatch.setitem(ATTACKS._entries, "test-mutating", MutatingAttack)
    target, base = load_pipeline("tiny-random", device="cpu"), load_pipeline("tiny-random", device="cpu")
    with pytest.raises(DuobenchError, match="changed the unlearned model it was handed"):
        run_attack(
            "test-mutating",
            load_concept("star"),
            target,
            base,
            "plain",
            cache_dir=tmp_path,
            judge=build_judge("toy-star"),
            settings=SETTINGS,
            limit=1,
        )
    assert not any(tmp_path.rglob("*.json"))  # its cached results are gone


def test_an_edit_applies_and_removes(tiny_pipe, tmp_path, concept):
    """A weight edit through the system, then removed: the base model's images again, bit for bit."""
    import numpy as np

    from duobench.edits import method_edit
    from duobench.items import WorkItem
    from duobench.methods import train_or_load
    from duobench.models import load_pipeline, pipeline_fingerprint

    pipe = load_pipeline("tiny-random", device="cpu")
    artifact, _, _ = train_or_load("uce", pipe, concept, pipeline_fingerprint(pipe), root=tmp_path)
    items = [WorkItem(prompt="a red star", seed=1, steps=3, height=32, width=32)]
    plain = np.asarray(Generator(pipe).sample(items)[0])
    uce = method_edit("uce", artifact, 1.0)
    system = build_system(pipe, pipeline_fingerprint(pipe), [uce])
    edited = np.asarray(system.generator.sample(items)[0])
    uce.remove(system.pipe, None)
    restored = np.asarray(Generator(pipe).sample(items)[0])
    assert not np.array_equal(plain, edited)
    assert np.array_equal(plain, restored)


def toy_config(tmp_path, **values) -> RunConfig:
    defaults = dict(model="toy", concept="star", method="none", attack="none", limit=1, benign_limit=2, device="cpu")
    return RunConfig(**{**defaults, "out": str(tmp_path / "run"), **values})


@pytest.mark.slow
def test_a_card_version_bump_recomputes_exactly_that_stage(tmp_path, monkeypatch):
    import pandas as pd

    from duobench.registry import METRICS
    from duobench.runner import run

    stages = StageCache(tmp_path / "stages")
    first = run(toy_config(tmp_path), stages)
    assert first["cards"]["fid"] == "fid-toy@2" and first["kid"] is not None  # real drawings: independent
    audit = pd.read_parquet(tmp_path / "run" / "audit.parquet")
    assert audit["unsafe"].dtype == "boolean" and audit["score"].dtype == float and audit["seed"].dtype.kind == "i"
    benign = audit[audit["phase"] == "benign"]
    assert benign["prior_preservation"].notna().sum() == benign["clip_score"].notna().sum() == 2 * 4
    assert benign["unsafe"].isna().all() and audit.loc[audit["phase"] == "attack", "unsafe"].notna().all()
    assert benign["image"].map(lambda path: Path(path).is_file()).all() and benign["base_image"].notna().all()
    stages.hits.clear(), stages.misses.clear()
    preset = METRICS.get("fid-toy")
    bumped = replace(preset, card=replace(preset.card, version=preset.card.version + 1))
    monkeypatch.setitem(METRICS._entries, "fid-toy", bumped)
    second = run(toy_config(tmp_path), stages)
    assert dict(stages.misses) == {"fid": 1}
    assert set(stages.hits) == {"judge", "prior_preservation", "clip_score", "close_concepts"}
    assert second["dsr"] == first["dsr"] and second["fid"] == first["fid"]


def test_a_missing_prompt_set_fails_before_any_model_work(tmp_path, monkeypatch):
    from importlib.resources import files

    import yaml

    from duobench.runner import run

    concept_file = tmp_path / "broken.yaml"
    star = yaml.safe_load((files("duobench.concepts") / "star.yaml").read_text())
    star["prompt_sets"]["plain"] = {"source": str(tmp_path / "no-such-prompts.csv")}
    concept_file.write_text(yaml.safe_dump(star))

    def forbidden(*args, **kwargs):
        raise AssertionError("no model may load before the plan is checked")

    monkeypatch.setattr("duobench.models.load_pipeline", forbidden)
    monkeypatch.setattr("duobench.methods.train_or_load", forbidden)
    with pytest.raises(DuobenchError, match="no-such-prompts.csv"):
        run(toy_config(tmp_path, method="duo", concept=str(concept_file)))
    with pytest.raises(DuobenchError, match="limit must be a whole number"):
        run(replace(toy_config(tmp_path), limit="abc"))
    with pytest.raises(DuobenchError, match="strength interpolates"):
        run(replace(toy_config(tmp_path, method="esd-x"), strength=1.5))
    with pytest.raises(DuobenchError, match="batch-size"):
        run(replace(toy_config(tmp_path), batch_size="big"))


def test_checkpoint_sha256_ignores_the_order_safetensors_writes_metadata_in(tmp_path):
    import json

    import torch
    from safetensors.torch import save

    from duobench.provenance import artifact_sha256

    data = save({"w": torch.arange(6.0)}, metadata={"format": "pt", "lora_adapter_metadata": "{}"})
    length = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + length])
    reordered = json.dumps(dict(reversed(list(header.items()))), separators=(",", ":")).encode()
    reordered += b" " * (length - len(reordered))  # same length, so the data offsets stay valid
    folders = {}
    for name, payload in {"a": data, "b": data[:8] + reordered + data[8 + length :]}.items():
        folders[name] = tmp_path / name
        folders[name].mkdir()
        (folders[name] / "weights.safetensors").write_bytes(payload)
    assert (folders["a"] / "weights.safetensors").read_bytes() != (folders["b"] / "weights.safetensors").read_bytes()
    assert artifact_sha256(folders["a"]) == artifact_sha256(folders["b"])
    (folders["b"] / "weights.safetensors").write_bytes(
        save({"w": torch.arange(6.0) + 1}, metadata=header["__metadata__"])
    )
    assert artifact_sha256(folders["a"]) != artifact_sha256(folders["b"])


@pytest.mark.slow
def test_fid_against_the_base_model_has_its_own_card_and_no_kid(tmp_path):
    from duobench.runner import run

    drift = run(toy_config(tmp_path, fid_reference="base"))
    assert drift["cards"]["fid"] == "fid-toy-vs-base@2"
    assert drift["fid"] == pytest.approx(0, abs=0.01)  # the base model's own images (sqrtm of a singular matrix)
    assert drift["kid"] is None  # paired samples (base and target images of the same items): no KID


def test_a_method_never_optimises_against_the_evaluation_judge():
    """A method's reward/objective classifier (its `MethodSpec.scorer_field`) comes from the concept when left
    empty, is hashed into its config, and is refused when it is the evaluation judge or missing."""
    from duobench.methods import MethodSpec, scorer_name, with_scorer

    @dataclass(frozen=True)
    class ScoredConfig:
        objective: str = ""

    spec = MethodSpec("scored", ScoredConfig, train=lambda *a: None, apply=lambda *a: None, scorer_field="objective")
    star = load_concept("star")
    assert star.reward_judge == "toy-star-2" != star.judge
    assert with_scorer(spec, {}, star) == {"objective": "toy-star-2"}
    assert with_scorer(spec, {"objective": "q16-vit-b32"}, star) == {"objective": "q16-vit-b32"}
    with pytest.raises(DuobenchError, match="evaluation judge"):
        with_scorer(spec, {"objective": "toy-star"}, star)
    with pytest.raises(DuobenchError, match="names no reward_judge"):
        scorer_name("", replace(star, reward_judge=""))
    unscored = MethodSpec("plain", ScoredConfig, train=lambda *a: None, apply=lambda *a: None)
    assert with_scorer(unscored, {"objective": "toy-star"}, star) == {"objective": "toy-star"}
    for name in ("nudity", "violence"):
        concept = load_concept(name)
        assert concept.reward_judge and concept.reward_judge != concept.judge


def test_tuning_a_method_in_the_concept_file_keeps_every_attack_key(tmp_path):
    """Attack results are keyed by what attacks read: a new method's options in the concept file recompute no
    attack, a changed attack option or judge does."""
    import yaml

    star = load_concept("star")
    raw = yaml.safe_load(Path(star.path).read_text())

    def key_with(change) -> str:
        edited = dict(raw)
        change(edited)
        path = tmp_path / f"star-{len(list(tmp_path.iterdir()))}.yaml"
        path.write_text(yaml.safe_dump(edited))
        return run_key("ring-a-bell", make_attack("ring-a-bell"), Budget(), load_concept(str(path)), {})

    unchanged = key_with(lambda c: None)
    assert key_with(lambda c: c["method_options"].update({"new-method": {"lr": 1.0}})) == unchanged
    assert key_with(lambda c: c.update(duo_strength=0.9)) == unchanged
    assert key_with(lambda c: c["attack_options"]["ring-a-bell"].update(k=8)) != unchanged
    assert key_with(lambda c: c.update(judge="toy-star-2")) != unchanged


def test_a_concept_extends_another_field_by_field(tmp_path):
    """``extends`` takes the parent's fields, the child's replace them whole, keys hash the merged fields (so an
    edit of the parent reaches its children), relative prompt files follow the parent, and loops are refused."""
    import yaml

    sd3 = load_concept("nudity-sd3")
    nudity = load_concept("nudity")
    assert sd3.model_families == ("sd3",) and sd3.generation == {
        "steps": 28,
        "guidance": 7.0,
        "scheduler": "flow-euler",
    }
    assert sd3.method_options == {"duo": {"base_lr": 3.0e-5, "t_min": 1}}
    assert (sd3.judge, sd3.prompt_sets, sd3.benign_prompts) == (nudity.judge, nudity.prompt_sets, nudity.benign_prompts)
    assert [pair.safe for pair in sd3.duo_pairs] == ["a white woman, realistic photo", "a black woman, realistic photo"]

    parent_dir, child_dir = tmp_path / "parent", tmp_path / "child"
    parent_dir.mkdir(), child_dir.mkdir()
    (parent_dir / "benign.txt").write_text("a circle\n")
    parent = yaml.safe_load(Path(load_concept("star").path).read_text())
    parent["benign_prompts"] = {"source": "benign.txt"}
    (parent_dir / "shapes.yaml").write_text(yaml.safe_dump(parent))
    child_path = child_dir / "shapes-fast.yaml"
    child_path.write_text(
        yaml.safe_dump({"extends": "../parent/shapes.yaml", "name": "shapes-fast", "generation": {"steps": 5}})
    )
    child = load_concept(str(child_path))
    assert child.generation == {"steps": 5} and child.erase_prompt == "star"
    assert Path(child.benign_prompts.source).resolve() == (parent_dir / "benign.txt").resolve()
    before = training_identity(child)
    parent["duo_strength"] = 0.5
    (parent_dir / "shapes.yaml").write_text(yaml.safe_dump(parent))
    assert training_identity(load_concept(str(child_path))) != before

    (parent_dir / "shapes.yaml").write_text(yaml.safe_dump({**parent, "extends": "../child/shapes-fast.yaml"}))
    with pytest.raises(DuobenchError, match="extend each other in a loop"):
        load_concept(str(child_path))
    child_path.write_text(yaml.safe_dump({"extends": "no-such-concept", "name": "x"}))
    with pytest.raises(DuobenchError, match="extends 'no-such-concept'.*Unknown concept"):
        load_concept(str(child_path))
