"""Checkpoints: official I-JEPA files (all three networks, strict), architecture inference, safetensors and timm
export, refusal of pickled code, the hub path (offline) and the `convert` command.

Official-format files are built here from small random weights with `tests/reference.py` (the official key
names, `module.` prefixes and extra entries); its functional forward, which shares no code with the package,
is the yardstick for the loaded model's outputs.
"""
import json
import os
import socket
import warnings

import pytest
import torch

from ijepa_viz.checkpoint import CheckpointError, atomic_save, load_training_checkpoint, safe_load
from ijepa_viz.official import (KNOWN_HEADS, export_safetensors, export_timm_encoder, from_official,
                                import_safetensors, infer_model_config, load_official, load_pretrained, timm_kwargs)
from ijepa_viz.cli import main
from ijepa_viz.model import build_model
from reference import (fake_official_checkpoint, official_encoder_shapes, official_predictor_shapes,
                       ref_encoder, ref_forward_target, ref_predictor)
from tiny import tiny_config

HEADS = 2
SMALL = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, pred_dim=16, pred_depth=2)


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """(path, dict) of a small checkpoint in the official layout, saved as torch.save does."""
    ckpt = fake_official_checkpoint(**SMALL, seed=3)
    ckpt["opt"] = {"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                   "param_groups": [{"lr": 1e-3, "params": [0]}]}
    ckpt["scaler"] = {"scale": 65536.0, "growth_factor": 2.0, "_growth_tracker": 0}
    path = tmp_path_factory.mktemp("official") / "IN1K-tiny.pth.tar"
    torch.save(ckpt, path)
    return path, ckpt


def _masks(B=2, M=3, K=2, Nc=9, N=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    ctx = torch.stack([torch.randperm(N, generator=g)[:Nc].sort().values for _ in range(B)])  # (B, Nc)
    tgt = torch.stack([torch.stack([torch.randperm(N, generator=g)[:K] for _ in range(M)]) for _ in range(B)])
    return ctx, tgt  # (B, Nc), (B, M, K)


def _close(a, b):
    return torch.allclose(a, b, atol=1e-5, rtol=1e-4), (a - b).abs().max().item()


# -- official checkpoints ----------------------------------------------------------------------------

def test_load_official_loads_all_three_networks_and_matches_the_functional_reference(official):
    path, ckpt = official
    model, cfg = load_official(path, num_heads=HEADS)
    m = cfg.model
    assert (m.img_size, m.patch_size, m.embed_dim, m.depth, m.num_heads, m.pred_embed_dim, m.pred_depth) == \
           (16, 4, 32, 2, HEADS, 16, 2)
    assert cfg.data.batch_size == ckpt["batch_size"] * ckpt["world_size"] and cfg.optim.lr == ckpt["lr"]
    for name, module in (("encoder", model.encoder), ("target_encoder", model.target_encoder),
                         ("predictor", model.predictor)):
        loaded = module.state_dict()
        assert set(loaded) == {k[len("module."):] for k in ckpt[name]}
        assert all(torch.equal(loaded[k[len("module."):]], v) for k, v in ckpt[name].items())

    images = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ctx, tgt = _masks()
    M = tgt.shape[1]
    with torch.no_grad():
        z = model.forward_context(images, ctx)  # (B, Nc, D)
        ok, err = _close(z, ref_encoder(ckpt["encoder"], "module.", images, [ctx], HEADS))
        assert ok, err
        h = model.forward_target(images, tgt)  # (B, M, K, D)
        want = ref_forward_target(ckpt["target_encoder"], "module.", images, [tgt[:, i] for i in range(M)], HEADS)
        ok, err = _close(h, want.view(M, 2, *want.shape[1:]).transpose(0, 1))  # mask-major -> image-major
        assert ok, err
        pred = model.predict(z, ctx, tgt)
        want = ref_predictor(ckpt["predictor"], "module.", z, [ctx], [tgt[:, i] for i in range(M)], HEADS)
        ok, err = _close(pred, want.view(M, 2, *want.shape[1:]).transpose(0, 1))
        assert ok, err


OFFICIAL_SIZES = {  # name: (img, patch, width, depth, encoder mlp_ratio, predictor width, predictor depth)
    "IN1K-vit.h.14-300e": (224, 14, 1280, 32, 4.0, 384, 12),
    "IN1K-vit.h.16-448px-300e": (448, 16, 1280, 32, 4.0, 384, 12),
    "IN22K-vit.h.14-900e": (224, 14, 1280, 32, 4.0, 384, 12),
    "IN22K-vit.g.16-600e": (224, 16, 1408, 40, 48 / 11, 384, 16),
    "vit-base-16": (224, 16, 768, 12, 4.0, 384, 6),
    "vit-small-16": (224, 16, 384, 12, 4.0, 192, 6),
    "vit-tiny-4-cifar": (32, 4, 192, 12, 4.0, 96, 6),
}


TIMM_ARCH = {"IN1K-vit.h.14-300e": "vit_huge_patch14_gap_224", "IN1K-vit.h.16-448px-300e": "vit_huge_patch16_gap_448",
             "IN22K-vit.g.16-600e": "vit_giant_patch16_gap_224"}


def _meta(shapes: dict) -> dict:
    return {k: torch.empty(s, device="meta") for k, s in shapes.items()}


@pytest.mark.parametrize("name", list(OFFICIAL_SIZES))
def test_architecture_inference_from_full_size_shapes(name):
    img, patch, dim, depth, ratio, pdim, pdepth = OFFICIAL_SIZES[name]
    n = (img // patch) ** 2
    enc = _meta(official_encoder_shapes(img, patch, 3, dim, depth, ratio))  # shapes only: no memory
    pred = _meta(official_predictor_shapes(n, dim, pdim, pdepth, 4.0))  # the official predictor: mlp_ratio 4
    mcfg, pred_ratio = infer_model_config(enc, pred)
    assert (mcfg.img_size, mcfg.patch_size, mcfg.embed_dim, mcfg.depth) == (img, patch, dim, depth)
    assert mcfg.num_heads == KNOWN_HEADS[dim] and mcfg.pred_num_heads is None  # predictor heads = encoder's
    assert (mcfg.pred_embed_dim, mcfg.pred_depth) == (pdim, pdepth)
    assert int(dim * mcfg.mlp_ratio) == int(dim * ratio) and int(pdim * pred_ratio) == 4 * pdim
    assert mcfg.qkv_bias and mcfg.in_chans == 3


@pytest.mark.parametrize("name", ["IN1K-vit.h.14-300e", "IN1K-vit.h.16-448px-300e", "IN22K-vit.g.16-600e"])
def test_official_widths_load_strict_at_depth_one(name):
    """The real widths, patch sizes and resolutions (ViT-g: mlp_ratio 48/11 and a predictor with 4), one block
    each to keep memory low (ViT-g: ~220 MB)."""
    img, patch, dim, _, ratio, pdim, _ = OFFICIAL_SIZES[name]
    n = (img // patch) ** 2
    enc = {k: torch.zeros(s) for k, s in official_encoder_shapes(img, patch, 3, dim, 1, ratio).items()}
    pred = {k: torch.zeros(s) for k, s in official_predictor_shapes(n, dim, pdim, 1, 4.0).items()}
    ckpt = {"encoder": {"module." + k: v for k, v in enc.items()},
            "target_encoder": {"module." + k: v for k, v in enc.items()},
            "predictor": {"module." + k: v for k, v in pred.items()}, "opt": None, "scaler": None, "epoch": 300,
            "loss": 0.1, "batch_size": 128, "world_size": 16, "lr": 1e-3}
    model, cfg = from_official(ckpt)
    assert cfg.model.num_heads == 16 and cfg.data.batch_size == 2048
    assert model.encoder.blocks[0].mlp.fc1.out_features == int(dim * ratio)
    assert model.predictor.predictor_blocks[0].mlp.fc1.out_features == 4 * pdim
    assert model.predictor.predictor_blocks[0].attn.num_heads == 16
    # timm's registered model for this release takes the exported encoder as it is
    import timm

    tm = timm.create_model(TIMM_ARCH[name], pretrained=False, depth=1, num_classes=0)
    tm.load_state_dict(export_timm_encoder(model), strict=True)
    del model, ckpt, tm


def _small(**kw):
    return fake_official_checkpoint(**{**SMALL, **kw})


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.update(predictor=_small(embed_dim=48)["predictor"]), "predictor_embed takes width 48"),
    (lambda c: c.update(target_encoder=_small(depth=3)["target_encoder"]), "target_encoder of"),
    (lambda c: c.update(predictor=_small(img_size=20)["predictor"]), "predictor_pos_embed has shape"),
    (lambda c: c.pop("predictor"), "has no predictor entry"),
    (lambda c: c["encoder"].pop("module.blocks.0.attn.qkv.weight"), "missing 1 (blocks.0.attn.qkv.weight)"),
    (lambda c: c["encoder"].update({"module.pos_embed": torch.zeros(1, 17, 32)}), "class token"),
    (lambda c: c["encoder"].update({k.replace("blocks.1.", "blocks.5."): c["encoder"].pop(k)
                                    for k in list(c["encoder"]) if "blocks.1." in k}), "numbered"),
    (lambda c: c.update(encoder=[1, 2]), "'encoder' entry is list"),
])
def test_what_does_not_fit_is_named(edit, message):
    ckpt = _small()
    edit(ckpt)
    with pytest.raises(CheckpointError, match=message.replace("(", r"\(").replace(")", r"\)")):
        from_official(ckpt, num_heads=HEADS)


def test_unknown_width_asks_for_num_heads_and_training_checkpoints_are_pointed_elsewhere(tmp_path):
    with pytest.raises(CheckpointError, match="pass num_heads="):
        from_official(_small())
    with pytest.raises(CheckpointError, match="training checkpoint"):
        from_official({"model": {}, "format_version": 1})


# -- export ----------------------------------------------------------------------------------------

def _assert_same(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert all(torch.equal(sa[k], sb[k]) and sa[k].dtype == sb[k].dtype for k in sa)


def test_safetensors_round_trip_is_exact(official, tmp_path):
    model, cfg = load_official(official[0], num_heads=HEADS)
    out = export_safetensors(model, cfg, tmp_path / "export", timm=True)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "encoder_timm.safetensors", "model.safetensors"]
    back, cfg2 = import_safetensors(out)
    _assert_same(model, back)
    assert cfg2.to_dict() == cfg.to_dict()


@pytest.mark.parametrize("extra", [["model.target=pixels"], ["train.ema=false"], ["model.mlp_ratio=3.0"]])
def test_round_trip_of_other_model_variants(tmp_path, extra):
    cfg = tiny_config(tmp_path / "r", *extra)
    model = build_model(cfg.model, ema=cfg.train.ema)
    back, cfg2 = import_safetensors(export_safetensors(model, cfg, tmp_path / "e"))
    _assert_same(model, back)
    assert cfg2.to_dict() == cfg.to_dict()


def test_predictor_mlp_ratio_other_than_the_encoders_survives_the_round_trip(tmp_path):
    ckpt = _small()
    enc_shapes = official_encoder_shapes(16, 4, 3, 32, 1, mlp_ratio=3.0)  # encoder 3, predictor 4 (as ViT-g)
    g = torch.Generator().manual_seed(0)
    enc = {"module." + k: torch.randn(s, generator=g) for k, s in enc_shapes.items()}
    ckpt.update(encoder=enc, target_encoder=dict(enc))
    model, cfg = from_official(ckpt, num_heads=HEADS)
    assert cfg.model.mlp_ratio == 3.0 and model.predictor.predictor_blocks[0].mlp.fc1.out_features == 64
    back, _ = import_safetensors(export_safetensors(model, cfg, tmp_path / "e"))
    _assert_same(model, back)


def test_a_half_overwritten_export_is_detected(official, tmp_path):
    model, cfg = load_official(official[0], num_heads=HEADS)
    a, b = export_safetensors(model, cfg, tmp_path / "a"), export_safetensors(model, cfg, tmp_path / "b")
    (b / "model.safetensors").write_bytes((a / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError, match="different exports"):
        import_safetensors(b)
    with pytest.raises(CheckpointError, match="does not exist"):
        import_safetensors(tmp_path / "nothing")


@pytest.mark.parametrize("which", ["target", "context"])
def test_timm_export_loads_strict_and_gives_the_same_pooled_features(official, tmp_path, which):
    from safetensors.torch import load_file
    from timm.models.vision_transformer import VisionTransformer

    model, cfg = load_official(official[0], num_heads=HEADS)
    sd = export_timm_encoder(model, tmp_path / "enc.safetensors", which=which)
    tm = VisionTransformer(**timm_kwargs(cfg.model)).eval()
    tm.load_state_dict(sd, strict=True)
    tm2 = VisionTransformer(**timm_kwargs(cfg.model)).eval()
    tm2.load_state_dict(load_file(tmp_path / "enc.safetensors"), strict=True)
    images = torch.randn(3, 3, 16, 16)
    encoder = model.target_encoder if which == "target" else model.encoder
    with torch.no_grad():
        ours = encoder(images).mean(dim=1)  # the paper's evaluation: average-pooled patch features
        assert torch.allclose(tm(images), ours, atol=1e-6, rtol=1e-5)
        assert torch.equal(tm(images), tm2(images))


# -- refusing pickled code --------------------------------------------------------------------------

class Payload:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class LibraryState:
    """A harmless class from some library that weights_only does not know; its __setstate__ must never run."""

    def __init__(self, marker):
        self.marker = marker

    def __setstate__(self, state):  # would run on an unsafe load
        open(state["marker"], "w").close()


@pytest.mark.parametrize("where", ["opt", "encoder"])
def test_a_pickle_with_a_code_payload_is_refused_and_never_runs(official, tmp_path, where, capsys):
    marker = tmp_path / "PWNED"
    ckpt = dict(official[1])
    if where == "encoder":
        ckpt["encoder"] = dict(ckpt["encoder"], extra=Payload(marker))
    else:
        ckpt["opt"] = Payload(marker)
    path = tmp_path / "evil.pth.tar"
    torch.save(ckpt, path)
    for load in (lambda: load_official(path, num_heads=HEADS), lambda: safe_load(path),
                 lambda: load_training_checkpoint(path)):
        with pytest.raises(CheckpointError, match="refused to load .*could run code"):
            load()
    code = main(["convert", "--official", str(path), "--out", str(tmp_path / "out"), "--num-heads", "2"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("ijepa-viz convert: error: refused") and err.count("\n") == 1
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_unknown_classes_in_the_extra_entries_are_skipped_without_running_them(official, tmp_path):
    marker = tmp_path / "RAN"
    ckpt = dict(official[1], scaler=LibraryState(str(marker)))
    path = tmp_path / "odd.pth.tar"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match="refused"):
        safe_load(path)  # our own training checkpoints stay strict
    with pytest.warns(UserWarning, match="skipped the entries scaler"):
        model, _ = load_official(path, num_heads=HEADS)
    assert not marker.exists()
    assert torch.equal(model.predictor.mask_token, ckpt["predictor"]["module.mask_token"])


# -- hub (offline) ------------------------------------------------------------------------------------

@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def test_load_pretrained_by_release_name_and_by_timm_name_offline(tmp_path, monkeypatch, no_network):
    ckpt = fake_official_checkpoint(img_size=16, patch_size=4, embed_dim=192, depth=1, pred_dim=96, pred_depth=1)
    path = tmp_path / "IN1K-vit.h.14-300e.pth.tar"
    torch.save(ckpt, path)
    import ijepa_viz.official as official
    import timm.models._builder as builder

    urls = []
    monkeypatch.setattr(official, "_download", lambda url: urls.append(url) or path)
    model, cfg = load_pretrained("IN1K-vit.h.14-300e")
    assert urls == ["https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"]
    assert cfg.model.num_heads == 3 and torch.equal(model.predictor.mask_token, ckpt["predictor"]["module.mask_token"])

    # timm's own loader (its I-JEPA checkpoint filter included) on the local file instead of the download
    monkeypatch.setattr(builder, "load_state_dict_from_url",
                        lambda url, **kw: urls.append(url) or torch.load(path, weights_only=True))
    encoder, cfg = load_pretrained("vit_huge_patch14_gap_224.in1k_ijepa", img_size=16, patch_size=4,
                                   embed_dim=192, depth=1, num_heads=3)
    assert urls[-1] == "https://dl.fbaipublicfiles.com/ijepa/IN1K-vit.h.14-300e.pth.tar"
    sd = encoder.state_dict()
    assert cfg.model.embed_dim == 192 and cfg.model.depth == 1
    assert all(torch.equal(sd[k[len("module."):]], v) for k, v in ckpt["encoder"].items())  # timm: the context encoder


# -- convert CLI --------------------------------------------------------------------------------------

def test_convert_official_and_training_checkpoints(official, tmp_path, capsys):
    out = tmp_path / "conv"
    code = main(["convert", "--official", str(official[0]), "--out", str(out), "--timm", "--num-heads", "2"])
    stdout = capsys.readouterr().out
    assert code == 0 and "wrote" in stdout and "32 wide, depth 2" in stdout
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "encoder_timm.safetensors", "model.safetensors"]
    info = json.loads((out / "config.json").read_text())
    assert info["timm"]["kwargs"]["embed_dim"] == 32 and info["config"]["model"]["depth"] == 2
    model, _ = load_official(official[0], num_heads=HEADS)
    _assert_same(model, import_safetensors(out)[0])

    from ijepa_viz.train import Trainer

    result = Trainer(tiny_config(tmp_path / "run", "train.steps=1"), progress=False).fit()
    code = main(["convert", "--checkpoint", str(result.checkpoint), "--out", str(tmp_path / "conv2")])
    assert code == 0
    _assert_same(result.model, import_safetensors(tmp_path / "conv2")[0])


def test_atomic_save_cleans_up_after_killed_writers(tmp_path):
    dead = tmp_path / ".checkpoint.pt.tmp999999999"  # a temporary file of a process that no longer exists
    dead.write_bytes(b"half a checkpoint")
    atomic_save({"x": torch.ones(2)}, tmp_path / "checkpoint.pt")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    assert torch.equal(safe_load(tmp_path / "checkpoint.pt")["x"], torch.ones(2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        atomic_save({"x": torch.zeros(2)}, tmp_path / "checkpoint.pt")
    assert torch.equal(safe_load(tmp_path / "checkpoint.pt")["x"], torch.zeros(2))
