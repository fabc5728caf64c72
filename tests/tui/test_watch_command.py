"""`tarflow watch` as a command (the app itself is tested with a Pilot elsewhere)."""

from __future__ import annotations

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
