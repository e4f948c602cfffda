"""Tiny configurations shared by the tests: a model and a dataset that train in a fraction of a second a step."""
from ijepa_viz.config import Config, get_preset, override

TINY = [
    "model.img_size=16", "model.patch_size=2", "model.embed_dim=32", "model.depth=2", "model.num_heads=2",
    "model.pred_embed_dim=16", "model.pred_depth=1",
    "mask.min_keep=1", "mask.target_scale=0.15,0.25", "mask.num_targets=2",
    "data.name=shapes", "data.batch_size=8", "data.shapes_train_size=32", "data.shapes_test_size=16",
    "optim.warmup_epochs=1", "train.log_every=1", "train.checkpoint_every=1000", "train.precision=fp32",
]


def tiny_config(out_dir, *extra: str) -> Config:
    """cpu-tiny shrunk to a 16 px, 2-block ViT on 32 shapes images (4 steps an epoch)."""
    return override(get_preset("cpu-tiny"), TINY + [f"train.out_dir={out_dir}", *extra])
