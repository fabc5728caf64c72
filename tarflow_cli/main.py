"""The `tarflow` command line: one module per command under `commands/`."""

from __future__ import annotations

from .commands.denoise import denoise
from .commands.eval import eval_cmd
from .commands.info import info
from .commands.sample import sample
from .commands.score import score
from .commands.watch import watch
from .group import new_app

app = new_app()
app.command("sample")(sample)
app.command("score")(score)
app.command("denoise")(denoise)
app.command("info")(info)
app.command("eval")(eval_cmd)
app.command("watch")(watch)


def _register_train() -> None:
    """`train` lands with the training issue; until its module exists the others work alone."""
    import importlib.util

    if importlib.util.find_spec("tarflow_cli.commands.train") is not None:
        from .commands.train import train

        app.command("train")(train)


_register_train()


def main() -> None:
    app()


if __name__ == "__main__":
    main()
