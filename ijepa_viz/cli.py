"""The `ijepa-viz` command: train, eval, bench, convert, presets and demo.

    ijepa-viz train --preset cpu-tiny --data shapes --steps 200 --out runs/try
    ijepa-viz train --preset cpu-tiny --data imagefolder --data-root path/to/cifar10 --epochs 10
    ijepa-viz eval --checkpoint runs/try/checkpoint.pt --probe linear,knn
    ijepa-viz presets
    ijepa-viz demo

Every configuration field can be changed with `--set section.field=value` (see `ijepa-viz presets --keys`).
Errors in the input (a bad key, a missing dataset, a broken checkpoint) print one line that names the problem
and the fix, and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ijepa_viz.config import PRESETS, Config, ConfigError, get_preset, load_yaml, override, valid_keys


class UserError(Exception):
    """A problem with the user's input; printed as one line, exit status 2."""


# -- shared option handling --------------------------------------------------------------------------

def _add_config_args(p: argparse.ArgumentParser, data: bool = True) -> None:
    p.add_argument("--preset", default="cpu-tiny", choices=list(PRESETS), help="named configuration to start from")
    p.add_argument("--config", metavar="YAML", help="start from a YAML config (e.g. a run's config.yaml) instead")
    if data:
        p.add_argument("--data", metavar="NAME", help="dataset: shapes, cifar10, cifar100, stl10, fashion_mnist, "
                                                      "imagefolder (sets data.name)")
        p.add_argument("--data-root", metavar="PATH", help="dataset folder (sets data.root)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override any field, e.g. --set optim.lr=5e-4 (repeatable)")


def _config_from_args(args) -> Config:
    cfg = load_yaml(args.config) if getattr(args, "config", None) else get_preset(args.preset)
    sets = []
    if getattr(args, "data", None):
        sets.append(f"data.name={args.data}")
    if getattr(args, "data_root", None):
        sets.append(f"data.root={args.data_root}")
    if getattr(args, "epochs", None) is not None:
        sets += [f"train.epochs={args.epochs}", "train.steps=none"]
    if getattr(args, "steps", None) is not None:
        sets.append(f"train.steps={args.steps}")
    if getattr(args, "out", None):
        sets.append(f"train.out_dir={args.out}")
    return override(cfg, sets + list(args.overrides))


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


# -- subcommands -------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from ijepa_viz.train import Trainer, shutdown_distributed

    cfg = _config_from_args(args)
    out = Path(cfg.train.out_dir)
    if (out / "checkpoint.pt").exists() and not args.resume:
        raise UserError(f"{str(out)!r} already holds a checkpoint; pass --resume to continue it, or choose "
                        f"another --out")
    if args.resume and not (out / "checkpoint.pt").exists():
        print(f"no checkpoint in {str(out)!r} yet: starting a new run")
    try:
        result = Trainer(cfg, resume=args.resume, progress=not args.quiet).fit()
    except BaseException:
        shutdown_distributed(wait=False)  # the other ranks may never reach a barrier
        raise
    shutdown_distributed()  # under torchrun: all ranks leave the group together, before the interpreter exits
    if result.checkpoint:
        last = result.history[-1]["loss"] if result.history else float("nan")
        state = "stopped early" if result.stopped_early else "done"
        print(f"{state}: {result.step} steps in {result.wall_time:.0f} s, last loss {last:.4f}; "
              f"checkpoint {result.checkpoint}")
    return 0


def cmd_presets(args) -> int:
    if args.keys:
        print("\n".join(valid_keys()))
        return 0
    if args.weights:
        from ijepa_viz.pretrained import shipped
        for name, about in shipped().items():
            print(f"{name:22s} {about}")
        return 0
    for name, (_, about) in PRESETS.items():
        print(f"{name:22s} {about}")
        if args.verbose:
            import yaml
            print(yaml.safe_dump(get_preset(name).to_dict(), sort_keys=False))
    return 0


