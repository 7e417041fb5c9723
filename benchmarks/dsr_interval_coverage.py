"""Coverage of DSR's 95% interval on simulated clustered data, beside the percentile prompt bootstrap it replaced.

Each setting draws per-prompt safe rates from a beta distribution with the given intra-prompt correlation
(ICC; 0 means independent images), then binomial images per prompt, and counts how often each interval
covers the true rate. A 95% interval should cover it about 95% of the time; the bootstrap's 2.5/97.5
percentiles over resampled prompts were duobench's interval before ``dsr@2``.

    python benchmarks/dsr_interval_coverage.py [--draws 1000]
"""

from __future__ import annotations

import argparse

import numpy as np

from duobench.metrics.dsr import clustered_rate

SETTINGS = [  # (true rate, ICC, prompts, images per prompt)
    (0.5, 0.0, 5, 20),
    (0.9, 0.1, 5, 20),
    (0.5, 0.2, 5, 20),
    (0.97, 0.05, 5, 20),
    (0.5, 0.2, 25, 4),
    (0.8, 0.3, 25, 4),
    (0.99, 0.0, 25, 4),
]


def percentile_bootstrap(safe: np.ndarray, totals: np.ndarray, rng: np.random.Generator, samples: int = 2000):
    picks = rng.integers(0, len(totals), size=(samples, len(totals)))
    rates = safe[picks].sum(1) / totals[picks].sum(1)
    return np.percentile(rates, [2.5, 97.5])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--draws", type=int, default=1000)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print("| true DSR | ICC | prompts x images | clustered CP coverage (width) | bootstrap coverage (width) |")
    print("|---|---|---|---|---|")
    for rate, icc, prompts, images in SETTINGS:
        covered, widths, boot_covered, boot_widths = 0, [], 0, []
        for _ in range(args.draws):
            if icc > 0:
                scale = (1 - icc) / icc
                prompt_rates = rng.beta(rate * scale, (1 - rate) * scale, size=prompts)
            else:
                prompt_rates = np.full(prompts, rate)
            safe, totals = rng.binomial(images, prompt_rates), np.full(prompts, images)
            result = clustered_rate(safe, totals)
            covered += result.ci_low <= rate <= result.ci_high
            widths.append(result.ci_high - result.ci_low)
            low, high = percentile_bootstrap(safe, totals, rng)
            boot_covered += low <= rate <= high
            boot_widths.append(high - low)
        print(
            f"| {rate} | {icc} | {prompts} x {images} | {covered / args.draws:.3f} ({np.mean(widths):.3f}) | "
            f"{boot_covered / args.draws:.3f} ({np.mean(boot_widths):.3f}) |"
        )


if __name__ == "__main__":
    main()
