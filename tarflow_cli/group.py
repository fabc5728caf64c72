"""The `tarflow` command group: how the parser's own usage errors are reported. Light on purpose
(typer and click only), so a command that needs no torch (`watch`) starts without loading it."""

from __future__ import annotations

import sys

import typer
from typer.core import TyperGroup

from .console import EXIT_FAILURE, error


class OneLineErrors(TyperGroup):
    """Usage errors the parser finds (unknown option, bad or missing value, unknown command)
    reported like every other user error: one line on stderr naming the option, exit code 2,
    instead of a usage block and a boxed panel."""

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
            if _is_a(e, "NoArgsIsHelpError"):  # bare `tarflow`: the help, as usual
                return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
            ctx = getattr(e, "ctx", None)
            hint = f" (see '{ctx.command_path} -h')" if _is_a(e, "UsageError") and ctx is not None else ""
            error(e.format_message() + hint)
            sys.exit(e.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


def _is_a(e: Exception, name: str) -> bool:
    """By class name: typer vendors click's exceptions from 0.2x on, older typer uses click's own."""
    return any(cls.__name__ == name for cls in type(e).__mro__)


def new_app() -> typer.Typer:
    """The `tarflow` group, without its commands."""
    return typer.Typer(
        name="tarflow",
        cls=OneLineErrors,
        help="Train, sample, score and denoise TarFlow normalizing flows.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        context_settings={"help_option_names": ["-h", "--help"]},
    )
