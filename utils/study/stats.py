"""The study's statistics: mean +- sd over seeds and paired bootstrap deltas over test images.

The delta of a variant to the baseline is averaged over the seeds both have; its interval comes from
resampling test images with replacement, the same resample for both variants and every seed, and recomputing
COCO mAP of each on it. Matching is done once per run (utils.ops.coco_map.coco_matches); a resample only
re-weights the matched detections, so a thousand resamples cost seconds. The interval says how much the
delta would move with another draw of test images of this kind; the seed spread shows in the sd columns.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from utils.ops.coco_map import CocoMatches, mean_ap, precision_from_matches, resampled_maps

METRICS = ("map50", "map50_95")
RunMaps = tuple[np.ndarray, np.ndarray]     # a run's (map50, map50_95) [2] and the same on each resample [R, 2]


@dataclass
class Delta:
    """Variant minus baseline: the point estimate and its bootstrap interval."""

    value: float
    low: float
    high: float

    @property
    def within_noise(self) -> bool:
        """The interval covers 0 (or could not be computed)."""
        return not (self.low > 0 or self.high < 0)


def mean_sd(values: list[float]) -> tuple[float, float]:
    """Mean and sample sd (n - 1); sd is NaN for fewer than two values, both NaN for none."""
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return math.nan, math.nan
    mean = float(np.mean(finite))
    return mean, float(np.std(finite, ddof=1)) if len(finite) > 1 else math.nan


def resample_weights(num_images: int, resamples: int, seed: int = 0) -> np.ndarray:
    """[resamples, N]: how often each image is drawn in each resample of N images with replacement."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(num_images, np.full(num_images, 1.0 / num_images), size=resamples).astype(float)


def run_maps(matches: CocoMatches, weights: np.ndarray) -> RunMaps:
    """A run's (map50, map50_95) and the same on each resample (weights [R, N], from resample_weights)."""
    return np.array(mean_ap(precision_from_matches(matches))), resampled_maps(matches, weights)


def paired_deltas(baseline: dict[int, CocoMatches], variant: dict[int, CocoMatches], weights: np.ndarray,
                  level: float = 0.95) -> dict[str, Delta] | None:
    """Deltas (variant - baseline) of map50 and map50_95 over the seeds both have; None without a common seed."""
    return deltas_of_maps({s: run_maps(m, weights) for s, m in baseline.items()},
                          {s: run_maps(m, weights) for s, m in variant.items()}, level)


def deltas_of_maps(baseline: dict[int, RunMaps], variant: dict[int, RunMaps],
                   level: float = 0.95) -> dict[str, Delta] | None:
    """paired_deltas from each seed's maps and resampled maps, the resamples the same for every run."""
    seeds = sorted(set(baseline) & set(variant))
    if not seeds:
        return None
    full = np.mean([variant[s][0] - baseline[s][0] for s in seeds], axis=0)          # [2]
    boot = np.mean([variant[s][1] - baseline[s][1] for s in seeds], axis=0)          # [R, 2]
    tail = (1 - level) / 2 * 100
    out = {}
    for k, metric in enumerate(METRICS):
        finite = boot[:, k][np.isfinite(boot[:, k])]
        low, high = (np.percentile(finite, [tail, 100 - tail]) if len(finite) else (math.nan, math.nan))
        out[metric] = Delta(float(full[k]), float(low), float(high))
    return out