def cmd_eval(args) -> int:
    probes = tuple(p.strip() for p in args.probe.split(",") if p.strip())
    bad = [p for p in probes if p not in ("linear", "knn")]
    if bad or not probes:
        raise UserError(f"--probe {args.probe!r}: choose from linear, knn (comma-separated)")
    from ijepa_viz.checkpoint import load_model
    from ijepa_viz.pretrained import is_shipped, load_shipped
    model, cfg = (load_shipped if is_shipped(args.checkpoint) else load_model)(args.checkpoint)
    sets = []
    if args.data:
        sets.append(f"data.name={args.data}")
    if args.data_root:
        sets.append(f"data.root={args.data_root}")
    cfg = override(cfg, sets + list(args.overrides))
    from ijepa_viz.evaluate import default_feature_cache, evaluate, format_table, format_timings

    cache = None if args.no_feature_cache else Path(args.feature_cache or default_feature_cache()).expanduser()
    if cache is not None and cache.exists() and not cache.is_dir():
        raise UserError(f"--feature-cache {str(cache)!r} is a file, not a folder; give a folder (it is created if "
                        f"missing), or pass --no-feature-cache")
    result = evaluate(args.checkpoint, cfg=cfg, model=model, probes=probes, limit_train=args.limit_train,
                      limit_test=args.limit_test, progress=not args.quiet, feature_cache=cache)
    print(format_table(result))
    print(format_timings(result))
    _write_json(args.json, result)
    return 0


