"""`tarflow train` at the command line: options, output streams, user errors, resume checks."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from tarflow_cli.main import app
from tarflow_core.events import read_events

runner = CliRunner()
SMALL = (
    "--width 32 --head-dim 16 --blocks 2 --layers-per-block 1 --batch-size 16 --log-every 2 "
    "--eval-every 0 --sample-every 0 --num-samples 10 --device cpu"
).split()


def run(*args):
    return runner.invoke(app, ["train", *[str(a) for a in args]])


def assert_user_error(result, *needles, code=2):
    assert result.exit_code == code, (result.exit_code, result.stdout, result.stderr)
    lines = [line for line in result.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])


def test_help_lists_the_contract_options():
    r = runner.invoke(app, ["train", "--help"], env={"COLUMNS": "200"})
    assert r.exit_code == 0
    for opt in (
        "--data",
        "--preset",
        "--image-size",
        "--channels",
        "--patch-size",
        "--width",
        "--blocks",
        "--layers-per-block",
        "--head-dim",
        "--nvp",
        "--conditional",
        "--label-drop",
        "--noise",
        "--batch-size",
        "--lr",
        "--min-lr",
        "--warmup-steps",
        "--weight-decay",
        "--grad-clip",
        "--ema",
        "--max-steps",
        "--epochs",
        "--precision",
        "--compile",
        "--sample-every",
        "--eval-every",
        "--checkpoint-every",
        "--log-every",
        "--seed",
        "--run-dir",
        "--resume",
        "--ui",
    ):
        assert opt in r.stdout, opt


def test_short_run_prints_run_dir_on_stdout(tmp_path):
    r = run(
        *SMALL,
        "--max-steps",
        "4",
        "--run-dir",
        tmp_path / "run",
        "--ui",
        "plain",
        "--noise",
        "gaussian:0.05",
        "--vp",
        "--unconditional",
    )
    assert r.exit_code == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "run")
    assert "step 4/4" in r.stderr and "finished" in r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["noise_std"] == 0.05 and cfg["model"]["nvp"] is False and cfg["model"]["num_classes"] == 0
    assert (tmp_path / "run" / "checkpoints" / "step-00000004" / "train_state.pt").is_file()


def test_tui_falls_back_with_a_note(tmp_path):
    r = run(*SMALL, "--max-steps", "2", "--run-dir", tmp_path / "run", "--ui", "tui")
    assert r.exit_code == 0, r.stderr
    assert "needs an interactive terminal; writing log lines" in r.stderr
    assert r.stdout.strip() == str(tmp_path / "run")


def test_rich_ui_into_a_file_writes_log_lines(tmp_path):
    """`--ui rich` with stderr going to a file or pipe: a bar cannot redraw there (the log would get
    only its last frame), so the training lines are written as with --ui plain."""
    r = run(*SMALL, "--max-steps", "4", "--run-dir", tmp_path / "run", "--ui", "rich")
    assert r.exit_code == 0, r.stderr
    assert "step 2/4  loss" in r.stderr and "step 4/4  loss" in r.stderr
    assert r.stdout.strip() == str(tmp_path / "run")


def test_epochs_replace_the_preset_step_count(tmp_path):
    r = run(*SMALL, "--epochs", "0.05", "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["train"]["max_steps"] is None and cfg["total_steps"] == 5  # ceil(0.05 * 93)


def test_bad_data_path(tmp_path):
    assert_user_error(run("--data", tmp_path / "missing", "--run-dir", tmp_path / "r"), "missing")
    assert not (tmp_path / "r").exists()


def test_unwritable_run_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert_user_error(run(*SMALL, "--run-dir", blocker / "run"), "run directory", str(blocker / "run"))


@pytest.mark.parametrize(
    "args, needle",
    [
        (["--noise", "laplace"], "--noise"),
        (["--preset", "huge"], "unknown preset"),
        (["--preset", "mnist"], "needs --data"),
        (["--width", "48", "--head-dim", "32"], "--width"),
        (["--ui", "fancy"], "--ui"),
        (["--lr", "-1"], "--lr"),
        (["--unconditional", "--label-drop", "0.5"], "--label-drop"),
        (["--beta2", "1.5"], "--beta2"),
        (["--keep-checkpoints", "-1"], "--keep-checkpoints"),
    ],
)
def test_bad_options(tmp_path, args, needle):
    assert_user_error(run(*args, "--run-dir", tmp_path / "r"), needle)


def test_resume_rules(tmp_path):
    assert_user_error(run("--resume", tmp_path / "nothing"), "--resume")
    r = run(*SMALL, "--max-steps", "2", "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    assert_user_error(run("--resume", tmp_path / "run", "--width", "64"), "--width", "cannot change")
    # what may change is told, and a different preset is not silently ignored
    assert_user_error(run("--resume", tmp_path / "run", "--seed", "3"), "--seed", "what may change: ", "--max-steps")
    assert_user_error(run("--resume", tmp_path / "run", "--preset", "mnist"), "--preset", "cannot change")
    assert_user_error(run(*SMALL, "--run-dir", tmp_path / "run"), "already holds a run", "--resume")
    r = run("--resume", tmp_path / "run", "--max-steps", "4", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    ends = [e for e in read_events(tmp_path / "run" / "events.jsonl") if e["kind"] == "end"]
    assert [(e["step"], e["status"]) for e in ends] == [(2, "finished"), (4, "finished")]
    # the remedies for a diverged run may change on resume, and the change is told
    r = run("--resume", tmp_path / "run", "--max-steps", "5", "--lr", "1e-3", "--grad-clip", "1", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    assert "changed optimisation settings (--lr 0.002 -> 0.001, --grad-clip None -> 1.0)" in r.stderr


def test_full_disk_is_a_runtime_error(tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr("tarflow_core.train.run_dir.shutil.disk_usage", lambda p: usage(10, 10, 1024))
    assert_user_error(run(*SMALL, "--run-dir", tmp_path / "run"), "disk space", code=1)


SIGNAL_SELF = """
import os, signal, sys
import typer.main
import tarflow_cli.commands.train as T
from tarflow_cli import entry

