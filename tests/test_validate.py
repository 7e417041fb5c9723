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


def test_bad_options_and_names_fail_their_own_check():
    assert "needs the checkpoint" in failures(method="external")["method options"]
    assert "must be a number" in failures(method="spm", method_options={"lr": "fast"})["method options"]
    assert "k must be in [1, 75]" in failures(attack_options={"k": 99})["attack options"]
    assert "no prompt set 'nudity'" in failures(prompt_set="nudity")["prompt set"]
    assert "Did you mean 'ring-a-bell'" in failures(attack="ring-a-bel")["attack"]
