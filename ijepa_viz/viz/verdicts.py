"""Sentences computed from results: text that follows the data.

A notebook or report that says "the trained encoder beats the untrained one" is only right when the numbers
beside it say so. These functions read the numbers and write the sentence, so the text flips when the
result does (tests/test_verdicts.py runs them on a trained and an untrained model).

* `probe_verdict(result)`: an `evaluate` result -> does I-JEPA beat the untrained encoder and raw pixels by
  more than the probe's noise?
* `prediction_verdict(metrics)`: `prediction_metrics` -> does the predictor beat predicting the mean target?
* `collapse_verdict(rankme, dim)`: a RankMe reading -> healthy, low or collapsed.
* `paired_verdict(what, a, b, name_a, name_b)`: one measure read item by item for two models (or a model and
  a baseline) on the same items -> is the first better by more than the noise of the paired difference?
* `cluster_verdict(xy, labels, name)`: a 2-D map (t-SNE, PCA) -> do its classes form separate clusters, or
  at least groups?
* `neighbour_purity(feats, labels)`, `neighbour_verdict(purity, chance, name)`: how many of each image's
  nearest neighbours share its class, which is what a t-SNE can show: it keeps neighbourhoods.
* `patch_code_verdict(position_share, image_share, name)`: what sets an encoder's patch features: their
  position, the image as a whole, or each patch's own content?

The noise of a probe is that of a test-set accuracy: with n test images, an accuracy p has a standard error
sqrt(p (1 - p) / n). Two accuracies measured on the same n images are called apart when they differ by more
than twice the standard error of their difference, sqrt(p1 (1 - p1) / n + p2 (1 - p2) / n) (about 3 points
at 50% on 2,000 images). A spread between seeds, when known, widens that band.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

__all__ = ["probe_noise", "probe_margins", "probe_verdict", "prediction_verdict", "collapse_verdict",
           "paired_verdict", "cluster_score", "cluster_verdict", "neighbour_purity", "neighbour_verdict",
           "patch_code_verdict", "COLLAPSED_RANKME", "CLUSTERED_SILHOUETTE", "GATHERING_PURITY", "MIXED_PURITY"]

COLLAPSED_RANKME = 2.0  # below this effective rank the features span about one direction: collapsed
CLUSTERED_SILHOUETTE = 0.25  # a class silhouette from here up: the classes form separate clusters in a 2-D map
GROUPED_SILHOUETTE = 0.05  # from here up to CLUSTERED_SILHOUETTE: the classes lean together but overlap
# Neighbour purity against what a t-SNE showed, for 10 Gaussian classes (benchmarks/cluster_checks.py): from
# GATHERING_PURITY up, the classes gathered (silhouette 0.38-0.83); below MIXED_PURITY they never did (at most
# 0.05); in between, it depended on the dimension (0.17-0.44).
GATHERING_PURITY = 0.7
MIXED_PURITY = 0.4
MAP_NEIGHBOURS = 10  # the neighbours `cluster_verdict` counts on a 2-D map (as `neighbour_purity`)


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
        text += (f" By this probe ({name}) it has not learned yet: its features are no better than those it "
                 f"started from.")
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


def collapse_verdict(rankme: float, dim: int, healthy_fraction: float = 0.1) -> str:
    """One sentence on a RankMe reading of D-dimensional features: collapsed, low, or healthy.

    Healthy needs at least `healthy_fraction` of the D directions. An untrained ViT's pooled features read about
    3-4 whatever D (one shared direction dominates them), so a threshold that a reading of 3.6 could pass for
    64-dimensional features (as 5% did) would call an untrained network healthy.
    """
    if rankme < COLLAPSED_RANKME:
        return (f"Collapsed: RankMe {rankme:.1f} of at most {dim}. The features vary along about one direction, "
                f"so every image gets nearly the same vector.")
    if rankme < healthy_fraction * dim:
        return (f"Low rank: RankMe {rankme:.1f} of at most {dim}. The features use only a few directions; typical "
                f"of an untrained or a very briefly trained encoder.")
    return f"Healthy: RankMe {rankme:.1f} of at most {dim}. The features spread over many directions."


def paired_verdict(what: str, a: Sequence[float], b: Sequence[float], name_a: str, name_b: str, *,
                   higher_is_better: bool = True, percent: bool = False, unit: str = "", digits: int = 1,
                   items: str = "items") -> str:
    """One sentence on one measure read on the same items for two things, e.g. precision@k per query for the
    trained and the untrained encoder: is `name_a` better than `name_b` beyond the noise?

    `a` and `b` hold one value per item, in the same order. The noise is two standard errors of the mean of
    the paired differences a - b. With `percent`, values are fractions shown as % and differences as points.

    E.g. "On precision@8, the trained encoder is better than the untrained encoder: 23.4% against 15.0%, by
    8.4 points, beyond the noise (±2.1 points over 500 queries)."
    """
    a = [float(v) for v in a]
    b = [float(v) for v in b]
    n = len(a)
    if n != len(b) or n < 2:
        raise ValueError(f"paired_verdict needs two equally long readings of at least 2 items, got {n} and {len(b)}")
    scale = 100.0 if percent else 1.0
    diffs = [scale * (x - y) for x, y in zip(a, b)]
    mean = sum(diffs) / n
    sd = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (n - 1))
    noise = 2 * sd / math.sqrt(n)
    ma, mb = scale * sum(a) / n, scale * sum(b) / n
    suffix = "%" if percent else unit
    fa, fb = f"{ma:.{digits}f}{suffix}", f"{mb:.{digits}f}{suffix}"
    d_unit = " points" if percent else unit
    gain = mean if higher_is_better else -mean
    noise_txt = f"±{noise:.{digits}f}{d_unit} over {n:,} {items}"
    if gain > noise:
        return (f"On {what}, {name_a} is better than {name_b}: {fa} against {fb}, by {abs(mean):.{digits}f}"
                f"{d_unit}, beyond the noise ({noise_txt}).")
    if gain < -noise:
        return (f"On {what}, {name_a} is NOT better than {name_b}: it is worse, {fa} against {fb} "
                f"(noise {noise_txt}).")
    return (f"On {what}, {name_a} is NOT better than {name_b} beyond the noise: {fa} against {fb}, a difference "
            f"of {mean:+.{digits}f}{d_unit} within the noise ({noise_txt}).")


def cluster_score(xy, labels) -> float:
    """How well the classes form separate clusters in a 2-D map (a t-SNE or PCA of features): the mean
    silhouette of the points, grouped by class (scikit-learn's `silhouette_score`). For each point,
    (b - a) / max(a, b), where a is its mean distance to its own class and b to the nearest other class: 1 for
    tight, far-apart clusters, about 0 when the classes overlap, negative when points sit nearer another class.
    Small same-class clumps scattered over the map score near 0: a whole class must gather to score high."""
    from sklearn.metrics import silhouette_score
    import numpy as np

    xy, labels = np.asarray(xy, dtype=np.float64), np.asarray(labels)
    if xy.ndim != 2 or len(xy) != len(labels) or len(np.unique(labels)) < 2:
        raise ValueError(f"cluster_score needs (N, 2) points and N labels of at least 2 classes, got points "
                         f"{xy.shape} and {len(labels)} labels")
    return float(silhouette_score(xy, labels))


def cluster_verdict(xy, labels, name: str = "this map") -> str:
    """One sentence on a 2-D map of features coloured by class: separate clusters, a lean, groups, or none.

    First the class silhouette (`cluster_score`): 0.25 or more, separate clusters; 0.05 or more, a lean. A
    silhouette asks each class to gather in ONE place, so a class that gathers in two groups (the dots' light
    and dark figures, say) scores about 0 however clean the groups are. So below 0.05 the map's own neighbour
    purity decides (`neighbour_purity` of the 2-D points, k = MAP_NEIGHBOURS = 10): when at least MIXED_PURITY
    of each point's 10 nearest points on the map share its class, the classes gather in groups, some in more
    than one (or in many small clumps: the sentence gives the share, and says there is no cluster per class).
    E.g. "In the trained encoder's t-SNE the classes do NOT form clusters: the colours are mixed (class
    silhouette -0.09; ...; 14% of each point's 10 nearest points on the map share its class, chance 10%)."."""
    score = cluster_score(xy, labels)
    purity, chance = neighbour_purity(xy, labels, k=MAP_NEIGHBOURS)
    scale = (f"class silhouette {score:.2f}; {CLUSTERED_SILHOUETTE:g} or more means separate clusters, "
             f"about 0 none")
    local = f"{purity:.0%} of each point's {MAP_NEIGHBOURS} nearest points on the map share its class, chance {chance:.0%}"
    if score >= CLUSTERED_SILHOUETTE:
        return f"In {name} the classes form separate clusters ({scale})."
    if score >= GROUPED_SILHOUETTE:
        return f"In {name} images of one class lean together, but the classes overlap: no separate clusters ({scale})."
    if purity >= MIXED_PURITY:
        return (f"In {name} images of one class gather in groups ({local}), but not one cluster per class: a class "
                f"can form more than one group, and groups can touch ({scale}).")
    return f"In {name} the classes do NOT form clusters: the colours are mixed ({scale}; {local})."


def neighbour_purity(feats, labels, k: int = 10) -> tuple[float, float]:
    """(purity, chance): the mean share of each image's k nearest neighbours (Euclidean distance between its
    (N, D) features, itself left out) that share its class, and the same share expected when the labels are
    shuffled, sum_c n_c (n_c - 1) / (N (N - 1)) (0.1 for 10 balanced classes). A t-SNE keeps each point's
    near neighbours near it, so it can gather a class only where the neighbourhoods are mostly that class."""
    import numpy as np
    from sklearn.neighbors import NearestNeighbors

    x, labels = np.asarray(feats, dtype=np.float64), np.asarray(labels)
    n = len(labels)
    if x.ndim != 2 or len(x) != n or not 1 <= k < n or len(np.unique(labels)) < 2:
        raise ValueError(f"neighbour_purity needs (N, D) features, N labels of at least 2 classes and "
                         f"1 <= k < N, got features {x.shape}, {n} labels and k={k}")
    nearest = NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)  # (N, k), not itself
    counts = np.unique(labels, return_counts=True)[1].astype(np.float64)
    return float((labels[nearest] == labels[:, None]).mean()), float((counts * (counts - 1)).sum() / (n * (n - 1)))


