"""Config: presets, YAML round-trips, dotted overrides with type coercion, and errors that name the field."""
from __future__ import annotations

import dataclasses

import pytest
import yaml

from ijepa_viz.config import (PRESETS, Config, ConfigError, DataConfig, MaskConfig, ModelConfig, OptimConfig,
                              TrainConfig, get_preset, load_yaml, override, save_yaml, valid_keys)


# -- presets -----------------------------------------------------------------------------------

def test_required_presets_exist_and_validate():
    for name in ("cpu-tiny", "cifar-gpu", "imagenet-subset-gpu", "vit-h14-paper"):
        assert name in PRESETS
        cfg = get_preset(name)
        assert isinstance(cfg, Config)
        assert cfg.validate() is cfg
        assert cfg.model.img_size % cfg.model.patch_size == 0


def test_get_preset_returns_fresh_copies_and_rejects_unknown():
    a = get_preset("cpu-tiny")
    a.optim.lr = 123.0
    assert get_preset("cpu-tiny").optim.lr != 123.0
    with pytest.raises(ConfigError, match="cpu-tiny"):
        get_preset("no-such-preset")


def test_cpu_tiny_paper_is_cpu_tiny_with_the_papers_values():
    """The tuned cpu-tiny differs from the paper's recipe in exactly three documented values."""
    tuned, paper = get_preset("cpu-tiny").to_dict(), get_preset("cpu-tiny-paper").to_dict()
    assert paper == Config().to_dict()
    diff = {(s, k): (paper[s][k], tuned[s][k]) for s in paper for k in paper[s] if paper[s][k] != tuned[s][k]}
    assert diff == {("optim", "lr"): (1e-3, 5e-4), ("mask", "target_scale"): ([0.15, 0.2], [0.1, 0.15]),
                    ("data", "crop_scale"): ([0.3, 1.0], [0.5, 1.0])}


def test_cpu_tiny_is_32px():
    cfg = get_preset("cpu-tiny")
    assert cfg.model.img_size == 32 and cfg.train.device in ("auto", "cpu")


def test_vit_h14_paper_matches_the_official_recipe():
    cfg = get_preset("vit-h14-paper")
    m, o, d, t, k = cfg.model, cfg.optim, cfg.data, cfg.train, cfg.mask
    assert (m.embed_dim, m.depth, m.num_heads, m.patch_size, m.img_size) == (1280, 32, 16, 14, 224)
    assert (m.pred_embed_dim, m.pred_depth) == (384, 12)
    assert d.batch_size == 2048
    assert (o.lr, o.start_lr, o.final_lr) == (1e-3, 2e-4, 1e-6)
    assert t.epochs == 300 and o.warmup_epochs == 40
    assert (o.weight_decay, o.final_weight_decay, o.ema_start, o.ema_end) == (0.04, 0.4, 0.996, 1.0)
    assert k.strategy == "multiblock" and k.num_targets == 4 and k.min_keep == 10
    assert k.target_scale == (0.15, 0.2) and k.target_aspect == (0.75, 1.5)
    assert k.context_scale == (0.85, 1.0) and k.context_aspect == (1.0, 1.0)
    assert m.loss == "smooth_l1" and m.target == "representation" and m.qkv_bias and m.norm_eps == 1e-6
    assert cfg.grid_size == 16


# -- YAML -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", sorted(PRESETS))
def test_yaml_round_trip_every_preset(name, tmp_path):
    cfg = get_preset(name)
    path = tmp_path / "config.yaml"
    save_yaml(cfg, path)
    assert not (tmp_path / "config.yaml.tmp").exists()
    back = load_yaml(path)
    assert back.to_dict() == cfg.to_dict()
    assert back == cfg  # tuples come back as tuples, not lists
    assert yaml.safe_load(path.read_text()) == cfg.to_dict()


