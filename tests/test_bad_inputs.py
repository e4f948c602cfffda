"""Every bad input gets a clear error: it names the problem and the fix, comes within a second, is one line
from the CLI (exit status 2, starting `ijepa-viz`), is never a bare traceback from inside torch, and leaves no
partial file behind.

Each case runs through the `ijepa-viz` command (`ijepa_viz.cli.main`) or the Python API. Files the cases need
(image folders, a finished run, broken checkpoints) are made once per module in `world`.
"""
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ijepa_viz.checkpoint import CheckpointError, load_training_checkpoint
from ijepa_viz.cli import main
from ijepa_viz.config import ConfigError, get_preset, override
from ijepa_viz.data import DataError, build_loader
from ijepa_viz.masks import MaskCollator
from ijepa_viz.official import load_official
from ijepa_viz.train import Trainer
from reference import fake_official_checkpoint
from tiny import TINY, tiny_config

MODEL = [s for s in TINY if not s.startswith("data.name")]  # the tiny model, any dataset
LIMIT_S = 1.0


def _png(path: Path, mode: str = "RGB", size: int = 16) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size, size, {"L": 1, "RGB": 3, "RGBA": 4}[mode]))
    Image.fromarray(arr.squeeze().astype(np.uint8), mode=mode).save(path)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Shared inputs: image trees (good and broken), a finished tiny run and broken checkpoints."""
    w = tmp_path_factory.mktemp("world")
    for name in ("good", "empty_class", "corrupt", "truncated", "fake_image", "no_train", "flat"):
        for c in ("a", "b"):
            for i in range(2):
                _png(w / name / "train" / c / f"{i}.png")
    (w / "good" / "train" / "a" / "notes.txt").write_text("not an image: ignored")
    _png(w / "good" / "train" / "b" / "gray.png", "L")
    _png(w / "good" / "train" / "b" / "alpha.png", "RGBA")
    (w / "empty_class" / "train" / "c").mkdir()
    (w / "corrupt" / "train" / "a" / "bad.png").write_bytes(os.urandom(300))
    data = (w / "truncated" / "train" / "a" / "0.png").read_bytes()
    (w / "truncated" / "train" / "a" / "0.png").write_bytes(data[: len(data) // 2])
    (w / "fake_image" / "train" / "b" / "photo.jpg").write_text("this is text, not a JPEG")
    shutil.move(str(w / "no_train" / "train"), str(w / "no_train" / "images"))
    for c in ("a", "b"):
        shutil.rmtree(w / "flat" / "train" / c)
    _png(w / "flat" / "train" / "loose.png")

    Trainer(tiny_config(w / "run", "train.steps=1"), progress=False).fit()
    ckpt = w / "run" / "checkpoint.pt"
    full = ckpt.read_bytes()
    (w / "truncated.pt").write_bytes(full[: len(full) // 3])
    (w / "empty.pt").write_bytes(b"")
    (w / "notes.pt").write_text("step: 100\nloss: 0.1\n")
    torch.save(torch.randn(3, 3), w / "tensor.pt")
    future = torch.load(ckpt, weights_only=True)
    future["format_version"] = 99
    torch.save(future, w / "future.pt")
    torch.save({"model": {}, "format_version": 1, "x": Payload(w / "PWNED")}, w / "payload.pt")
    torch.save(fake_official_checkpoint(embed_dim=32), w / "official32.pth.tar")
    torch.save(fake_official_checkpoint(embed_dim=192, pred_dim=96), w / "official192.pth.tar")
    (w / "bad.yaml").write_text("model: [unclosed\n")
    (w / "typo.yaml").write_text("model:\n  widht: 3\n")
    return w


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module", autouse=True)
def warm(world):
    """Pay one-off import and first-call costs before the timed cases."""
    import torchvision.datasets  # noqa: F401

    from ijepa_viz import evaluate  # noqa: F401
    main(["presets"])
    Trainer(tiny_config(world / "warm", "train.steps=1"), progress=False)


# -- the cases ---------------------------------------------------------------------------------------
# (id, argv for the CLI or a callable taking (world, out), the error type for API cases, [problem, fix] texts)

def _train(*argv, model=True):
    sets = [a for s in (MODEL if model else []) for a in ("--set", s)]
    return ["train", "--quiet", "--steps", "2", "--out", "{out}", *sets, *argv]


def _folder(name, *extra):
    return _train("--set", "data.name=imagefolder", "--set", f"data.root={{w}}/{name}", *extra)


CLI_CASES = [
    # configuration values
    ("negative-scale", _train("--set", "mask.target_scale=-0.1,0.2"), ["mask.target_scale", "must lie in (0.0, 1.0]"]),
    ("scale-above-one", _train("--set", "mask.context_scale=0.9,1.5"), ["mask.context_scale", "set both ends inside"]),
    ("min-above-max", _train("--set", "mask.target_scale=0.3,0.1"), ["min > max", "write it as [min, max]"]),
    ("crop-scale-above-one", _train("--set", "data.crop_scale=0.3,2"), ["data.crop_scale", "must lie in"]),
    ("img-not-divisible", _train("--set", "model.patch_size=5"), ["not divisible by model.patch_size",
                                                                  "choose a patch size"]),
    ("mask-impossible-on-grid", _train("--set", "model.img_size=32", "--set", "model.patch_size=4", "--set",
                                       "mask.min_keep=10", "--set", "mask.target_scale=0.15,0.2"),
     ["min_keep", "Lower mask.min_keep"]),
    ("unknown-key", _train("--set", "optim.lrr=1"), ["unknown config key 'optim.lrr'", "Valid keys"]),
    ("unknown-key-in-yaml", ["train", "--config", "{w}/typo.yaml"], ["unknown config key 'model.widht'", "Valid keys"]),
    ("invalid-yaml", ["train", "--config", "{w}/bad.yaml"], ["not valid YAML", "bad.yaml"]),
    ("wrong-type-float", _train("--set", "optim.lr=fast"), ["optim.lr expects a float", "'fast'"]),
    ("wrong-type-int", _train("--set", "model.depth=2.5"), ["model.depth expects an int", "2.5"]),
    ("bad-strategy", _train("--set", "mask.strategy=spiral"), ["mask.strategy='spiral'", "multiblock"]),
    ("bad-precision", _train("--set", "train.precision=fp8"), ["train.precision='fp8'", "auto, bf16 or fp32"]),
    ("bad-device", _train("--set", "train.device=tpu"), ["train.device='tpu'", "auto, cpu, cuda"]),
    ("unknown-dataset", _train("--data", "mnist", model=False),
     ["data.name='mnist' is not a dataset", "choose one of"]),
    ("batch-larger-than-data", _train("--set", "data.name=shapes", "--set", "data.batch_size=64"),
     ["fewer than one batch", "lower --set data.batch_size"]),
    # data
    ("missing-root", _folder("nowhere"), ["does not exist", "--set data.root=PATH"]),
    ("empty-class-folder", _folder("empty_class"), ["has no images", "add images or remove the folder"]),
    ("corrupt-image", _folder("corrupt", "--set", "data.on_bad_image=error"), ["bad.png", "on_bad_image=skip"]),
    ("truncated-image", _folder("truncated", "--set", "data.on_bad_image=error"), ["0.png", "on_bad_image=skip"]),
    ("text-named-jpg", _folder("fake_image"), ["photo.jpg", "Replace or delete the file"]),
    ("no-train-dir", _folder("no_train"), ["has no train/ folder", "expected layout"]),
    ("images-directly-in-train", _folder("flat"), ["holds images directly", "move each image into a folder"]),
    ("offline-cifar10", _train("--set", "data.name=cifar10", "--set", "data.root={out}/cifar", "--set",
                               "data.download=false"), ["data.download=false", "--data shapes"]),
    # checkpoints
    ("truncated-checkpoint-resume", _train("--resume", "--set", "train.out_dir={out}"),
     ["is not a readable PyTorch checkpoint", "earlier checkpoint"]),
    ("wrong-architecture-resume", _train("--resume", "--set", "model.depth=3"),
     ["another model configuration", "start a new out_dir"]),
    ("truncated-checkpoint-eval", ["eval", "--checkpoint", "{w}/truncated.pt"], ["truncated or corrupt", "earlier"]),
    ("empty-checkpoint", ["eval", "--checkpoint", "{w}/empty.pt"], ["empty (0 bytes)", "earlier checkpoint"]),
    ("text-file-checkpoint", ["eval", "--checkpoint", "{w}/notes.pt"], ["a text file", "written by `ijepa-viz train`"]),
    ("tensor-file-checkpoint", ["eval", "--checkpoint", "{w}/tensor.pt"], ["not an ijepa_viz training checkpoint",
                                                                           "ijepa-viz convert"]),
    ("folder-as-checkpoint", ["eval", "--checkpoint", "{w}/run"], ["is a folder", "pass the .pt file"]),
    ("future-format-version", ["eval", "--checkpoint", "{w}/future.pt"], ["format version 99", "upgrade ijepa_viz"]),
    ("code-payload-checkpoint", ["eval", "--checkpoint", "{w}/payload.pt"], ["refused to load", "Only load files"]),
    ("official-file-to-eval", ["eval", "--checkpoint", "{w}/official32.pth.tar"], ["not an ijepa_viz training",
                                                                                    "ijepa-viz convert"]),
    ("training-checkpoint-as-official", ["convert", "--official", "{w}/run/checkpoint.pt", "--out", "{out}"],
     ["training checkpoint", "--checkpoint"]),
    ("text-file-as-official", ["convert", "--official", "{w}/notes.pt", "--out", "{out}"],
     ["a text file", "official I-JEPA .pth.tar"]),
    ("unknown-width-official", ["convert", "--official", "{w}/official32.pth.tar", "--out", "{out}"],
     ["32 wide", "--num-heads"]),
    # CLI misuse that our code catches
    ("set-without-value", _train("--set", "optim.lr"), ["must look like section.field=value", "optim.lr=5e-4"]),
    ("existing-run-without-resume", _train("--set", "train.out_dir={out}"), ["already holds a checkpoint",
                                                                               "pass --resume"]),
    ("bad-probe", ["eval", "--checkpoint", "{w}/run/checkpoint.pt", "--probe", "svm"], ["--probe 'svm'",
                                                                                       "choose from linear, knn"]),
]
if not torch.cuda.is_available():
    CLI_CASES.append(("cuda-unavailable", _train("--set", "train.device=cuda"),
                      ["CUDA is not available", "--set train.device=cpu"]))

ARGPARSE_CASES = [  # argparse's own errors: usage, then one `ijepa-viz ...: error:` line, exit 2
    ("unknown-subcommand", ["frobnicate"], "invalid choice: 'frobnicate'"),
    ("steps-zero", ["train", "--steps", "0"], "expected a positive integer, got 0"),
    ("eval-without-checkpoint", ["eval"], "the following arguments are required: --checkpoint"),
    ("epochs-and-steps", ["train", "--epochs", "2", "--steps", "3"], "not allowed with argument"),
    ("convert-without-source", ["convert", "--out", "x"], "one of the arguments --official --checkpoint is required"),
    ("unknown-preset", ["train", "--preset", "huge"], "invalid choice: 'huge'"),
]


def _prepare_out(case_id: str, world: Path, out: Path) -> None:
    """Cases that work on an existing run get a copy of it (or of a broken version) as their --out."""
    if case_id in ("wrong-architecture-resume", "existing-run-without-resume"):
        shutil.copytree(world / "run", out)
    elif case_id == "truncated-checkpoint-resume":
        shutil.copytree(world / "run", out)
        shutil.copy(world / "truncated.pt", out / "checkpoint.pt")


def _snapshot(folder: Path) -> dict:
    if not folder.exists():
        return {}
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _assert_nothing_written(out: Path, before: dict) -> None:
    after = _snapshot(out)
    new = sorted(set(after) - set(before))
    changed = sorted(k for k in before if k in after and after[k] != before[k])
    assert not new and not changed, f"a failed command wrote files: new {new}, changed {changed}"


@pytest.mark.parametrize("case_id, argv, texts", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_bad_input_gets_one_clear_line(case_id, argv, texts, world, tmp_path, capsys):
    out = tmp_path / "out"
    _prepare_out(case_id, world, out)
    before = _snapshot(out)
    argv = [a.replace("{w}", str(world)).replace("{out}", str(out)) for a in argv]
    capsys.readouterr()
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"ijepa-viz {argv[0]}: error: "), err
    assert "Traceback" not in err
    for text in texts:
        assert text in err, f"{text!r} missing from: {err}"
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"
    _assert_nothing_written(out, before)
    assert not (world / "PWNED").exists()


@pytest.mark.parametrize("case_id, argv, text", ARGPARSE_CASES, ids=[c[0] for c in ARGPARSE_CASES])
def test_cli_misuse_exits_2_with_usage_and_one_error_line(case_id, argv, text, capsys):
    start = time.perf_counter()
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert time.perf_counter() - start < LIMIT_S
    err = capsys.readouterr().err
    assert e.value.code == 2
    errors = [ln for ln in err.splitlines() if ln.startswith("ijepa-viz")]
    assert len(errors) == 1 and ": error: " in errors[0] and text in errors[0], err
    assert err.startswith("usage: ijepa-viz") and "Traceback" not in err


# -- the same checks through the Python API -------------------------------------------------------------

def _cfg(*sets):
    return override(get_preset("cpu-tiny"), list(sets))


API_CASES = [
    ("api-negative-scale", lambda w, o: _cfg("mask.target_scale=-0.2,0.2"), ConfigError, ["must lie in"]),
    ("api-unknown-key", lambda w, o: _cfg("model.widht=3"), ConfigError, ["unknown config key", "Valid keys"]),
    ("api-wrong-type", lambda w, o: _cfg("train.epochs=many"), ConfigError, ["expects an int"]),
    ("api-mask-impossible", lambda w, o: MaskCollator(_cfg("mask.min_keep=10").mask, 8), ConfigError,
     ["min_keep", "Lower mask.min_keep"]),
    ("api-missing-root", lambda w, o: build_loader(_cfg("data.name=imagefolder", f"data.root={w}/nowhere").data,
                                                   "train", 16, True, 0), DataError, ["does not exist"]),
    ("api-offline-cifar", lambda w, o: build_loader(_cfg("data.name=cifar10", f"data.root={o}", "data.download=false")
                                                    .data, "train", 32, True, 0), DataError, ["--data shapes"]),
    ("api-truncated-checkpoint", lambda w, o: load_training_checkpoint(w / "truncated.pt"), CheckpointError,
     ["truncated or corrupt"]),
    ("api-payload", lambda w, o: load_training_checkpoint(w / "payload.pt"), CheckpointError, ["refused"]),
    ("api-wrong-architecture", lambda w, o: Trainer(tiny_config(w / "run", "model.embed_dim=48"), resume=True,
                                                    progress=False), CheckpointError, ["another model configuration"]),
    ("api-official-wrong-heads", lambda w, o: load_official(w / "official192.pth.tar", num_heads=5), CheckpointError,
     ["not divisible by 5 heads"]),
]


@pytest.mark.parametrize("case_id, call, error, texts", API_CASES, ids=[c[0] for c in API_CASES])
def test_api_bad_input_raises_a_clear_error(case_id, call, error, texts, world, tmp_path):
    out = tmp_path / "out"
    before_run = _snapshot(world / "run")
    start = time.perf_counter()
    with pytest.raises(error) as e:
        call(world, out)
    elapsed = time.perf_counter() - start
    msg = str(e.value)
    assert all(t in msg for t in texts), msg
    assert "\n" not in msg and len(msg) < 1000
    assert elapsed < LIMIT_S, f"{elapsed:.2f} s"
    _assert_nothing_written(world / "run", before_run)
    _assert_nothing_written(out, {})


# -- inputs that look odd but are fine ---------------------------------------------------------------------

def test_grayscale_rgba_and_non_image_files_load(world):
    """Grayscale and RGBA images are converted to RGB; a notes.txt among the images is ignored."""
    cfg = _cfg("data.name=imagefolder", f"data.root={world}/good", "data.batch_size=2").data
    loader = build_loader(cfg, "train", 16, train=True, seed=0)
    images, labels = next(iter(loader))
    assert images.shape == (2, 3, 16, 16) and torch.isfinite(images).all()
    from ijepa_viz.data import ImageFolderDataset

    ds = ImageFolderDataset(str(world / "good"), "train")
    names = sorted(Path(p).name for p, _ in ds.samples)
    assert "gray.png" in names and "alpha.png" in names and "notes.txt" not in names
    assert all(ds[i][0].mode == "RGB" for i in range(len(ds)))


def test_the_bad_input_list_is_long_enough():
    assert len(CLI_CASES) + len(ARGPARSE_CASES) + len(API_CASES) >= 25
    assert len({c[0] for c in CLI_CASES + ARGPARSE_CASES + API_CASES}) == \
           len(CLI_CASES) + len(ARGPARSE_CASES) + len(API_CASES)
    json.dumps([c[0] for c in CLI_CASES])  # ids are plain strings
