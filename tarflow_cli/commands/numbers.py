"""Number options that refuse nan and inf (a float option would take them) and, optionally, values
outside a range; the parser reports the option by name, as one line, exit 2."""

from __future__ import annotations

import math
from typing import Callable

import typer


def finite_float(minimum: float | None = None, maximum: float | None = None) -> Callable[[str], float]:
    """A typer `parser=` for a finite number in [minimum, maximum]."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"expected a number, got {text!r}") from None
        if not math.isfinite(value):
            raise typer.BadParameter(f"expected a finite number, got {text}")
        if minimum is not None and value < minimum:
            raise typer.BadParameter(f"{text} is below the smallest allowed value, {minimum:g}")
        if maximum is not None and value > maximum:
            raise typer.BadParameter(f"{text} is above the largest allowed value, {maximum:g}")
        return value

    return parse


FINITE = finite_float()