WHERE, RUN_DIR = sys.argv[1:3]


def hit(where):
    if where == WHERE:
        os.kill(os.getpid(), signal.SIGTERM)

build = typer.main.get_command
def get_command(app):  # typer turning the commands' annotations into options
    hit("options")
    return build(app)
typer.main.get_command = get_command
pick_ui = T._pick_ui
T._pick_ui = lambda ui: (hit("body"), pick_ui(ui))[1]  # the train command, before its own handlers
sys.argv = ["tarflow", "train", "--device", "cpu", "--max-steps", "1", "--run-dir", RUN_DIR, "--ui", "plain"]
entry.main()
"""


@pytest.mark.parametrize("where", ["options", "body"])
def test_sigterm_before_the_run_takes_over_exits_130_quietly(tmp_path, where):
    """SIGTERM while typer builds the options, or in the command before its stop handler is in
    place: "interrupted", exit 130, no traceback (not a KeyboardInterrupt/SyntaxError traceback,
    not click's "aborted" with exit 1)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", SIGNAL_SELF, where, str(tmp_path / "run")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 130, r.stderr
    assert r.stderr.strip() == "interrupted" and r.stdout == ""
    assert not (tmp_path / "run").exists()


def test_resume_from_another_directory_with_relative_data(tmp_path, monkeypatch):
    """--data given relative to where the run started: the run stores it absolute, so --resume works
    from any directory, and naming the same data another way on resume is not a "change"."""
    import numpy as np

    (tmp_path / "a").mkdir()
    rng = np.random.default_rng(0)
    np.save(tmp_path / "a" / "imgs.npy", rng.integers(0, 256, (64, 8, 8), dtype=np.uint8))
    monkeypatch.chdir(tmp_path / "a")
    r = run(*SMALL, "--data", "imgs.npy", "--max-steps", "2", "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["data"] == str(
        tmp_path / "a" / "imgs.npy"
    )
    monkeypatch.chdir(tmp_path)
    r = run("--resume", tmp_path / "run", "--max-steps", "3", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    r = run("--resume", tmp_path / "run", "--data", "a/imgs.npy", "--max-steps", "4", "--ui", "plain")
    assert r.exit_code == 0, r.stderr


TEARDOWN_SIGNAL = """
import atexit, os, signal, sys, time
from tarflow_cli import entry

def late_signal():  # the interpreter is tearing down (a second with torch loaded)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(0.2)

atexit.register(late_signal)
sys.argv = ["tarflow", "train", "--device", "cpu", "--width", "32", "--head-dim", "16", "--blocks", "1",
            "--batch-size", "16", "--max-steps", "1", "--eval-every", "0", "--sample-every", "0",
            "--run-dir", sys.argv[1], "--ui", "plain"]
entry.main()
"""


def test_a_signal_while_the_finished_process_tears_down_keeps_its_exit_code(tmp_path):
    """SIGTERM after the run finished and printed its directory: exit 0 as reported, not a
    KeyboardInterrupt in the teardown or death by the signal (-15)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    r = subprocess.run(
        [sys.executable, "-c", TEARDOWN_SIGNAL, str(tmp_path / "run")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == str(tmp_path / "run")
    assert "KeyboardInterrupt" not in r.stderr and "Traceback" not in r.stderr


def test_resume_with_a_missing_or_foreign_run_config(tmp_path):
    r = run(*SMALL, "--max-steps", "2", "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    conf = tmp_path / "run" / "config.json"
    conf.write_text("[1]\n")
    assert_user_error(run("--resume", tmp_path / "run"), str(conf), "no 'train' settings")
    conf.unlink()
    assert_user_error(run("--resume", tmp_path / "run"), "has checkpoints but no config.json", "--ckpt")


def test_interrupt_while_loading_is_told_even_when_stderr_is_busy():
    """The loading-time handler runs between any two bytecodes, also while sys.stderr is in the
    middle of writing a warning (its buffer is then locked): "interrupted" must still come out."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import signal, sys\n"
        "from tarflow_cli import entry\n"
        "class Busy:\n"
        "    def write(self, s): raise RuntimeError('reentrant call inside <_io.BufferedWriter>')\n"
        "    def flush(self): raise RuntimeError('reentrant call')\n"
        "sys.stderr = Busy()\n"
        "entry._quit_while_loading(signal.SIGINT, None)\n"
    )
    root = Path(__file__).resolve().parents[2]
    r = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 130 and r.stderr == "interrupted\n"


def test_a_seed_the_run_cannot_derive_its_streams_from_is_a_usage_error(tmp_path):
    assert_user_error(run("--seed", 2**64, "--max-steps", 1, "--run-dir", tmp_path / "r"), "--seed", "2**62")
    assert not (tmp_path / "r").exists()


def test_the_ui_choice_survives_closed_standard_streams(monkeypatch):
    from tarflow_cli.commands import train as train_cmd

    monkeypatch.setattr(train_cmd.sys, "stdin", None)
    assert train_cmd._pick_ui(None) in ("rich", "plain")


def test_a_log_reader_that_goes_away_ends_the_lines_not_the_run(tmp_path):
    """`tarflow train ... 2>&1 | head -2`: the run finishes (status, checkpoint, exit 0) though
    nobody reads its log lines any more; it used to end 'failed' with a BrokenPipeError."""
    import subprocess
    import sys

    run_dir = tmp_path / "r"
    cmd = [
        sys.executable,
        "-m",
        "tarflow_cli",
        "train",
        "--max-steps",
        "12",
        "--log-every",
        "1",
        "--ui",
        "plain",
        "--eval-every",
        "0",
        "--sample-every",
        "0",
        "--run-dir",
        str(run_dir),
    ]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    p.stdout.readline()
    p.stdout.close()  # the reader is gone after the first line
    assert p.wait(timeout=240) == 0
    end = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "end"][-1]
    assert end["status"] == "finished", end