def _write_json(path: "str | None", result: dict) -> None:
    """--json PATH: write the result there (creating its folder) and say so; nothing when PATH is None."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(result, indent=2))
        print(f"wrote {path}")


def cmd_demo(args) -> int:
    from ijepa_viz.demo import run_demo

    report = run_demo(out_dir=args.out, seconds=args.seconds, quick=args.quick)
    print(f"report: {report}")
    return 0


def cmd_bench(args) -> int:
    from ijepa_viz.bench import MODES, format_bench, run_bench

    cfg = _config_from_args(args)
    modes = tuple(m.strip() for m in args.modes.split(","))
    if any(m not in MODES for m in modes):
        raise UserError(f"--modes {args.modes!r}: choose from {', '.join(MODES)}")
    if args.quick:
        args.steps, args.warmup, args.data_batches, args.peak_seconds = 2, 1, 2, 0.2
    result = run_bench(cfg, modes, args.steps, args.warmup, args.data_batches, args.peak_seconds, args.rounds)
    print(format_bench(result))
    _write_json(args.json, result)
    return 0


def cmd_convert(args) -> int:
    from ijepa_viz.checkpoint import load_model
    from ijepa_viz.official import CONFIG_FILE, TIMM_FILE, WEIGHTS_FILE, export_safetensors, load_official, timm_kwargs

    if args.official:
        model, cfg = load_official(args.official, num_heads=args.num_heads)
        source = args.official
    else:
        model, cfg = load_model(args.checkpoint)
        source = args.checkpoint
    if args.timm:
        timm_kwargs(model.cfg)  # fail before writing anything when there is no timm equivalent
    out = export_safetensors(model, cfg, args.out, timm=args.timm, which=args.which)
    m = cfg.model
    print(f"converted {source}: ViT {m.embed_dim} wide, depth {m.depth}, {m.num_heads} heads, patch "
          f"{m.patch_size}, {m.img_size} px; predictor {m.pred_embed_dim} wide, depth {m.pred_depth}")
    files = [WEIGHTS_FILE, CONFIG_FILE] + ([TIMM_FILE] if args.timm else [])
    print(f"wrote {', '.join(str(out / f) for f in files)}")
    return 0


# -- parser ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ijepa-viz", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="Run `ijepa-viz COMMAND --help` for the options of a command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("train", help="train I-JEPA (checkpoints + metrics.jsonl in --out)",
                       description="Train I-JEPA. Writes config.yaml, metrics.jsonl and checkpoint.pt to --out. "
                                   "Ctrl-C stops cleanly with a checkpoint; --resume continues exactly.")
    _add_config_args(p)
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=_positive_int, help="passes over the training set")
    length.add_argument("--steps", type=_positive_int, help="optimiser steps (instead of --epochs)")
    p.add_argument("--out", metavar="DIR", help="run folder (sets train.out_dir)")
    p.add_argument("--resume", action="store_true", help="continue from DIR/checkpoint.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="linear probe / kNN of a checkpoint against raw-pixel and random baselines",
                       description="Evaluate the average-pooled target encoder of a checkpoint. The table always "
                                   "includes two baselines run the same way: raw pixels and a randomly "
                                   "initialised encoder of the same architecture.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint.pt written by train, or the name of a shipped model "
                        "(ijepa-viz presets --weights lists them)")
    p.add_argument("--data", metavar="NAME", help="dataset to evaluate on (default: the checkpoint's)")
    p.add_argument("--data-root", metavar="PATH", help="dataset folder")
    p.add_argument("--probe", default="linear,knn", help="comma-separated: linear, knn (default: both)")
    p.add_argument("--limit-train", type=_positive_int, help="use at most this many training images")
    p.add_argument("--limit-test", type=_positive_int, help="use at most this many test images")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a data field, e.g. --set data.batch_size=256")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.add_argument("--feature-cache", metavar="DIR",
                   help="keep each encoder's features here, keyed by its weights and the images, so that the "
                        "next eval of the same encoder only fits the probes (default: $IJEPA_VIZ_FEATURE_CACHE "
                        "or ~/.cache/ijepa_viz/features; the 16 most recently used files are kept)")
    p.add_argument("--no-feature-cache", action="store_true", help="extract every feature afresh, keep nothing")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("presets", help="list the named presets",
                       description="List the presets; --verbose prints each as YAML, --keys lists every "
                                   "field that --set accepts.")
    p.add_argument("--verbose", "-v", action="store_true", help="print every preset's full configuration")
    p.add_argument("--keys", action="store_true", help="list every key that --set accepts")
    p.add_argument("--weights", action="store_true",
                   help="list the pretrained weights shipped with the package (load_pretrained(NAME), "
                        "ijepa-viz eval --checkpoint NAME)")
    p.set_defaults(func=cmd_presets)

    p = sub.add_parser("demo", help="train cpu-demo on the built-in dots for ~3 minutes and write an HTML report",
                       description="Offline demo: trains the cpu-demo preset on the built-in dots dataset, "
                                   "evaluates it against the untrained encoder and raw pixels, and writes "
                                   "report.html with figures, a computed verdict and the time of each phase.")
    p.add_argument("--out", default="runs/demo", metavar="DIR", help="where to write the run and report")
    p.add_argument("--seconds", type=float, default=180.0,
                   help="most training time: the demo runs 800 steps, fewer if they do not fit (default 180)")
    p.add_argument("--quick", action="store_true", help="a tiny model and a few steps (for tests)")
    p.set_defaults(func=cmd_demo)

    from ijepa_viz import bench

    p = sub.add_parser("bench", help="training-step throughput, FLOPs, MFU and data speed",
                       description=bench.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_config_args(p)
    p.add_argument("--modes", default="fp32-eager,optimised", help=f"comma-separated: {', '.join(bench.MODES)}")
    p.add_argument("--steps", type=_positive_int, default=20, help="timed steps per mode (default 20)")
    p.add_argument("--warmup", type=_positive_int, default=5, help="untimed warm-up steps per mode")
    p.add_argument("--rounds", type=_positive_int, default=5,
                   help="the modes are timed in turn, a share of the steps each, this many times (default 5)")
    p.add_argument("--data-batches", type=int, default=20, help="batches for the data-pipeline timing (0: skip)")
    p.add_argument("--peak-seconds", type=float, default=1.0, help="time spent measuring each matmul peak")
    p.add_argument("--quick", action="store_true", help="a few steps only (tests)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser(
        "convert", help="official .pth.tar or a training checkpoint -> safetensors + config.json (+ timm)",
        description="Convert an official I-JEPA checkpoint (facebookresearch/ijepa .pth.tar: encoder, target "
                    "encoder and predictor) or an ijepa_viz training checkpoint into DIR/model.safetensors and "
                    "DIR/config.json (read back with ijepa_viz.official.import_safetensors); --timm also "
                    "writes DIR/encoder_timm.safetensors for timm's VisionTransformer. Nothing pickled is "
                    "executed; every file is written atomically.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--official", metavar="PATH.pth.tar", help="an official I-JEPA checkpoint")
    src.add_argument("--checkpoint", metavar="PATH.pt", help="a checkpoint.pt written by `ijepa-viz train`")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--timm", action="store_true", help="also write the encoder for timm (encoder_timm.safetensors)")
    p.add_argument("--which", choices=["target", "context"], default="target",
                   help="encoder for --timm: target (EMA, what the paper evaluates; default) or context")
    p.add_argument("--num-heads", type=int, metavar="N",
                   help="attention heads, for encoder widths other than the official ones")
    p.set_defaults(func=cmd_convert)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from ijepa_viz.checkpoint import CheckpointError
    from ijepa_viz.data import DataError
    from ijepa_viz.allocator import tune_cpu_allocator
    from ijepa_viz.train import TrainingDiverged

    tune_cpu_allocator()  # freed tensor memory stays in the process: no page faults per batch (allocator.py)
    try:
        return args.func(args) or 0
    except (UserError, ConfigError, DataError, CheckpointError, FileNotFoundError) as e:
        print(f"ijepa-viz {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line
        return 2
    except TrainingDiverged as e:
        print(f"ijepa-viz {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
