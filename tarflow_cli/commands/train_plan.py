"""`tarflow train --plan [--memory SIZE] [--json]`: the memory plan of the settings given, printed
instead of training (tarflow_core/train/plan.py resolves them as the run would)."""

from __future__ import annotations

import json
from collections.abc import Callable

import typer


def print_plan(cfg, memory: str | None, as_json: bool, fail: Callable[[str, int], None]) -> None:
    """Print the plan of `cfg` (lines, or one JSON object) on stdout; bad input -> `fail(message, 2)`."""
    from tarflow_core.config import ConfigError
    from tarflow_core.memory import parse_size
    from tarflow_core.train import SetupError
    from tarflow_core.train.plan import plan_for

    budget = None
    if memory is not None:
        try:
            budget = parse_size(memory)
        except ValueError as e:
            fail(f"--memory: {e}", 2)
    try:
        plan = plan_for(cfg, budget)
    except (ConfigError, SetupError) as e:
        fail(str(e), 2)
    typer.echo(json.dumps(plan.to_dict()) if as_json else plan.describe())
