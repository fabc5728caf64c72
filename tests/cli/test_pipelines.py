"""The inference commands as scripts use them: real processes, real pipes, closed streams."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tarflow_core.checkpoint import save_checkpoint
from tests.conftest import tiny_model

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ck") / "cond"
    save_checkpoint(
        path, tiny_model(seed=3, dtype=torch.float32, num_classes=3), noise={"type": "gaussian", "std": 0.1}, step=7
    )
    return path


def tarflow(*args, close: tuple[int, ...] = (), **kw) -> subprocess.CompletedProcess:
    """`tarflow ARGS` in a fresh process, with the file descriptors in `close` closed (`>&-`)."""

    def closing():
        for fd in close:
            os.close(fd)

    return subprocess.run(
        [sys.executable, "-m", "tarflow_cli", *map(str, args)],
        cwd=ROOT,
        capture_output=not close,
        preexec_fn=closing if close else None,
        timeout=120,
        **kw,
    )


def in_process(monkeypatch, capsys, *args, stdout_closed: bool = False) -> tuple[int, str]:
    """Run `tarflow ARGS` in this process (fast); with `stdout_closed`, as Python sees `>&-`: no sys.stdout."""
    from tarflow_cli.main import main

    monkeypatch.setattr(sys, "argv", ["tarflow", *map(str, args)])
    if stdout_closed:
        monkeypatch.setattr(sys, "stdout", None)
    with pytest.raises(SystemExit) as e:
        main()
    monkeypatch.undo()
    return e.value.code, capsys.readouterr().err


def test_closed_stdout_is_refused_before_work_when_results_go_there(ckpt, tmp_path, monkeypatch, capsys):
    """`tarflow score ... >&-` used to die in a traceback (sys.stdout is None); now one sentence, exit 2."""
    np.save(tmp_path / "x.npy", np.zeros((2, 1, 4, 4), np.float32))
    for args in (
        ["score", "-c", ckpt, tmp_path / "x.npy"],
        ["sample", "-c", ckpt, "-n", 2, "--out", "-"],
        ["info", "-c", ckpt, "--json"],
        ["eval", "-c", ckpt],
    ):
        code, err = in_process(monkeypatch, capsys, *args, stdout_closed=True)
        assert code == 2, (args, err)
        assert "Traceback" not in err and "stdout is closed" in err and len(err.strip().splitlines()) == 1, (args, err)
    # results written to a file need no stdout
    code, err = in_process(
        monkeypatch, capsys, "sample", "-c", ckpt, "-n", 2, "--out", tmp_path / "s.npy", stdout_closed=True
    )
    assert code == 0, err
    assert np.load(tmp_path / "s.npy").shape == (2, 1, 4, 4)


class _ClosedStream:
    """What `2>&-` can leave behind: a stream whose every write fails with EBADF."""

    def write(self, text):
        raise OSError(9, "Bad file descriptor")

    def flush(self):
        raise OSError(9, "Bad file descriptor")

    def isatty(self):
        return False


def test_an_unwritable_stderr_loses_the_messages_not_the_run(ckpt, tmp_path, monkeypatch):
    from tarflow_cli.main import main

    for args, code in (
        (["sample", "-c", ckpt, "-n", 2, "--out", tmp_path / "s.npy"], 0),
        (["sample", "-c", tmp_path / "missing", "--out", tmp_path / "t.npy"], 2),
    ):
        monkeypatch.setattr(sys, "argv", ["tarflow", *map(str, args)])
        monkeypatch.setattr(sys, "stderr", _ClosedStream())
        with pytest.raises(SystemExit) as e:
            main()
        monkeypatch.undo()
        assert e.value.code == code, args
    assert np.load(tmp_path / "s.npy").shape == (2, 1, 4, 4)


class _ClosedPipe:
    """The write end of a pipe whose reader has gone (`| head -c 100`)."""

    def __init__(self):
        self.buffer = self

    def write(self, data):
        raise BrokenPipeError(32, "Broken pipe")

    def flush(self):
        pass

    def isatty(self):
        return False


def test_a_reader_that_goes_away_ends_the_command_quietly(ckpt, tmp_path, monkeypatch, capsys):
    """`tarflow sample --out - | head -c 100`, `tarflow score ... | head -1`: exit 0, no traceback."""
    from tarflow_cli.main import main

    np.save(tmp_path / "x.npy", np.zeros((3, 1, 4, 4), np.float32))
    for args in (["sample", "-c", ckpt, "-n", 3, "--out", "-"], ["score", "-c", ckpt, tmp_path / "x.npy"]):
        monkeypatch.setattr(sys, "argv", ["tarflow", *map(str, args)])
        monkeypatch.setattr(sys, "stdout", _ClosedPipe())
        with pytest.raises(SystemExit) as e:
            main()
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert e.value.code == 0 and "Traceback" not in err and "error" not in err, (args, err)


class _FullDisk(_ClosedPipe):
    """stdout redirected to a file on a full disk (`> /dev/full` does the same)."""

    def write(self, data):
        raise OSError(28, "No space left on device")


def test_results_that_cannot_be_written_to_stdout_are_one_line_exit_1(ckpt, tmp_path, monkeypatch, capsys):
    from tarflow_cli.main import main

    np.save(tmp_path / "x.npy", np.zeros((3, 1, 4, 4), np.float32))
    for args in (
        ["score", "-c", ckpt, tmp_path / "x.npy"],
        ["score", "-c", ckpt, tmp_path / "x.npy", "-f", "csv"],
        ["info", "-c", ckpt, "--json"],
        ["sample", "-c", ckpt, "-n", 1, "--out", tmp_path / "s.npy"],
    ):
        monkeypatch.setattr(sys, "argv", ["tarflow", *map(str, args)])
        monkeypatch.setattr(sys, "stdout", _FullDisk())
        with pytest.raises(SystemExit) as e:
            main()
        monkeypatch.undo()
        err = capsys.readouterr().err
        assert e.value.code == 1, (args, err)
        assert (
            err.strip().splitlines()[-1] == "error: could not write the results to stdout: No space left on device"
        ), (args, err)
        assert "Traceback" not in err