def test_every_training_setting_is_exactly_one_option_of_train():
    """Each `TrainConfig` field is one `tarflow train` option with the flags its declaration names,
    and each option is a field, apart from the documented few (`--resume`, `--ui`; `noise_std` is
    set by `--noise`)."""
    import dataclasses

    import typer.main

    from tarflow_cli.commands import train as train_cmd
    from tarflow_core.config import TrainConfig, option_spec

    command = typer.main.get_command(app).commands["train"]
    options = {p.name: p for p in command.params if p.name != "help"}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    assert set(options) - set(train_cmd.OPTIONS_WITHOUT_FIELD) == set(fields) - set(train_cmd.FIELDS_WITHOUT_OPTION)
    assert set(train_cmd.OPTIONS_WITHOUT_FIELD).isdisjoint(fields)
    for name, f in fields.items():
        spec = option_spec(f)
        if spec.cli:
            declared = sorted(part for flag in spec.flags for part in flag.split("/"))
            assert sorted([*options[name].opts, *options[name].secondary_opts]) == declared, name
            # the declared help, its default shown as every command shows one: `[default: ...]` at the end
            assert options[name].help.startswith(spec.help.split(" (default: ")[0].rstrip(".")), name
            assert "(default:" not in options[name].help, name


def test_plain_log_lines_keep_their_columns():
    """Each field starts in the same column from line to line (fixed decimals, padded)."""
    from tarflow_cli.commands.train import _train_line

    def line(step, loss, grad, speed):
        e = dict(kind="train", step=step, total_steps=100, loss=loss, bpd=8.583, lr=2e-3, grad_norm=grad)
        return _train_line({**e, "images_per_s": speed})

    lines = [line(25, 0.1783, 3.9, 379), line(100, -0.02654, 3.55, 1017), line(50, float("nan"), 12.25, 45)]
    for field in ("loss", "bpd", "lr", "grad", "img/s"):
        assert len({text.index(field) for text in lines}) == 1, (field, lines)
    assert "loss  0.1783" in lines[0] and "loss -0.0265" in lines[1] and "grad  3.90" in lines[0]
    assert len({len(text) for text in lines}) == 1