def test_yaml_partial_file_keeps_defaults_and_coerces(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 1e-3\nmask:\n  target_scale: [0.1, 0.3]\ntrain:\n")
    cfg = load_yaml(path)
    assert cfg.optim.lr == 1e-3 and isinstance(cfg.optim.lr, float)  # YAML reads '1e-3' as a string
    assert cfg.mask.target_scale == (0.1, 0.3)
    assert cfg.model == ModelConfig() and cfg.train == TrainConfig()


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("modle:\n  depth: 2\n")
    with pytest.raises(ConfigError, match="unknown config section 'modle'") as e:
        load_yaml(unknown)
    assert "model" in str(e.value) and "optim" in str(e.value)
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text("model:\n  depth: two\n")
    with pytest.raises(ConfigError, match="model.depth"):
        load_yaml(wrong)
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_dict([1, 2])
    with pytest.raises(ConfigError, match="mapping"):
        Config.from_dict({"model": 3})


# -- overrides --------------------------------------------------------------------------------------

def test_override_coerces_types():
    cfg = override(Config(), [
        "optim.lr=5e-4", "model.depth=2", "train.ema=false", "data.hflip=True", "mask.target_scale=0.1,0.25",
        "mask.context_aspect=(1, 1)", "optim.clip_grad=1.5", "train.steps=100", "data.name=cifar10",
        "model.drop_path_rate=0", "optim.warmup_epochs=2",
    ])
    assert cfg.optim.lr == 5e-4 and isinstance(cfg.optim.lr, float)
    assert cfg.model.depth == 2 and isinstance(cfg.model.depth, int)
    assert cfg.train.ema is False and cfg.data.hflip is True
    assert cfg.mask.target_scale == (0.1, 0.25) and isinstance(cfg.mask.target_scale, tuple)
    assert cfg.mask.context_aspect == (1.0, 1.0) and all(isinstance(v, float) for v in cfg.mask.context_aspect)
    assert cfg.optim.clip_grad == 1.5 and cfg.train.steps == 100
    assert cfg.data.name == "cifar10"
    assert cfg.model.drop_path_rate == 0.0 and isinstance(cfg.model.drop_path_rate, float)
    assert cfg.optim.warmup_epochs == 2.0 and isinstance(cfg.optim.warmup_epochs, float)


def test_override_optional_none_and_dict_form():
    cfg = override(Config(), ["optim.clip_grad=1.0", "train.steps=5"])
    cfg = override(cfg, ["optim.clip_grad=none", "train.steps=None", "model.pred_num_heads=null"])
    assert cfg.optim.clip_grad is None and cfg.train.steps is None and cfg.model.pred_num_heads is None
    cfg = override(Config(), {"mask.num_targets": 1, "train.ema": True, "mask.target_scale": [0.2, 0.3]})
    assert cfg.mask.num_targets == 1 and cfg.mask.target_scale == (0.2, 0.3)


def test_override_returns_a_copy():
    base = Config()
    new = override(base, ["optim.lr=0.5"])
    assert base.optim.lr == OptimConfig().lr and new.optim.lr == 0.5


def test_int_field_accepts_integral_float_only():
    assert override(Config(), ["model.depth=4.0"]).model.depth == 4
    with pytest.raises(ConfigError, match="model.depth expects an int"):
        override(Config(), ["model.depth=4.5"])


def test_unknown_key_lists_valid_keys():
    with pytest.raises(ConfigError) as e:
        override(Config(), ["optim.learning_rate=1e-3"])
    msg = str(e.value)
    assert "optim.learning_rate" in msg and "optim.lr" in msg and "optim.start_lr" in msg


def test_unknown_section_lists_sections_and_keys():
    with pytest.raises(ConfigError) as e:
        override(Config(), ["optimizer.lr=1e-3"])
    msg = str(e.value)
    assert "optimizer.lr" in msg
    for section in ("model", "mask", "data", "optim", "train"):
        assert section in msg
    assert "optim.lr" in msg  # the valid keys are listed
    with pytest.raises(ConfigError):
        override(Config(), ["lr=1e-3"])  # no section


def test_assignment_without_equals():
    with pytest.raises(ConfigError, match="section.field=value"):
        override(Config(), ["optim.lr"])


@pytest.mark.parametrize("assignment,field,expected", [
    ("model.depth=abc", "model.depth", "int"),
    ("optim.lr=fast", "optim.lr", "float"),
    ("train.ema=maybe", "train.ema", "bool"),
    ("mask.target_scale=0.1", "mask.target_scale", "2 numbers"),
    ("mask.target_scale=0.1,0.2,0.3", "mask.target_scale", "2 numbers"),
    ("train.steps=many", "train.steps", "int"),
])
def test_wrong_type_names_field_and_type(assignment, field, expected):
    with pytest.raises(ConfigError) as e:
        override(Config(), [assignment])
    assert field in str(e.value) and expected in str(e.value)


def test_wrong_type_from_yaml_values():
    with pytest.raises(ConfigError, match="data.name expects a string"):
        Config.from_dict({"data": {"name": 3}})
    with pytest.raises(ConfigError, match="train.ema expects a bool"):
        Config.from_dict({"train": {"ema": 2}})
    with pytest.raises(ConfigError, match="optim.lr expects a float"):
        Config.from_dict({"optim": {"lr": True}})


@pytest.mark.parametrize("assignment,field", [
    ("mask.target_scale=-0.1,0.2", "mask.target_scale"),
    ("mask.context_scale=0.9,1.2", "mask.context_scale"),
    ("mask.target_scale=0.3,0.2", "mask.target_scale"),
    ("mask.target_aspect=2.0,1.0", "mask.target_aspect"),
    ("mask.context_aspect=0,1", "mask.context_aspect"),
    ("data.crop_scale=0.0,1.0", "data.crop_scale"),
    ("model.img_size=30", "model.img_size"),
    ("model.patch_size=5", "model.patch_size"),
    ("mask.strategy=checkerboard", "mask.strategy"),
    ("mask.num_targets=0", "mask.num_targets"),
    ("mask.min_keep=-1", "mask.min_keep"),
    ("mask.max_tries=0", "mask.max_tries"),
    ("mask.block_scale=1.0", "mask.block_scale"),
    ("model.num_heads=5", "model.num_heads"),
    ("model.embed_dim=-4", "model.embed_dim"),
    ("model.target=rgb", "model.target"),
    ("model.loss=l1", "model.loss"),
    ("optim.lr=-1", "optim.lr"),
    ("optim.ema_start=1.5", "optim.ema_start"),
    ("optim.clip_grad=0", "optim.clip_grad"),
    ("data.name=mnist", "data.name"),
    ("data.batch_size=0", "data.batch_size"),
    ("train.precision=fp16", "train.precision"),
    ("train.device=tpu", "train.device"),
    ("train.epochs=0", "train.epochs"),
])
def test_bad_values_name_the_field(assignment, field):
    with pytest.raises(ConfigError) as e:
        override(Config(), [assignment])
    assert field in str(e.value)


def test_img_size_error_suggests_divisors():
    with pytest.raises(ConfigError) as e:
        override(Config(), ["model.img_size=28", "model.patch_size=8"])
    assert "model.img_size=28" in str(e.value) and "model.patch_size=8" in str(e.value) and "14" in str(e.value)


def test_valid_keys_cover_every_field():
    keys = valid_keys()
    for section, cls in (("model", ModelConfig), ("mask", MaskConfig), ("data", DataConfig),
                         ("optim", OptimConfig), ("train", TrainConfig)):
        for f in dataclasses.fields(cls):
            assert f"{section}.{f.name}" in keys
    assert len(keys) == len(set(keys))


def test_every_field_round_trips_through_override():
    """Any field can be set from the CLI with its own printed value."""
    cfg = get_preset("cifar-gpu")
    assignments = []
    for section, values in cfg.to_dict().items():
        for key, value in values.items():
            text = "none" if value is None else ",".join(map(str, value)) if isinstance(value, list) else str(value)
            assignments.append(f"{section}.{key}={text}")
    assert override(Config(), assignments).to_dict() == cfg.to_dict()
