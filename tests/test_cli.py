"""The `ijepa-viz` command: subcommands, help, and a clear one-line error (exit 2) for every misuse."""
import subprocess
import sys

import pytest
import yaml

from ijepa_viz.cli import main
from ijepa_viz.config import PRESETS, valid_keys
from tiny import TINY


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_presets_lists_every_preset(capsys):
    code, out, _ = run(capsys, "presets")
    assert code == 0 and all(name in out for name in PRESETS)
    code, out, _ = run(capsys, "presets", "--keys")
    assert code == 0 and out.split() == valid_keys()


@pytest.mark.parametrize("sub", ["train", "eval", "presets", "demo"])
def test_every_subcommand_has_help(sub, capsys):
    with pytest.raises(SystemExit) as e:
        main([sub, "--help"])
    assert e.value.code == 0
    assert "usage: ijepa-viz " + sub in capsys.readouterr().out


def test_train_then_resume_from_the_cli(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["train", "--quiet", "--out", str(out), "--steps", "3"] + [a for item in TINY for a in ("--set", item)]
    code, stdout, _ = run(capsys, *args)
    assert code == 0 and "done: 3 steps" in stdout and (out / "checkpoint.pt").exists()
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["steps"] == 3 and saved["model"]["embed_dim"] == 32
    code, _, err = run(capsys, *args)  # the same --out again without --resume: refused, nothing overwritten
    assert code == 2 and "--resume" in err
    args[args.index("3")] = "5"
    code, stdout, _ = run(capsys, *(args + ["--resume"]))
    assert code == 0 and "done: 5 steps" in stdout


@pytest.mark.parametrize("argv, message", [
    (["train", "--set", "optim.lrr=1"], "unknown config key 'optim.lrr'"),
    (["train", "--set", "optim.lr=fast"], "optim.lr expects a float"),
    (["train", "--set", "optim.lr"], "must look like section.field=value"),
    (["train", "--set", "mask.target_scale=0.3,0.1"], "min > max"),
    (["train", "--set", "model.patch_size=5"], "not divisible by model.patch_size"),
    (["train", "--data", "mnist"], "data.name='mnist' is not a dataset"),
    (["train", "--config", "/nonexistent.yaml"], "does not exist"),
    (["train", "--set", "model.patch_size=4", "--set", "mask.min_keep=10", "--steps", "1",
      "--out", "{tmp}/x"], "min_keep"),
    (["eval", "--checkpoint", "/nonexistent.pt"], "does not exist"),
    (["eval", "--checkpoint", "{tmp}/x.pt", "--probe", "svm"], "--probe"),
])
def test_cli_errors_are_one_clear_line(argv, message, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    (tmp_path / "x.pt").write_bytes(b"")
    code, _, err = run(capsys, *argv)
    assert code == 2, err
    assert message in err and err.startswith("ijepa-viz ") and "Traceback" not in err


@pytest.mark.parametrize("argv", [["train", "--steps", "0"], ["train", "--epochs", "2", "--steps", "3"],
                                  ["train", "--preset", "nope"], ["frobnicate"]])
def test_argparse_misuse_exits_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    assert "error:" in capsys.readouterr().err


def test_console_script_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ijepa_viz", "presets"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0 and "cpu-tiny" in out.stdout
