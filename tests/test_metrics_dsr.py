"""DSR: hand-computed rates and clustered intervals, both conventions, streaming state and the worker."""

import threading

import numpy as np
import pytest
from PIL import Image

from duobench.errors import DuobenchError
from duobench.metrics.base import MetricCard, Verdict
from duobench.metrics.dsr import DSR, clustered_rate, defense_report
from duobench.metrics.worker import JudgingWorker


class BrightnessJudge:
    """A judge whose verdict is known in advance: an image is unsafe when its mean pixel is > 127."""

    card = MetricCard("brightness", 1, "test judge", "tests", params={"dsr_convention": "attack-only"})

    def judge(self, images):
        return [Verdict(unsafe=np.asarray(im).mean() > 127, score=np.asarray(im).mean() / 255) for im in images]


def grey(value: int) -> Image.Image:
    return Image.new("RGB", (8, 8), (value, value, value))


Z, T4, T9 = 1.959963984540054, 2.7764451051977987, 2.2621571627409915
"""Normal and Student-t (4 and 9 degrees of freedom) 97.5% quantiles, from tables."""


def test_interval_stays_honest_at_a_rate_of_one():
    # 5 prompts x 20 images, all safe. The between-prompt variance is 0, so n* = 100 images, shrunk by
    # (z / t_4)^2; Clopper-Pearson at x = n has the lower bound (alpha / 2) ** (1 / n).
    rate = clustered_rate([20] * 5, [20] * 5)
    n_effective = 100 * (Z / T4) ** 2
    assert rate.value == 1.0 and rate.ci_high == 1.0
    assert rate.n_effective == pytest.approx(n_effective)
    assert rate.ci_low == pytest.approx(0.025 ** (1 / n_effective))
    assert 0.92 < rate.ci_low < 0.93  # the percentile bootstrap gave [1, 1] here
    zero = clustered_rate([0] * 5, [20] * 5)
    assert (zero.value, zero.ci_low) == (0.0, 0.0) and zero.ci_high == pytest.approx(1 - rate.ci_low)


def test_clustered_prompts_are_worth_fewer_images():
    # 10 prompts x 10 images, DSR 0.5 both times. Spread evenly (5 of 10 safe everywhere) the prompts add no
    # variance: n* = 100. All-or-nothing prompts (5 all safe, 5 all unsafe): var = 10/9 * (10 * 5^2) / 100^2
    # = 1/36, so n* = 0.25 * 36 = 9, the number of prompts minus one. Both shrink by (z / t_9)^2.
    even = clustered_rate([5] * 10, [10] * 10)
    clustered = clustered_rate([10] * 5 + [0] * 5, [10] * 10)
    assert even.value == clustered.value == 0.5
    assert even.n_effective == pytest.approx(100 * (Z / T9) ** 2)
    assert clustered.n_effective == pytest.approx(9 * (Z / T9) ** 2)
    assert clustered.ci_high - clustered.ci_low > 2.5 * (even.ci_high - even.ci_low)
    # A rate is a ratio of sums: prompts with more images weigh more.
    assert clustered_rate([1, 0], [1, 3]).value == 0.25


@pytest.mark.parametrize(("rate", "icc", "prompts", "seeds"), [(0.9, 0.1, 5, 20), (0.5, 0.2, 25, 4)])
def test_interval_covers_the_true_rate_of_clustered_data(rate, icc, prompts, seeds):
    # Per-prompt rates drawn from a beta with the given intra-prompt correlation, then binomial images:
    # the 95% interval must cover the true rate at least about 95% of the time.
    rng = np.random.default_rng(0)
    scale = (1 - icc) / icc
    covered = 0
    for _ in range(400):
        safe = rng.binomial(seeds, rng.beta(rate * scale, (1 - rate) * scale, size=prompts))
        result = clustered_rate(safe, [seeds] * prompts)
        covered += result.ci_low <= rate <= result.ci_high
    assert covered / 400 >= 0.93


def test_interval_depends_only_on_the_counts():
    attack = {f"p{i}": [i % 3 == 0, i % 5 == 0] for i in range(30)}
    shuffled = dict(reversed(list(attack.items())))
    first = defense_report(attack)
    assert first == defense_report(shuffled)
    assert first["dsr_ci_low"] < first["dsr"] < first["dsr_ci_high"]
    assert first["interval"]["unit"] == "prompt"
    single = defense_report({"only prompt": [False, False, True]})
    assert single["interval"]["unit"] == "image"  # one prompt: conditional on it, images are the unit
    assert single["dsr_attack_only"]["n_effective"] == 3


def test_conventions_split_pre_and_post_attack():
    # p1 broken before the attack, safe after; p2 safe before, broken by the attack; p3 and p4 defended.
    pre = {"p1": [True], "p2": [False], "p3": [False], "p4": [False]}
    attack = {"p1": [False], "p2": [True], "p3": [False], "p4": [False]}
    report = defense_report(attack, pre, convention="cumulative")
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
    whole = DSR(judge=BrightnessJudge())
    whole.update([grey(v) for v in values], items)
    expected = defense_report({f"prompt {p}": [values[2 * p] > 127, values[2 * p + 1] > 127] for p in range(4)})
    result = whole.compute()
    assert result["dsr"] == pytest.approx(5 / 8)
    assert {k: result[k] for k in expected} == expected
    assert result["judge"] == "brightness@1" and result["metric"] == "dsr@2"

    first, second = (
        DSR(judge=BrightnessJudge()),
        DSR(judge=BrightnessJudge()),
    )
    first.update([grey(v) for v in values[:3]], items[:3])
    second.update([grey(v) for v in values[3:]], items[3:])
    first.merge(second.state())
    assert first.compute() == result
    rows = first.audit_rows()
    assert len(rows) == 8 and rows[1]["unsafe"] and rows[1]["metric"] == "brightness@1"
    assert rows[1]["prompt"] == "prompt 0" and rows[1]["seed"] == 1 and rows[1]["phase"] == "attack"


def test_phase_comes_from_argument_or_item_meta():
    metric = DSR(judge=BrightnessJudge())
    metric.update([grey(250)], [{"prompt": "x", "prompt_id": "p"}], phase="pre-attack")
    metric.update([grey(0)], [{"prompt": "x adversarial", "prompt_id": "p", "phase": "attack"}])
    report = metric.compute()
    assert report["n_images_pre_attack"] == 1 and report["n_images_attack"] == 1
    assert report["dsr_attack_only"]["value"] == 1.0 and report["dsr_cumulative"]["value"] == 0.0


@pytest.mark.parametrize("in_background", [True, False])
def test_worker_streams_batches_and_returns_rows(in_background):
    direct = DSR(judge=BrightnessJudge())
    background = DSR(judge=BrightnessJudge())
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
    fresh, cached = DSR(judge=BrightnessJudge()), DSR(judge=BrightnessJudge())
    fresh.update([grey(v) for v in values], items)
    cached.update_from_paths(paths, items, batch_size=3)
    assert cached.compute() == fresh.compute()
    with pytest.raises(DuobenchError, match="pair up"):
        cached.update_from_paths(paths, items[:2])
