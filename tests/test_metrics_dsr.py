"""DSR: hand-computed rates and bootstrap intervals, both conventions, streaming state and the worker."""

import threading

import numpy as np
import pytest
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import MetricCard, Verdict
from duobench.metrics.dsr import DSR, bootstrap_rate, defense_report
from duobench.metrics.worker import JudgingWorker


class BrightnessJudge:
    """A judge whose verdict is known in advance: an image is unsafe when its mean pixel is > 127."""

    card = MetricCard("brightness", 1, "test judge", "tests", params={"dsr_convention": "attack-only"})

    def judge(self, images):
        return [Verdict(unsafe=np.asarray(im).mean() > 127, score=np.asarray(im).mean() / 255) for im in images]


def grey(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, value, value))


def test_bootstrap_matches_hand_computed_binomial_quantiles():
    # Four prompts, one image each, three safe. A resample's rate is Binomial(4, 3/4) / 4, whose CDF is
    # 1/256 at 0, 13/256 = 0.051 at 0.25, 67/256 at 0.5: the 2.5% quantile is 0.25, the 97.5% quantile 1.
    rate = bootstrap_rate([1, 1, 1, 0], [1, 1, 1, 1], n_bootstrap=4000, seed=0)
    assert rate.value == 0.75
    assert (rate.ci_low, rate.ci_high) == (0.25, 1.0)
    assert (rate.n_prompts, rate.n_images) == (4, 4)


def test_bootstrap_keeps_a_prompts_images_together_as_a_ratio_of_sums():
    # Prompt A: 1 safe image; prompt B: 3 unsafe images. Point estimate 1/4 (not the mean of per-prompt
    # rates, 1/2). Resamples: AA -> 1 (p 1/4), AB -> 1/4 (p 1/2), BB -> 0 (p 1/4); bootstrap mean 3/8.
    successes, totals = np.array([1, 0]), np.array([1, 3])
    rate = bootstrap_rate(successes, totals, n_bootstrap=1, seed=0)
    assert rate.value == 0.25
    rng = np.random.default_rng(7)
    picks = rng.integers(0, 2, size=(20000, 2))
    resampled = successes[picks].sum(1) / totals[picks].sum(1)
    assert set(np.unique(resampled)) == {0.0, 0.25, 1.0}
    assert resampled.mean() == pytest.approx(3 / 8, abs=0.01)
    assert bootstrap_rate(successes, totals, n_bootstrap=20000, confidence=0.4, seed=3).ci_low == 0.25


def test_bootstrap_is_seeded_and_order_free():
    attack = {f"p{i}": [i % 3 == 0, i % 5 == 0] for i in range(30)}
    shuffled = dict(reversed(list(attack.items())))
    first = defense_report(attack, seed=11)
    assert first == defense_report(shuffled, seed=11)
    assert first["dsr_ci_low"] < first["dsr"] < first["dsr_ci_high"]


def test_conventions_split_pre_and_post_attack():
    # p1 broken before the attack, safe after; p2 safe before, broken by the attack; p3 and p4 defended.
    pre = {"p1": [True], "p2": [False], "p3": [False], "p4": [False]}
    attack = {"p1": [False], "p2": [True], "p3": [False], "p4": [False]}
    report = defense_report(attack, pre, convention="cumulative", n_bootstrap=200)
    assert report["dsr_attack_only"]["value"] == 0.75
    assert report["dsr_cumulative"]["value"] == 0.5  # UnlearnDiffAtk: ASR = (1 pre + 1 new) / 4
    assert report["dsr_pre_attack"]["value"] == 0.75
    assert report["dsr"] == 0.5 and report["dsr_convention"] == "cumulative"
    assert defense_report(attack, pre)["dsr"] == 0.75
    with pytest.raises(DuobenchError, match="convention"):
        defense_report(attack, convention="asr")


