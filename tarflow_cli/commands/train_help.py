"""How `tarflow train --help` shows its defaults: `[default: ...]` at the end of each option's help, as
every command shows them; where the presets differ, "from the preset" and the `tiny` preset's value."""

from __future__ import annotations

from tarflow_core.presets import PRESETS


def bracket_default(help: str, default: str | None = None) -> str:  # noqa: A002
    """The help with its default shown as every command shows one, `[default: ...]` at the end: a
    `(default: ...)` in the text moves there, else `default` (if any) is added."""
    start = help.find("(default: ")
    if start >= 0:
        depth, end = 0, start
        for end in range(start, len(help)):
            depth += {"(": 1, ")": -1}.get(help[end], 0)
            if depth == 0:
                break
        default = help[start + len("(default: ") : end]
        help = (help[:start].rstrip() + help[end + 1 :]).rstrip()  # noqa: A001
    return f"{help} \\[default: {default}]" if default is not None else help


def preset_default(name: str, flags: tuple[str, ...]) -> str | None:
    """What `[default: ...]` says for a field: its value, or where the presets differ "from the
    preset" and the tiny preset's (the one `train` uses when none is named); None: nothing to show."""
    values = [getattr(p, name) for p in PRESETS.values()]
    tiny = getattr(PRESETS["tiny"], name)
    if isinstance(tiny, bool):
        on, _, off = flags[0].partition("/")
        tiny = on if tiny else off or f"no {on}"
    elif tiny is None:
        tiny = "none" if len({repr(v) for v in values}) > 1 else None
    if len({repr(v) for v in values}) > 1:
        return f"from the preset; tiny: {tiny}"
    return None if tiny is None else str(tiny)
