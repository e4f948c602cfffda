"""Sentences computed from results: text that follows the data.

A notebook or report that says "the trained encoder beats the untrained one" is only right when the numbers
beside it say so. These functions read the numbers and write the sentence, so the text flips when the
result does (tests/test_verdicts.py runs them on a trained and an untrained model).

* `probe_verdict(result)`: an `evaluate` result -> does I-JEPA beat the untrained encoder and raw pixels by
  more than the probe's noise?
* `prediction_verdict(metrics)`: `prediction_metrics` -> does the predictor beat predicting the mean target?
* `collapse_verdict(rankme, dim)`: a RankMe reading -> healthy, low or collapsed.

The noise of a probe is that of a test-set accuracy: with n test images, an accuracy p has a standard error
sqrt(p (1 - p) / n). Two accuracies measured on the same n images are called apart when they differ by more
than twice the standard error of their difference, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n) (about 3 points
at 50% on 2,000 images). A spread between seeds, when known, widens that band.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

__all__ = ["probe_noise", "probe_margins", "probe_verdict", "prediction_verdict", "collapse_verdict",
           "COLLAPSED_RANKME"]

COLLAPSED_RANKME = 2.0  # below this effective rank the features span about one direction: collapsed


def probe_noise(p1: float, p2: float, n_test: int, seed_spread: float = 0.0) -> float:
    """Two standard errors of the difference of two accuracies (fractions) on the same `n_test` images, in
    points, plus `seed_spread` (points) when the spread between seeds is known."""
    if n_test < 1:
        raise ValueError(f"n_test={n_test} must be at least 1")
    se = math.sqrt(max(p1 * (1 - p1), 0.0) / n_test + max(p2 * (1 - p2), 0.0) / n_test)
    return 200 * se + seed_spread


def _row(result: Mapping, *names: str) -> Optional[Mapping]:
    for r in result["rows"]:
        if any(r["name"].startswith(n) for n in names):
            return r
    return None


def probe_margins(result: Mapping, probe: str = "linear", seed_spread: float = 0.0) -> dict:
    """The numbers behind `probe_verdict`: accuracies in points and margins with their noise.

    Returns {'ijepa', 'untrained', 'pixels', 'vs_untrained', 'vs_pixels', 'noise_untrained', 'noise_pixels',
    'n_test'}; a baseline missing from the result gives None for its entries.
    """
    n = int(result["n_test"])
    ij = _row(result, "ijepa", "trained")
    if ij is None or probe not in ij:
        raise ValueError(f"the result has no I-JEPA row with a {probe!r} accuracy; run evaluate(probes=[{probe!r}])")
    out = {"ijepa": 100 * ij[probe], "n_test": n}
    for key, names in (("untrained", ("random init", "untrained")), ("pixels", ("raw pixels",))):
        r = _row(result, *names)
        if r is None or r.get(probe) is None:
            out.update({key: None, f"vs_{key}": None, f"noise_{key}": None})
            continue
        out[key] = 100 * r[probe]
        out[f"vs_{key}"] = out["ijepa"] - out[key]
        out[f"noise_{key}"] = probe_noise(ij[probe], r[probe], n, seed_spread)
    return out


def _compare(margin: float, noise: float, what: str, accuracies: str) -> str:
    if margin > noise:
        return f"beats {what} by {margin:.1f} points ({accuracies})"
    if margin < -noise:
        return f"does NOT beat {what}: it is {-margin:.1f} points worse ({accuracies})"
    return f"does NOT beat {what} by more than the probe's noise ({accuracies}; {margin:+.1f} points, noise ±{noise:.1f})"


def probe_verdict(result: Mapping, probe: str = "linear", seed_spread: float = 0.0) -> str:
    """One sentence on an `evaluate` result: does the trained encoder beat the untrained one and raw pixels?

    E.g. "The trained encoder beats the untrained encoder by 31.2 points (67.0% against 35.8%) and beats raw
    pixels by 40.1 points (26.9%) (linear probe, 2,000 test images; differences under about 2.9 points are
    noise)."
    """
    m = probe_margins(result, probe, seed_spread)
    name = {"linear": "linear probe", "knn": "kNN"}.get(probe, probe)
    parts = []
    if m["untrained"] is not None:
        parts.append(_compare(m["vs_untrained"], m["noise_untrained"], "the untrained encoder",
                              f"{m['ijepa']:.1f}% against {m['untrained']:.1f}%"))
    if m["pixels"] is not None:
        parts.append(_compare(m["vs_pixels"], m["noise_pixels"], "raw pixels", f"{m['pixels']:.1f}%"))
    if not parts:
        return f"The trained encoder scores {m['ijepa']:.1f}% ({name}); there is no baseline to compare with."
    noise = max(v for v in (m["noise_untrained"], m["noise_pixels"]) if v is not None)
    text = "The trained encoder " + " and ".join(parts) + f" ({name}, {m['n_test']:,} test images; differences " \
           f"under about {noise:.1f} points are noise)."
    if m["untrained"] is not None and m["vs_untrained"] <= m["noise_untrained"]:
        text += " Its features are no better than those it started from: it has not learned yet."
    return text


def prediction_verdict(metrics: Mapping) -> str:
    """One sentence on `prediction_metrics`: does the predictor beat predicting the mean target feature?"""
    cos, base = float(metrics["cosine"]), float(metrics["baseline_cosine"])
    l2, base_l2 = float(metrics["l2"]), float(metrics["baseline_l2"])
    if cos > base and l2 < base_l2:
        return (f"The predictor beats the predict-the-mean baseline: cosine {cos:.3f} against {base:.3f}, L2 error "
                f"{l2:.2f} against {base_l2:.2f}. It uses the context to say what each target patch holds.")
    return (f"The predictor does NOT beat the predict-the-mean baseline (cosine {cos:.3f} against {base:.3f}, L2 "
            f"error {l2:.2f} against {base_l2:.2f}): it has not learned yet to read the context, and guessing "
            f"the average target feature would do as well.")


def collapse_verdict(rankme: float, dim: int, healthy_fraction: float = 0.05) -> str:
    """One sentence on a RankMe reading of D-dimensional features: collapsed, low, or healthy."""
    if rankme < COLLAPSED_RANKME:
        return (f"Collapsed: RankMe {rankme:.1f} of at most {dim}. The features vary along about one direction, "
                f"so every image gets nearly the same vector.")
    if rankme < healthy_fraction * dim:
        return (f"Low rank: RankMe {rankme:.1f} of at most {dim}. The features use only a few directions; typical "
                f"of an untrained or a very briefly trained encoder.")
    return f"Healthy: RankMe {rankme:.1f} of at most {dim}. The features spread over many directions."


def spread(values: Sequence[float]) -> float:
    """Max minus min of a few readings (e.g. one accuracy over seeds), in their own unit; 0 for one reading."""
    values = list(values)
    return (max(values) - min(values)) if len(values) > 1 else 0.0
