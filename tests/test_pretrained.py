"""Shipped weights: saved and loaded by name offline, with their card; the eval CLI takes the name; and a
sentence computed from a probe flips between the shipped (trained) model and the untrained one."""
import json

import pytest
import torch

import ijepa_viz as ij
from ijepa_viz.checkpoint import CheckpointError
from ijepa_viz.config import get_preset, override
from ijepa_viz.model import IJEPA
from ijepa_viz.pretrained import load_shipped, round_trip, save_shipped, shipped
from ijepa_viz.viz.verdicts import probe_verdict

DOTS = "dots-cpu-demo"


def _tiny_cfg():
    return override(get_preset("cpu-demo"), ["model.embed_dim=32", "model.depth=1", "model.num_heads=2",
                                             "model.pred_embed_dim=16", "model.pred_depth=1"])


def test_save_and_load_round_trip_in_float16(tmp_path, monkeypatch):
    import ijepa_viz.pretrained as P

    cfg = _tiny_cfg()
    torch.manual_seed(0)
    model = IJEPA(cfg.model)
    save_shipped(model, cfg, "tiny-test", {"description": "a test model", "command": "none"}, folder=tmp_path)
    assert (tmp_path / "tiny-test.safetensors").stat().st_mode & 0o044 == 0o044  # readable by all
    monkeypatch.setattr(P, "WEIGHTS_DIR", tmp_path)
    assert shipped() == {"tiny-test": "a test model"}
    loaded, loaded_cfg = load_shipped("tiny-test")
    assert loaded_cfg.to_dict() == cfg.to_dict() and loaded.card["command"] == "none"
    expected = round_trip(model).state_dict()  # what ships is the float16-rounded model
    for k, v in loaded.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, expected[k]), k


def test_unknown_name_names_the_shipped_ones():
    with pytest.raises(CheckpointError, match="no shipped model is called 'nope'"):
        load_shipped("nope")


def test_only_ema_models_ship(tmp_path):
    cfg = override(_tiny_cfg(), ["train.ema=false"])
    with pytest.raises(CheckpointError, match="EMA"):
        save_shipped(IJEPA(cfg.model, ema=False), cfg, "x", {}, folder=tmp_path)


@pytest.mark.skipif(DOTS not in shipped(), reason="the dots weights are not installed")
def test_shipped_dots_model_loads_offline_with_its_card():
    model, cfg = ij.load_pretrained(DOTS)
    card = model.card
    for key in ("command", "commit", "steps", "epochs", "train_seconds", "eval"):
        assert key in card, key
    assert [r["name"] for r in card["eval"]["rows"]] == ["ijepa (target encoder)", "random init", "raw pixels"]
    assert card["command"].startswith("ijepa-viz train") and cfg.data.name == "dots"
    assert model.predictor is not None and model.target_encoder is not None


@pytest.mark.slow
@pytest.mark.skipif(DOTS not in shipped(), reason="the dots weights are not installed")
def test_probe_verdict_follows_real_features_of_shipped_and_untrained_models(capsys):
    """On real features, each clause of the sentence says 'beats' exactly when the measured margin is beyond
    the noise, for the shipped model and for the untrained one put in its place (where there is nothing to
    beat: the sentence must say so)."""
    from ijepa_viz.cli import main
    from ijepa_viz.evaluate import _random_init, evaluate
    from ijepa_viz.viz.verdicts import probe_margins

    model, cfg = ij.load_pretrained(DOTS)
    texts = []
    for candidate in (model, _random_init(cfg, cfg.train.seed)):
        result = evaluate(model=candidate, cfg=cfg, probes=("linear",), limit_train=1000, limit_test=500,
                          progress=False)
        text, m = probe_verdict(result), probe_margins(result)
        beats_untrained = m["vs_untrained"] > m["noise_untrained"]
        assert ("beats the untrained encoder by" in text) == beats_untrained, text
        assert ("has not learned yet" in text) == (not beats_untrained), text
        assert ("beats raw pixels by" in text) == (m["vs_pixels"] > m["noise_pixels"]), text
        texts.append(text)
    # The shipped model has learned (its card: 82.8% against 45.9% untrained on 2,000 test images), and the
    # sentence says so; put the untrained model in its place and the same code says it has not.
    assert "beats the untrained encoder by" in texts[0], texts[0]
    assert "does NOT beat the untrained encoder" in texts[1], texts[1]
    # the eval command takes the shipped name too
    assert main(["eval", "--checkpoint", DOTS, "--probe", "knn", "--limit-train", "200", "--limit-test", "100",
                 "--quiet"]) == 0
    assert "ijepa (target encoder)" in capsys.readouterr().out


@pytest.mark.skipif(DOTS not in shipped(), reason="the dots weights are not installed")
def test_patch_code_verdict_follows_real_patch_features_of_shipped_and_untrained_models():
    """Notebook 05's sentence on what sets the patch features, on real ones: the untrained model's patches are
    mostly their position, the shipped dots model's are not (training moved them to content and to the image as
    a whole), and the sentence says which."""
    from ijepa_viz.data.dots import render_dots
    from ijepa_viz.evaluate import _random_init
    from ijepa_viz.viz import features as fx
    from ijepa_viz.viz.verdicts import patch_code_verdict

    model, cfg = ij.load_pretrained(DOTS)
    images, _ = render_dots(range(48), cfg.model.img_size, 0, "test")
    texts = {}
    for name, candidate in (("trained", model), ("untrained", _random_init(cfg, cfg.train.seed))):
        p = fx.embed(candidate, images, cfg, pool="none")  # (48, P, D)
        texts[name] = patch_code_verdict(fx.position_share(p), fx.image_share(p), name)
    assert "neither the position nor the image as a whole dominates" in texts["trained"], texts["trained"]
    assert "map of coordinates" in texts["untrained"], texts["untrained"]
