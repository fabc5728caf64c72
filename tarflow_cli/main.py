"""The `tarflow` command line: one module per command under `commands/`, listed in `group.COMMANDS`."""

from __future__ import annotations

import importlib

from .group import FlagHelpCommand, available_commands, new_app

app = new_app()
for _name, _module, _function in available_commands():
    app.command(_name, cls=FlagHelpCommand)(
        getattr(importlib.import_module(f"tarflow_cli.commands.{_module}"), _function)
    )


def main() -> None:
    app()


if __name__ == "__main__":
    main()