def neighbour_verdict(purity: float, chance: float, name: str = "these features", k: int = 10) -> str:
    """One sentence on `neighbour_purity`: do an image's nearest neighbours share its class, and so can a
    t-SNE gather the classes? Above chance means by more than 0.03, about three standard errors of the
    purity of 1,000 images at 10% (neighbourhoods overlap, so it is rougher than a plain mean)."""
    for value, what in ((purity, "purity"), (chance, "chance")):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"{what}={value} must be a share, in [0, 1]")
    head = f"In {name}, {purity:.0%} of an image's {k} nearest neighbours share its class (chance {chance:.0%})"
    if purity >= GATHERING_PURITY:
        return f"{head}: the neighbourhoods a t-SNE keeps are mostly one class, so it can gather the classes."
    if purity >= MIXED_PURITY:
        return (f"{head}: about half of each neighbourhood is one class, so a t-SNE, which keeps neighbourhoods, "
                f"may gather the classes in part, overlapping.")
    if purity > chance + 0.03:
        return (f"{head}: same-class images sit near each other more often than by chance, but most neighbours "
                f"belong to other classes, so a t-SNE, which keeps neighbourhoods, can show small same-class "
                f"clumps at most, not whole classes gathered.")
    return f"{head}: no more than chance, so the neighbourhoods a t-SNE keeps ignore the class."


