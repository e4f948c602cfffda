"""Sentences computed from results flip with the results (ijepa_viz/viz/verdicts.py)."""
import math

import pytest

from ijepa_viz.viz import verdicts as V


def _result(ijepa, untrained, pixels, n_test=2000):
    return {"n_test": n_test, "rows": [{"name": "ijepa (target encoder)", "linear": ijepa},
                                       {"name": "random init", "linear": untrained},
                                       {"name": "raw pixels", "linear": pixels}]}


def test_probe_noise_is_two_standard_errors_of_the_difference():
    assert V.probe_noise(0.5, 0.5, 2000) == pytest.approx(200 * math.sqrt(0.25 / 2000 * 2))
    assert V.probe_noise(0.5, 0.5, 2000, seed_spread=1.5) == pytest.approx(V.probe_noise(0.5, 0.5, 2000) + 1.5)
    with pytest.raises(ValueError, match="n_test"):
        V.probe_noise(0.5, 0.5, 0)


def test_probe_verdict_says_beats_only_beyond_the_noise():
    good = V.probe_verdict(_result(0.67, 0.36, 0.27))
    assert "beats the untrained encoder by 31.0 points" in good and "beats raw pixels by 40.0 points" in good
    assert "NOT" not in good
    flat = V.probe_verdict(_result(0.138, 0.136, 0.115))
    assert "does NOT beat the untrained encoder by more than the probe's noise" in flat
    assert "has not learned yet" in flat
    worse = V.probe_verdict(_result(0.30, 0.40, 0.10))
    assert "does NOT beat the untrained encoder: it is 10.0 points worse" in worse


def test_probe_margins_without_a_baseline():
    res = {"n_test": 100, "rows": [{"name": "ijepa (target encoder)", "linear": 0.5}]}
    m = V.probe_margins(res)
    assert m["untrained"] is None and m["vs_pixels"] is None
    assert "no baseline" in V.probe_verdict(res)
    with pytest.raises(ValueError, match="knn"):
        V.probe_margins(res, probe="knn")


def test_prediction_verdict_flips_with_the_baseline():
    good = V.prediction_verdict({"cosine": 0.93, "baseline_cosine": 0.86, "l2": 0.4, "baseline_l2": 0.6})
    bad = V.prediction_verdict({"cosine": 0.80, "baseline_cosine": 0.86, "l2": 0.7, "baseline_l2": 0.6})
    assert good.startswith("The predictor beats") and "does NOT" in bad


def test_collapse_verdict_three_ways():
    assert V.collapse_verdict(1.2, 192).startswith("Collapsed")
    assert V.collapse_verdict(4.0, 192).startswith("Low rank")
    assert V.collapse_verdict(40.0, 192).startswith("Healthy")
    # an untrained ViT reads 3-4 at any width: never healthy, not even for narrow features
    assert V.collapse_verdict(3.6, 64).startswith("Low rank")
    assert V.collapse_verdict(3.9, 128).startswith("Low rank")


def test_spread():
    assert V.spread([36.0, 37.5]) == pytest.approx(1.5) and V.spread([3.0]) == 0.0


def test_paired_verdict_better_within_noise_and_worse():
    a = [0.30, 0.25, 0.35, 0.30] * 25
    good = V.paired_verdict("precision@8", a, [x - 0.1 for x in a], "the trained encoder", "the untrained encoder",
                            percent=True, items="queries")
    assert good.startswith("On precision@8, the trained encoder is better than the untrained encoder: 30.0% "
                           "against 20.0%, by 10.0 points") and "100 queries" in good
    noisy = V.paired_verdict("x", [1.0, 0.0] * 10, [0.0, 1.0] * 10, "A", "B")
    assert "NOT better than B beyond the noise" in noisy
    # lower is better: a smaller pixel gap wins
    closer = V.paired_verdict("the pixel gap", [10.0, 12.0, 11.0], [20.0, 21.0, 19.0], "A", "B",
                              higher_is_better=False, unit=" grey levels")
    assert "A is better than B: 11.0 grey levels against 20.0 grey levels, by 9.0 grey levels" in closer
    worse = V.paired_verdict("the pixel gap", [20.0, 21.0, 19.0], [10.0, 12.0, 11.0], "A", "B",
                             higher_is_better=False)
    assert "NOT better than B: it is worse" in worse
    with pytest.raises(ValueError, match="equally long"):
        V.paired_verdict("x", [1.0, 2.0], [1.0], "A", "B")