def test_train_help_shows_preset_driven_defaults_as_from_the_preset_with_the_tiny_value():
    import typer.main

    command = typer.main.get_command(app).commands["train"]
    helps = {p.name: p.help for p in command.params}
    assert helps["width"].endswith("\\[default: from the preset; tiny: 64]")
    assert helps["flip"].endswith("\\[default: from the preset; tiny: --no-flip]")
    assert helps["beta1"].endswith("\\[default: 0.9]")
    assert helps["img_size"] == "Image size in pixels. \\[default: read off the data]"
    assert helps["preset"].endswith("\\[default: tiny]")


@pytest.mark.parametrize("text", ["1,x", "0,1", "", "1,,2", "2.5", "1;2"])
def test_block_layers_that_are_no_layer_counts(tmp_path, text):
    assert_user_error(run("--block-layers", text, "--run-dir", tmp_path / "r"), "--block-layers", repr(text))


def test_block_layers_from_the_command_line_to_the_checkpoint_and_resume(tmp_path):
    """`--block-layers 1,2` (spaces allowed): one count per --blocks, recorded in the run and its
    checkpoints, shown by info and the plan, and the architecture a resume keeps."""
    assert_user_error(run(*SMALL, "--block-layers", "1,1,3", "--run-dir", tmp_path / "r"), "--block-layers gives 3")
    plan = run(*SMALL[: SMALL.index("--device")], "--block-layers", " 1, 3 ", "--plan", "--json", "--memory", "1GiB")
    assert plan.exit_code == 0, plan.stderr
    assert json.loads(plan.stdout)["model"] == "2-32-2-1+3"
    r = run(*SMALL, "--block-layers", "1, 2", "--max-steps", "2", "--run-dir", tmp_path / "run", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
    doc = json.loads((tmp_path / "run" / "config.json").read_text())
    assert doc["train"]["block_layers"] == doc["model"]["block_layers"] == [1, 2]
    info = runner.invoke(app, ["info", "--ckpt", str(tmp_path / "run"), "--json"])
    assert info.exit_code == 0, info.stderr
    shown = json.loads(info.stdout)
    assert (shown["architecture"], shown["block_layers"]) == ("2-32-2-1+2", [1, 2])
    table = runner.invoke(app, ["info", "--ckpt", str(tmp_path / "run")], env={"COLUMNS": "200"}).stdout
    assert "2-32-2-1+2 (patch-width-blocks-layers, data side first)" in table
    assert_user_error(run("--resume", tmp_path / "run", "--block-layers", "2,1"), "--block-layers", "cannot change")
    r = run("--resume", tmp_path / "run", "--block-layers", "1,2", "--max-steps", "3", "--ui", "plain")
    assert r.exit_code == 0, r.stderr