def patch_code_verdict(position_share: float, image_share: float, name: str = "this encoder") -> str:
    """One sentence on what sets an encoder's patch features (N, P, D), from `features.position_share` (the
    variance of the per-position means) and `features.image_share` (that of the per-image means), both in
    [0, 1]: whichever is above one half dominates; otherwise each patch's own content has a large part.
    E.g. "In the trained encoder, the patches of one image mostly carry one code (83% of the variance is the
    image's mean, 11% the position): ..."."""
    for value, what in ((position_share, "position_share"), (image_share, "image_share")):
        if not 0.0 <= value <= 1.0 + 1e-6:
            raise ValueError(f"{what}={value} must be a share of the variance, in [0, 1]")
    shares = f"{image_share:.0%} of the variance is the image's mean, {position_share:.0%} the position"
    if image_share > 0.5:
        return (f"In {name}, the patches of one image mostly carry one code ({shares}): it describes each image "
                f"as a whole, so the colours below change more from image to image than within one.")
    if position_share > 0.5:
        return (f"In {name}, the patch features are mostly a map of coordinates ({shares}): the plain colours "
                f"paint the position, and only the 'content' rows show what the patches hold.")
    return (f"In {name}, neither the position nor the image as a whole dominates ({shares}): much of each patch's "
            f"feature is its own content.")


def spread(values: Sequence[float]) -> float:
    """Max minus min of a few readings (e.g. one accuracy over seeds), in their own unit; 0 for one reading."""
    values = list(values)
    return (max(values) - min(values)) if len(values) > 1 else 0.0