def test_cluster_score_high_for_separate_classes_near_zero_for_mixed_or_clumped():
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 50)
    centres = np.array([[0, 0], [10, 0], [0, 10], [10, 10]])
    separate = centres[labels] + rng.normal(size=(200, 2))
    mixed = rng.normal(size=(200, 2)) * 5
    # each class in 5 small clumps scattered over the map: locally pure, but no class gathers in one place
    clumps = rng.uniform(-20, 20, size=(20, 2))[np.arange(200) // 10] + 0.3 * rng.normal(size=(200, 2))
    assert V.cluster_score(separate, labels) > 0.6
    assert abs(V.cluster_score(mixed, labels)) < 0.1
    assert V.cluster_score(clumps, labels) < 0.2
    with pytest.raises(ValueError, match="at least 2 classes"):
        V.cluster_score(separate, np.zeros(200))
    # the sentence flips with the picture
    assert "form separate clusters" in V.cluster_verdict(separate, labels, "the trained map")
    assert "do NOT form clusters" in V.cluster_verdict(mixed, labels, "the untrained map")
    leaning = centres[labels] * 0.2 + rng.normal(size=(200, 2))  # the classes overlap, but lean apart
    assert 0.05 <= V.cluster_score(leaning, labels) < 0.25
    assert "lean together" in V.cluster_verdict(leaning, labels)
    # pure clumps: no cluster per class, but same-class groups, and the sentence says so, with the share
    assert "gather in groups" in V.cluster_verdict(clumps, labels) and "not one cluster" in V.cluster_verdict(
        clumps, labels)


def test_cluster_verdict_sees_classes_that_gather_in_two_groups():
    """Each class in two groups of 50 on opposite sides of the map (as the dots' light and dark figures): the
    silhouette says about 0, the map's neighbour purity says the classes gather, and so does the sentence;
    shuffle the labels and it says they are mixed."""
    import numpy as np

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(4), 100)
    side = np.tile(np.repeat([0, 1], 50), 4)  # the first 50 of each class on one side, the rest on the other
    centres = np.stack([np.arange(4) * 5.0, np.zeros(4)], 1)  # (4, 2) group centres along a line
    xy = centres[labels] + rng.normal(size=(400, 2))
    xy[:, 0] += side * 30.0  # the second group of every class far to the right
    assert V.cluster_score(xy, labels) < V.GROUPED_SILHOUETTE
    text = V.cluster_verdict(xy, labels, "the trained t-SNE")
    assert "gather in groups" in text and "not one cluster per class" in text, text
    shuffled = rng.permutation(labels)
    assert "do NOT form clusters" in V.cluster_verdict(xy, shuffled, "the untrained t-SNE")


def test_patch_code_verdict_three_ways_and_bad_shares():
    from ijepa_viz.viz.verdicts import patch_code_verdict

    assert "mostly carry one code (83% of the variance is the image's mean, 11% the position)" in \
        patch_code_verdict(0.11, 0.83, "A")
    assert "map of coordinates" in patch_code_verdict(0.81, 0.12, "B")
    assert "neither the position nor the image" in patch_code_verdict(0.3, 0.3, "C")
    with pytest.raises(ValueError, match="image_share=1.5"):
        patch_code_verdict(0.1, 1.5)


def test_neighbour_purity_and_its_sentence_follow_how_far_the_classes_sit_apart():
    import numpy as np

    from ijepa_viz.viz.features import tsne_2d

    rng = np.random.default_rng(0)
    labels = np.arange(1000) % 10
    means = np.eye(10, 32)  # 10 Gaussian classes in 32 dims, their means `scale` apart along the axes
    readings = {}
    for scale in (0.0, 2.0, 3.0, 4.0):
        x = scale * means[labels] + rng.normal(size=(1000, 32))
        purity, chance = V.neighbour_purity(x, labels)
        readings[scale] = purity, V.cluster_score(tsne_2d(x.astype(np.float32)), labels)
        assert chance == pytest.approx(99 / 999)  # 10 classes of 100: 10 * 100 * 99 / (1000 * 999)
    assert readings[0.0][0] < 0.13 and readings[0.0][1] < V.GROUPED_SILHOUETTE
    assert 0.13 < readings[2.0][0] < V.MIXED_PURITY and readings[2.0][1] < V.GROUPED_SILHOUETTE
    assert V.MIXED_PURITY <= readings[3.0][0] < V.GATHERING_PURITY
    assert readings[4.0][0] >= V.GATHERING_PURITY and readings[4.0][1] > V.CLUSTERED_SILHOUETTE
    # the sentence flips four ways
    assert "mostly one class" in V.neighbour_verdict(readings[4.0][0], 0.1, "the far blobs")
    assert "in part, overlapping" in V.neighbour_verdict(readings[3.0][0], 0.1, "the middle blobs")
    assert "small same-class clumps at most" in V.neighbour_verdict(readings[2.0][0], 0.1, "the near blobs")
    assert "no more than chance" in V.neighbour_verdict(readings[0.0][0], 0.1, "the noise")
    with pytest.raises(ValueError, match="at least 2 classes"):
        V.neighbour_purity(np.zeros((10, 2)), np.zeros(10))
    with pytest.raises(ValueError, match="purity=1.5"):
        V.neighbour_verdict(1.5, 0.1)


def test_neighbour_verdict_on_the_shipped_dots_model_and_its_untrained_twin():
    """What the demo report and notebook 05 print beside their t-SNE: the trained encoder's neighbourhoods are
    about half its own class, enough for a t-SNE to gather the classes in part; the untrained encoder's are
    barely above chance."""
    from ijepa_viz.data.dots import render_dots
    from ijepa_viz.evaluate import _random_init
    from ijepa_viz.pretrained import load_pretrained
    from ijepa_viz.viz.features import embed

    model, cfg = load_pretrained("dots-cpu-demo")
    images, labels = render_dots(range(600), cfg.model.img_size, split="test")
    trained, chance = V.neighbour_purity(embed(model, images, cfg, cache=False), labels)
    untrained, _ = V.neighbour_purity(embed(_random_init(cfg, 0), images, cfg, cache=False), labels)
    # measured on the shipped weights (1,600 steps on the turned dots): 0.51 trained, 0.15 untrained, chance 0.10
    assert chance < untrained < chance + 0.1 and V.MIXED_PURITY < trained < V.GATHERING_PURITY
    assert "may gather the classes in part" in V.neighbour_verdict(trained, chance, "the trained encoder's features")
    assert "small same-class clumps at most" in V.neighbour_verdict(untrained, chance,
                                                                    "the untrained encoder's features")
