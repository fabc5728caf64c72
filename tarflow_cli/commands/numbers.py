"""Number options that refuse nan and inf (a float option would take them) and, optionally, values
outside a range; the parser reports the option by name, as one line, exit 2. A value out of range is
worded as `train`'s settings word it: "must be >= 1 (got 0)"."""

from __future__ import annotations

import math
import re
from collections.abc import Callable

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
            raise typer.BadParameter(f"must be >= {minimum:g} (got {text})")
        if maximum is not None and value > maximum:
            raise typer.BadParameter(f"must be <= {maximum:g} (got {text})")
        return value

    return parse


def whole_number(minimum: int = 1) -> Callable[[str], int]:
    """A typer `parser=` for a whole number >= minimum (instead of `min=`, whose message is worded
    otherwise and which shows a range type in the help)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except (TypeError, ValueError):
            raise typer.BadParameter(f"expected a whole number, got {text!r}") from None
        if value < minimum:
            raise typer.BadParameter(
                f"must be a positive integer (got {text})" if minimum == 1 else f"must be >= {minimum} (got {text})"
            )
        return value

    return parse


POSITIVE = whole_number(1)


FINITE = finite_float()

SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch's generators take


def seed_int(text: str) -> int:
    """A typer `parser=` for --seed: a whole number torch can seed with (a larger one was an overflow
    traceback deep in the sampler)."""
    return _seed_in(text, SEED_MIN, SEED_MAX, "-2**63 to 2**64 - 1")


def train_seed_int(text: str) -> int:
    """`parser=` for train's --seed: training derives per-rank and per-stream seeds by adding small
    offsets, so it keeps well inside torch's range."""
    return _seed_in(text, -(2**62), 2**62, "-2**62 to 2**62")


def _seed_in(text: str, lowest: int, highest: int, shown: str) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"expected a whole number, got {text!r}") from None
    if not lowest <= value <= highest:
        raise typer.BadParameter(f"must be in {shown} (got {text})")
    return value


def micro_batch_int(text: str) -> int | str:
    """`parser=` for --micro-batch: a positive whole number, or `auto`."""
    if text.strip().lower() == "auto":
        return "auto"
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise typer.BadParameter(f"expected a positive whole number or 'auto', got {text!r}") from None
    if value < 1:
        raise typer.BadParameter(f"must be a positive integer or 'auto' (got {text})")
    return value


_COUNTS = re.compile(r"\s*\d+\s*(?:,\s*\d+\s*)*", re.ASCII)


def layer_counts(text: str) -> tuple[int, ...]:
    """`parser=` for --block-layers: positive whole numbers separated by commas (spaces allowed), one per
    block, e.g. `1,1,1,5`; whether there is one per block is the settings' check (it knows --blocks)."""
    counts = tuple(int(n) for n in text.split(",")) if _COUNTS.fullmatch(text) else ()
    if not counts or min(counts) < 1:
        raise typer.BadParameter(f"must be positive layer counts separated by commas, e.g. 1,1,1,5 (got {text!r})")
    return counts
