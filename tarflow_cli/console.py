"""Where output goes: data on stdout, humans' messages on stderr; user errors become exit codes."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import NoReturn

import typer
from rich.console import Console
from rich.markup import escape

# emoji off: a path or value like `cuda:x:` or `a:smile:.png` must print as typed, not as an emoji;
# markup off on stdout: table cells hold file names, which may contain [brackets]
err = Console(stderr=True, highlight=False, emoji=False)
out = Console(highlight=False, soft_wrap=True, emoji=False, markup=False)

EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(Exception):
    """Bad usage or bad input: reported as one sentence, exit code 2."""


class InputError(Exception):
    """A user input (file, folder, array or option) is missing or malformed."""


class WriteError(Exception):
    """Writing an output failed at run time (e.g. the disk filled up)."""


# The library's error types, by module: looked up only once their module is loaded (an error of a
# module never imported cannot have been raised), so this module and `watch` load without torch.
_CORE_ERRORS = (
    ("tarflow_core.checkpoint", "CheckpointError", EXIT_USAGE),
    ("tarflow_core.sampling", "SamplingError", EXIT_FAILURE),
)


def _exit_code(e: Exception) -> int | None:
    """The exit code of an error the user is told in one sentence; None for anything else."""
    if isinstance(e, (UsageError, InputError)):
        return EXIT_USAGE
    if isinstance(e, WriteError):
        return EXIT_FAILURE
    for module, name, code in _CORE_ERRORS:
        cls = getattr(sys.modules.get(module), name, None)
        if cls is not None and isinstance(e, cls):
            return code
    return None


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print one clear sentence on stderr and exit with `code`."""
    error(message)
    raise typer.Exit(code)


def error(message: str) -> None:
    """One line on stderr: `error: message`."""
    _say(f"[bold red]error:[/] {escape(message)}", markup=True)


def info(message: str) -> None:
    _say(message, markup=False)


def _say(text: str, markup: bool) -> None:
    """Print on stderr; a closed or unwritable stderr (`2>&-`) loses the message, not the run."""
    try:
        err.print(text, markup=markup, highlight=False, soft_wrap=True)
    except (OSError, ValueError):  # ValueError: a closed file object
        pass


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """Map known error types to exit codes; no traceback for anything the user can fix."""
    try:
        yield
    except KeyboardInterrupt:
        info("interrupted")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    except BrokenPipeError:  # e.g. `tarflow score ... | head`
        with contextlib.suppress(Exception):
            sys.stdout = None  # type: ignore[assignment]
        raise typer.Exit(0) from None
    except Exception as e:
        code = _exit_code(e)
        if code is None:
            raise
        fail(str(e), code)


@contextlib.contextmanager
def to_stdout() -> Iterator[None]:
    """Around writes of results to stdout: a failure there (a full disk under `> FILE`, an I/O error)
    is a run-time failure told in one line, not a traceback; a reader that went away stays quiet."""
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        _drop_pending_stdout()
        raise WriteError(f"could not write the results to stdout: {e.strerror or e}") from None


def _drop_pending_stdout() -> None:
    """Point fd 1 at /dev/null: what is still buffered cannot be written anyway, and the interpreter's
    final flush would fail again, print "Exception ignored" and turn the exit code into 120."""
    with contextlib.suppress(Exception):
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)


def stdout_is_terminal() -> bool:
    return sys.stdout is not None and sys.stdout.isatty()


def require_stdout(command: str) -> None:
    """Refuse, before any work, to run a command whose results go to stdout when stdout is closed
    (`tarflow score ... >&-`: Python then has no sys.stdout at all)."""
    if sys.stdout is None:
        raise UsageError(
            f"stdout is closed, and {command} writes its results there; "
            "redirect it to a file (> FILE) or to /dev/null instead"
        )


def stderr_is_terminal() -> bool:
    return sys.stderr.isatty()
