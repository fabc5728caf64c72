"""The `tarflow` command group: its commands (by module, imported only when needed), its own options
(--version, shell completion) and how the parser's own usage errors are reported. Light on purpose
(typer and click only), so what needs no torch (`watch`, `--help`, `--version`) starts without it."""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from typer.core import TyperCommand, TyperGroup

from .console import EXIT_FAILURE, EXIT_USAGE, error

HELP = "Train, sample, score and denoise TarFlow normalizing flows."

# name -> (module under tarflow_cli.commands, function): the one list both the full group (main.py)
# and the light one that only lists them (`tarflow`, `tarflow --help`) are built from
COMMANDS = (
    ("train", "train", "train"),
    ("sample", "sample", "sample"),
    ("score", "score", "score"),
    ("denoise", "denoise", "denoise"),
    ("info", "info", "info"),
    ("eval", "eval", "eval_cmd"),
    ("watch", "watch", "watch"),
    ("export-tb", "export_tb", "export_tb"),
)
SHELLS = ("bash", "zsh", "fish", "powershell", "pwsh")
COMPLETION_OPTIONS = ("--install-completion", "--show-completion")
DETECT = "auto"


def _flag_help(option):
    """The help option shown as a flag (`-h, --help`), as our on/off options are, not with a `<bool>` value."""
    if option is not None:
        option.metavar = ""
    return option


class FlagHelpCommand(TyperCommand):
    """A command whose --help reads as a flag in the option table."""

    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))


class OneLineErrors(TyperGroup):
    """Usage errors the parser finds (unknown option, bad or missing value, unknown command)
    reported like every other user error: one line on stderr naming the option, exit code 2,
    instead of a usage block and a boxed panel."""

    def get_help_option(self, ctx):
        return _flag_help(super().get_help_option(ctx))

    def parse_args(self, ctx, args):
        # the shell is an optional value, which the parser has no form for: a bare option means "detect"
        if args[:1] and args[0] in COMPLETION_OPTIONS and (len(args) == 1 or args[1].startswith("-")):
            args = [args[0], DETECT, *args[1:]]
        return super().parse_args(ctx, args)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except typer.Abort:
            error("aborted")
            sys.exit(EXIT_FAILURE)
        except Exception as e:
            if not _is_a(e, "ClickException"):
                raise
            if _is_a(e, "NoArgsIsHelpError"):  # bare `tarflow`: the help, once, as usual
                _show_help_once(e)
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if _is_a(e, "UsageError") and ctx is not None else ""
            error(e.format_message() + hint)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _show_help_once(e: Exception) -> None:
    """The help a bare `tarflow` asked for. Typer's rich help prints itself while the error is made
    (its formatter writes to the terminal and returns nothing), plain click's is the message; running
    the group again in standalone mode, as before, printed it a second time."""
    text = e.format_message()
    if text.strip():
        typer.echo(text)


def _is_a(e: Exception, name: str) -> bool:
    """By class name: typer vendors click's exceptions from 0.2x on, older typer uses click's own."""
    return any(cls.__name__ == name for cls in type(e).__mro__)


def _completion(install: bool):
    """--install-completion / --show-completion [SHELL]: typer's scripts for the named shell, or the
    one detected from the parent processes, or where that fails (a CI job, a script) $SHELL's."""

    def callback(ctx: typer.Context, value: Optional[str]) -> None:
        if value is None or ctx.resilient_parsing:
            return
        shell = _detected_shell() if value == DETECT else value
        option = "--install-completion" if install else "--show-completion"
        if shell not in SHELLS:
            what = f"unknown shell {shell!r}" if shell else "cannot tell which shell this is"
            error(f"{option}: {what} (name one of {', '.join(SHELLS)}, e.g. {option} bash)")
            sys.exit(EXIT_USAGE)
        from typer.completion import get_completion_script
        from typer.completion import install as install_script

        prog = ctx.find_root().info_name or "tarflow"
        complete_var = "_{}_COMPLETE".format(prog.replace("-", "_").upper())
        if install:
            shell, path = install_script(shell=shell, prog_name=prog, complete_var=complete_var)
            typer.echo(f"{shell} completion installed in {path}; it takes effect in a new shell")
        else:
            typer.echo(get_completion_script(prog_name=prog, complete_var=complete_var, shell=shell))
        raise typer.Exit(0)

    return callback


def _detected_shell() -> str:
    """The shell among the parent processes; where none is one completion supports (a CI job, a
    script run by sh), the login shell ($SHELL)."""
    try:
        import shellingham

        found = shellingham.detect_shell()[0]
    except Exception:  # no shell among the parents, or shellingham missing
        found = ""
    return found if found in SHELLS else Path(os.environ.get("SHELL", "")).name or found


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tarflow {installed_version()}")
        raise typer.Exit(0)


def installed_version() -> str:
    """The installed distribution's version (pyproject.toml's); the package's own from a bare checkout."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("tarflow")
    except PackageNotFoundError:
        from tarflow_core import __version__  # cheap: the package resolves its names on first use

        return __version__


def _group(
    version: Annotated[
        Optional[bool],
        typer.Option(
            "--version", "-V", is_eager=True, callback=_version, metavar="", help="Show the version and exit."
        ),
    ] = None,
    install_completion: Annotated[
        Optional[str],
        typer.Option(
            "--install-completion",
            metavar="[SHELL]",
            expose_value=False,
            callback=_completion(install=True),
            help=f"Install shell completion for SHELL ({', '.join(SHELLS)}; default: the current shell).",
        ),
    ] = None,
    show_completion: Annotated[
        Optional[str],
        typer.Option(
            "--show-completion",
            metavar="[SHELL]",
            expose_value=False,
            callback=_completion(install=False),
            help="Print that completion script, to copy it or customize the installation.",
        ),
    ] = None,
) -> None:
    """Train, sample, score and denoise TarFlow normalizing flows."""


def new_app() -> typer.Typer:
    """The `tarflow` group, without its commands."""
    from typer.completion import completion_init

    completion_init()  # typer's completers answer the shell's requests (the scripts below call them)
    app = typer.Typer(
        name="tarflow",
        cls=OneLineErrors,
        help=HELP,
        no_args_is_help=True,
        add_completion=False,  # its own options, below: the shell may be named
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
    app.callback()(_group)
    return app


def available_commands() -> list[tuple[str, str, str]]:
    """(name, module, function) of the commands whose module is there (`train` lands separately)."""
    return [c for c in COMMANDS if importlib.util.find_spec(f"tarflow_cli.commands.{c[1]}") is not None]


def listing_app() -> typer.Typer:
    """The group as `tarflow` and `tarflow --help` show it, its commands' help read from their
    modules' source instead of importing them (which loads torch: seconds). Only for showing the
    help, --version and completion scripts: a command named on the line gets the full group."""
    app = new_app()
    for name, module, function in available_commands():
        app.command(name, help=_docstring(module, function), cls=FlagHelpCommand)(_listed)
    return app


def _listed() -> None:
    """Never run: the light group serves only lines that name no command."""


def _docstring(module: str, function: str) -> str | None:
    spec = importlib.util.find_spec(f"tarflow_cli.commands.{module}")
    tree = ast.parse(Path(spec.origin).read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            return ast.get_docstring(node)
    return None