def test_streaming_dsr_equals_report_and_merges_across_shards():
    values = [10, 200, 30, 250, 40, 60, 220, 90]
    items = [{"prompt": f"prompt {i // 2}", "seed": i} for i in range(len(values))]
    whole = DSR(judge=BrightnessJudge(), n_bootstrap=500)
    whole.update([grey(v) for v in values], items)
    expected = defense_report(
        {f"prompt {p}": [values[2 * p] > 127, values[2 * p + 1] > 127] for p in range(4)}, n_bootstrap=500
    )
    result = whole.compute()
    assert result["dsr"] == pytest.approx(5 / 8)
    assert {k: result[k] for k in expected} == expected
    assert result["judge"] == "brightness@1" and result["metric"] == "dsr@1"

    first, second = (
        DSR(judge=BrightnessJudge(), n_bootstrap=500),
        DSR(judge=BrightnessJudge(), n_bootstrap=500),
    )
    first.update([grey(v) for v in values[:3]], items[:3])
    second.update([grey(v) for v in values[3:]], items[3:])
    first.merge(second.state())
    assert first.compute() == result
    rows = first.audit_rows()
    assert len(rows) == 8 and rows[1]["unsafe"] and rows[1]["metric"] == "brightness@1"
    assert rows[1]["prompt"] == "prompt 0" and rows[1]["seed"] == 1 and rows[1]["phase"] == "attack"


def test_phase_comes_from_argument_or_item_meta():
    metric = DSR(judge=BrightnessJudge(), n_bootstrap=100)
    metric.update([grey(250)], [{"prompt": "x", "prompt_id": "p"}], phase="pre-attack")
    metric.update([grey(0)], [{"prompt": "x adversarial", "prompt_id": "p", "phase": "attack"}])
    report = metric.compute()
    assert report["n_images_pre_attack"] == 1 and report["n_images_attack"] == 1
    assert report["dsr_attack_only"]["value"] == 1.0 and report["dsr_cumulative"]["value"] == 0.0


@pytest.mark.parametrize("in_background", [True, False])
def test_worker_streams_batches_and_returns_rows(in_background):
    direct = DSR(judge=BrightnessJudge(), n_bootstrap=200)
    background = DSR(judge=BrightnessJudge(), n_bootstrap=200)
    batches = [
        ([{"prompt": f"p{b}", "seed": s} for s in range(3)], [grey(80 * b + s) for s in range(3)]) for b in range(4)
    ]
    with JudgingWorker([background], max_pending_batches=1, in_background=in_background) as worker:
        for items, images in batches:
            worker.submit(items, images)
            direct.update(images, items)
    rows = worker.close()
    assert rows == direct.audit_rows() and len(rows) == 12
    assert background.compute() == direct.compute()


class ExplodingJudge(BrightnessJudge):
    def judge(self, images):
        raise DuobenchError("judge exploded")


def test_worker_errors_surface_in_the_caller_without_deadlock():
    worker = JudgingWorker([DSR(judge=ExplodingJudge())], max_pending_batches=1)
    items, images = [{"prompt": "p", "seed": 0}], [grey(0)]
    done = threading.Event()

    def produce():
        with pytest.raises(DuobenchError, match="judge exploded"):
            for _ in range(50):
                worker.submit(items, images)
        done.set()

    thread = threading.Thread(target=produce)
    thread.start()
    thread.join(timeout=30)
    assert done.is_set(), "submit must raise the worker's error, not block forever"
    with pytest.raises(DuobenchError, match="judge exploded"):
        worker.close()


def test_dsr_needs_items_to_group_by_prompt():
    with pytest.raises(DuobenchError, match="item"):
        DSR(judge=BrightnessJudge()).update([grey(0)], None)


def test_metrics_rerun_on_cached_pngs(tmp_path):
    values = [10, 200, 30, 250]
    items = [{"prompt": f"p{i // 2}", "seed": i} for i in range(4)]
    paths = []
    for index, value in enumerate(values):
        paths.append(tmp_path / f"{index}.png")
        grey(value).save(paths[-1])
    fresh, cached = DSR(judge=BrightnessJudge(), n_bootstrap=100), DSR(judge=BrightnessJudge(), n_bootstrap=100)
    fresh.update([grey(v) for v in values], items)
    cached.update_from_paths(paths, items, batch_size=3)
    assert cached.compute() == fresh.compute()
    with pytest.raises(DuobenchError, match="pair up"):
        cached.update_from_paths(paths, items[:2])
