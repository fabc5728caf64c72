"""The `tarflow` console entry: light on purpose, so it can take over Ctrl-C and SIGTERM before
the heavy modules (torch, typer, textual) load, which takes seconds.

While they load, an interrupt ends the program at once: "interrupted" on stderr, exit 130, no
traceback (the default handler would raise inside torch's import, and a C++ frame there turns
that into an abort). Once loaded, Ctrl-C raises KeyboardInterrupt as usual and SIGTERM does the
same for the one-shot commands, so both end with exit 130 and no partial output (writes are
atomic); `train` and `watch` install their own handlers (stop after the step, checkpoint).
"""

from __future__ import annotations

import os
import signal
import sys

SIGNALS = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = 130


def _quit_while_loading(signum, frame) -> None:
    try:  # straight to the descriptor: the signal may land while sys.stderr is mid-write (a warning)
        os.write(2, b"interrupted\n")
    except OSError:
        pass
    finally:
        os._exit(EXIT_INTERRUPTED)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def main() -> None:
    ignored = {s for s in SIGNALS if signal.getsignal(s) == signal.SIG_IGN}  # e.g. `tarflow ... &`
    for s in SIGNALS:
        if s not in ignored:
            signal.signal(s, _quit_while_loading)
    import typer.main

    app = _app_for(sys.argv[1:])
    # typer turns every command's annotations into options here (compiling them: a signal raised
    # inside that surfaces as a SyntaxError), so it is still part of loading
    run = typer.main.get_command(app)
    if signal.SIGINT not in ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if signal.SIGTERM not in ignored:
        command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
        signal.signal(signal.SIGTERM, signal.SIG_DFL if command == "watch" else _interrupt)
    try:
        run()
    finally:
        # The command is over and its output written; what is left is the interpreter's teardown
        # (a second with torch loaded), where a signal would end the process by that signal
        # (exit -15 / -2) instead of with the command's own code. Nothing is left to stop.
        for s in SIGNALS:
            signal.signal(s, signal.SIG_IGN)


# a line of only these needs no command's module: the group's help lists the commands from their source
_TOP_LEVEL = {"-h", "--help", "-V", "--version"}
_COMPLETION_SCRIPTS = {"--show-completion", "--install-completion"}


def _app_for(args: list[str]):
    """The smallest group that serves the line: torch and the commands load only when one runs
    (or when the shell asks for completions, which needs every command's options)."""
    if args[:1] and args[0] in _LIGHT_COMMANDS:
        return _light_command_app(args[0])
    completing = any(k.startswith("_TARFLOW_COMPLETE") for k in os.environ)
    if not completing and (set(args) <= _TOP_LEVEL or args[0] in _COMPLETION_SCRIPTS):
        from .group import listing_app

        return listing_app()
    return _full_app()


def _full_app():
    from .main import app

    return app


# commands that need neither torch nor the other commands, whose imports take seconds: the
# dashboard's first frame, an export of a run's events
_LIGHT_COMMANDS = ("watch", "export-tb")


def _light_command_app(name: str):
    """A group holding only the named command: same group, same command, same errors."""
    import importlib

    from .group import COMMANDS, FlagHelpCommand, new_app

    module, function = next((m, f) for n, m, f in COMMANDS if n == name)
    app = new_app()  # it has a callback: with one command, the command stays a sub-command
    app.command(name, cls=FlagHelpCommand)(getattr(importlib.import_module(f"tarflow_cli.commands.{module}"), function))
    return app


if __name__ == "__main__":
    main()
