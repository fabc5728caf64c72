"""The `tarflow` group itself: bare `tarflow`, --version, --help and shell completion, through the
console entry (`tarflow_cli.entry.main`) as the installed command runs it."""

from __future__ import annotations

import os
import pty
import re
import select
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]


def entry_code(*args: str, after: str = "") -> str:
    return (
        f"import sys; sys.argv = ['tarflow', *{list(args)!r}]\n"
        "from tarflow_cli.entry import main\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\nelse:\n    code = 0\n" + after
    )


def tarflow(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """`tarflow ARGS` in a fresh interpreter, stdout and stderr piped."""
    code = entry_code(*args, after="sys.exit(code)")
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=timeout)


def test_bare_tarflow_prints_the_help_once_when_piped():
    r = tarflow()
    assert r.returncode == 2
    assert r.stdout.count("Usage:") == 1 and r.stdout.count("Commands") == 1, r.stdout
    assert "sample" in r.stdout and r.stderr == ""


def test_bare_tarflow_prints_the_help_once_on_a_terminal():
    main_fd, child_fd = pty.openpty()
    env = {**os.environ, "COLUMNS": "100", "TERM": "xterm"}
    p = subprocess.Popen([sys.executable, "-c", entry_code()], stdout=child_fd, stderr=child_fd, env=env)
    os.close(child_fd)
    out = b""
    while True:
        ready, _, _ = select.select([main_fd], [], [], 60)
        if not ready:
            break
        try:
            chunk = os.read(main_fd, 1 << 16)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        out += chunk
    p.wait(timeout=60)
    os.close(main_fd)
    text = out.decode("utf-8", "replace")
    assert text.count("Usage:") == 1, text


def test_bare_group_in_process_prints_the_help_once():
    from tarflow_cli.main import app

    r = CliRunner().invoke(app, [])
    assert r.exit_code == 2 and r.output.count("Usage:") == 1


@pytest.mark.parametrize("flag", ["--version", "-V"])
def test_version_is_the_installed_distributions(flag):
    r = tarflow(flag)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"tarflow {version('tarflow')}\n"
    declared = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    assert version("tarflow") == declared


@pytest.mark.parametrize("args", [["--version"], ["--help"], ["-h"], [], ["--show-completion", "bash"]])
def test_version_help_and_completion_scripts_start_without_torch(args):
    """Nothing on these lines runs a command: the group is built from the commands' source, so
    neither torch nor numpy is imported (seconds, on every `tarflow --help`)."""
    code = entry_code(*args, after="print('torch' in sys.modules, 'numpy' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "False False"


def test_the_light_help_is_the_full_groups_help():
    """`tarflow --help` comes from the light group; it must read exactly as the full group's."""
    from tarflow_cli.group import listing_app
    from tarflow_cli.main import app

    light = CliRunner().invoke(listing_app(), ["--help"], prog_name="tarflow", env={"COLUMNS": "120"})
    full = CliRunner().invoke(app, ["--help"], prog_name="tarflow", env={"COLUMNS": "120"})
    assert light.exit_code == full.exit_code == 0
    assert light.output == full.output
    assert "--version" in full.output and "--show-completion" in full.output and "watch" in full.output


def test_show_completion_for_a_named_shell():
    bash = tarflow("--show-completion", "bash")
    assert bash.returncode == 0, bash.stderr
    assert (
        "_TARFLOW_COMPLETE=complete_bash" in bash.stdout
        and "complete -o default -F _tarflow_completion tarflow" in bash.stdout
    )
    zsh = tarflow("--show-completion", "zsh")
    assert zsh.returncode == 0 and zsh.stdout.startswith("#compdef tarflow")


def test_show_completion_for_the_current_shell_from_SHELL(monkeypatch, capsys):
    """Without a shell named, the parent processes are asked; where none is a shell, $SHELL."""
    import shellingham

    from tarflow_cli.group import listing_app

    def no_shell(*a, **k):
        raise shellingham.ShellDetectionFailure()

    monkeypatch.setattr(shellingham, "detect_shell", no_shell)
    monkeypatch.setenv("SHELL", "/usr/bin/fish")
    r = CliRunner().invoke(listing_app(), ["--show-completion"], prog_name="tarflow")
    assert r.exit_code == 0, r.output
    assert "complete --command tarflow" in r.output


def test_show_completion_for_an_unknown_shell_is_one_line():
    r = tarflow("--show-completion", "tcsh")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip().splitlines() == [
        "error: --show-completion: unknown shell 'tcsh' (name one of bash, zsh, fish, powershell, pwsh, "
        "e.g. --show-completion bash)"
    ]


def test_install_completion_writes_the_script_under_home(tmp_path):
    r = tarflow("--install-completion", "bash", env={"HOME": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    script = tmp_path / ".bash_completions" / "tarflow.sh"
    assert script.is_file() and "_TARFLOW_COMPLETE" in script.read_text()
    assert str(script.name) in (tmp_path / ".bashrc").read_text()


def test_the_shell_gets_completions_for_commands_and_options():
    env = {"_TARFLOW_COMPLETE": "complete_bash", "COMP_WORDS": "tarflow sa", "COMP_CWORD": "1"}
    r = tarflow(env=env)
    assert r.returncode == 0 and r.stdout.split() == ["sample"], (r.stdout, r.stderr)
    env.update(COMP_WORDS="tarflow sample --se", COMP_CWORD="2")
    r = tarflow(env=env)
    assert r.returncode == 0 and {"--seed", "--segments"} <= set(r.stdout.split()), r.stdout
