"""`duobench validate` catches what would fail a run, before the run loads a model or trains anything."""

from duobench.run_config import RunConfig
from duobench.validate import validate_run


def failures(**overrides) -> dict[str, str]:
    values = {"model": "toy", "concept": "star", "method": "uce", "attack": "ring-a-bell", **overrides}
    config = RunConfig(**values)
    return {check.name: check.detail for check in validate_run(config) if not check.ok}


def test_a_good_toy_configuration_passes_every_check():
    config = RunConfig(model="toy", concept="star", method="duo", attack="ring-a-bell")
    checks = validate_run(config)
    assert [check.name for check in checks if not check.ok] == []
    assert {"model", "concept", "method options", "attack options", "judge weights"} <= {c.name for c in checks}
    assert "reward judge weights" not in {c.name for c in checks}  # DUO optimises against no classifier


def test_bad_options_and_names_fail_their_own_check():
    assert "needs the checkpoint" in failures(method="external")["method options"]
    assert "must be a number" in failures(method="spm", method_options={"lr": "fast"})["method options"]
    assert "k must be in [1, 75]" in failures(attack_options={"k": 99})["attack options"]
    assert "no prompt set 'nudity'" in failures(prompt_set="nudity")["prompt set"]
    assert "Did you mean 'ring-a-bell'" in failures(attack="ring-a-bel")["attack"]
    assert "evaluation judge" in failures(method="pno", method_options={"objective": "toy-star"})["method options"]


def test_a_method_optimising_against_a_classifier_has_its_weights_checked():
    checks = {check.name: check for check in validate_run(RunConfig(model="toy", concept="star", method="pno"))}
    assert checks["reward judge weights"].ok and "toy-star-2@1" in checks["reward judge weights"].detail


def test_a_guard_and_its_checker_are_checked_like_the_judge():
    checks = {c.name: c for c in validate_run(RunConfig(model="toy", concept="star", guard="output-checker"))}
    assert checks["guard"].ok and "image-stage" in checks["guard"].detail
    assert checks["guard checker weights"].ok and "toy-star-2@1" in checks["guard checker weights"].detail
    assert "evaluation judge" in failures(guard="output-checker", guard_options={"checker": "toy-star"})["guard"]
    assert (
        "not a judge preset"
        in failures(guard="output-checker", guard_options={"checker": "fid-toy"})["guard checker weights"]
    )


def test_a_concept_refuses_a_model_family_it_is_not_made_for_before_any_model_loads(tmp_path, monkeypatch):
    import pytest

    from duobench.errors import DuobenchError
    from duobench.run_config import check_run_config, model_family
    from duobench.runner import run

    def forbidden(*args, **kwargs):
        raise AssertionError("no model may load before the concept's model family is checked")

    monkeypatch.setattr("duobench.models.load_pipeline", forbidden)

    models = ("toy", "tiny-random", "CompVis/stable-diffusion-v1-4", "/x/model.ckpt", "tiny-random-sd3", "sd3-medium")
    assert [model_family(m) for m in models] == ["toy", "tiny-random", "sd", "sd", "tiny-random-sd3", "sd3"]
    assert model_family("stabilityai/stable-diffusion-3-medium-diffusers") == "sd3"
    detail = failures(concept="nudity")["model family"]
    assert "--model toy is the toy shapes world" in detail and "--concept star (or leave --concept out)" in detail
    assert "--model CompVis/stable-diffusion-v1-4" in detail
    with pytest.raises(DuobenchError, match="Concept 'nudity' is made for a Stable Diffusion checkpoint"):
        run(RunConfig(model="toy", concept="nudity", method="duo", out=str(tmp_path / "run")))
    with pytest.raises(DuobenchError, match="--concept nudity or --concept violence .*such as --model toy"):
        check_run_config(RunConfig(model="CompVis/stable-diffusion-v1-4", concept="star"))
    check_run_config(RunConfig(model="tiny-random", concept="nudity"))  # random test weights: any concept
    check_run_config(RunConfig(model="my/sd-finetune", concept="violence"))


def test_the_concept_defaults_to_the_models_own(tmp_path):
    from duobench.run_config import resolve_run_config

    def concept_of(config_text: str | None = None, **cli) -> str:
        config_file = None
        if config_text is not None:
            config_file = tmp_path / "config.yaml"
            config_file.write_text(config_text)
        return resolve_run_config(config_file, cli)[0].concept

    assert concept_of(model="toy") == "star"
    assert concept_of("model: toy\n") == "star"
    assert concept_of() == concept_of(model="CompVis/stable-diffusion-v1-4") == concept_of(model="tiny-random")
    assert concept_of() == "nudity"
    assert concept_of("concept: violence\n", model="my/sd-finetune") == "violence"


def test_a_concept_file_without_model_families_fits_any_model(tmp_path):
    from pathlib import Path

    from duobench.concepts import concept_identity, load_concept
    from duobench.run_config import check_model_family

    star = load_concept("star")
    copy = tmp_path / "star.yaml"
    copy.write_text(Path(star.path).read_text().replace("model_families: [toy]\n", ""))
    anywhere = load_concept(str(copy))
    assert anywhere.model_families == () and star.model_families == ("toy",)
    check_model_family(anywhere, "CompVis/stable-diffusion-v1-4")
    # Where a concept applies is in no cache key: declaring it retrains and re-attacks nothing.
    assert concept_identity(anywhere) == concept_identity(star)
