"""`tarflow watch` as a command (the app itself is tested with a Pilot elsewhere)."""

from __future__ import annotations

import os

import typer
from typer.testing import CliRunner

from tarflow_cli.commands.watch import watch

app = typer.Typer()
app.command("watch")(watch)
app.command("other")(lambda: None)  # keep `watch` a subcommand


def test_needs_a_terminal(tmp_path):
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "run")])
    assert result.exit_code == 2
    assert "interactive terminal" in result.output and "tail -f" in result.output


def test_a_file_that_is_not_an_events_file(tmp_path):
    f = tmp_path / "model.pth"
    f.write_text("x")
    result = CliRunner().invoke(app, ["watch", str(f)])
    assert result.exit_code == 2 and "expected a run directory" in result.output


def test_help_mentions_the_keys():
    result = CliRunner().invoke(app, ["watch", "--help"])
    assert result.exit_code == 0 and "q quit" in result.output


def test_a_folder_of_runs_names_them_instead_of_waiting(tmp_path):
    # `tarflow watch runs` (the parent folder) used to wait forever for runs/events.jsonl
    for name, mtime in (("tiny-a", 2_000_000_000), ("tiny-b", 1_000_000_000)):
        (tmp_path / "runs" / name).mkdir(parents=True)
        (tmp_path / "runs" / name / "events.jsonl").write_text('{"kind": "start"}\n')
        os.utime(tmp_path / "runs" / name / "events.jsonl", (mtime, mtime))
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "runs")])
    assert result.exit_code == 2
    out = " ".join(result.output.split())
    assert "is a folder of runs, not a run" in out and "2 there: tiny-a, tiny-b" in out
    assert f"e.g. tarflow watch {tmp_path / 'runs' / 'tiny-a'} (the newest" in out
    assert "interactive terminal" not in out


def test_a_directory_that_is_not_a_run(tmp_path):
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.jpg").write_bytes(b"x")
    result = CliRunner().invoke(app, ["watch", str(other)])
    assert result.exit_code == 2 and "is not a run directory: it has no events.jsonl" in " ".join(result.output.split())


def test_a_path_below_a_file(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    result = CliRunner().invoke(app, ["watch", str(tmp_path / "notes.txt" / "run")])
    assert result.exit_code == 2 and "is a file" in result.output


def test_what_may_still_become_a_run_is_waited_for(tmp_path):
    # not there yet, an empty directory, or one where train has written only config.json:
    # accepted (here refused only for want of a terminal, after the checks above)
    (tmp_path / "empty").mkdir()
    (tmp_path / "starting").mkdir()
    (tmp_path / "starting" / "config.json").write_text("{}")
    for path in (tmp_path / "new", tmp_path / "empty", tmp_path / "starting", tmp_path / "new" / "events.jsonl"):
        result = CliRunner().invoke(app, ["watch", str(path)])
        assert result.exit_code == 2 and "interactive terminal" in result.output, (path, result.output)


def test_watch_starts_without_loading_torch():
    """`tarflow watch` draws its first frame without the seconds torch takes to import: the
    console entry builds a group holding only `watch`, and its error handling looks the library's
    error types up only once loaded."""
    import subprocess
    import sys

    code = (
        "import sys; sys.argv = ['tarflow', 'watch', '--help']\n"
        "from tarflow_cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit:\n    pass\n"
        "print('torch' in sys.modules, 'numpy' in sys.modules)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "Follow a training run" in r.stdout
    assert r.stdout.strip().splitlines()[-1] == "False False"
