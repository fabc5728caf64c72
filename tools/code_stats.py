"""House-rule figures for the package: longest functions and classes, long lines, big files, and the
share of lines that are error handling.

Usage (from the repository root)::

    python tools/code_stats.py [PATH ...]        # default: tarflow_core tarflow_cli
    python tools/code_stats.py --json

What counts as an error-handling line (an estimate, the same rule before and after a change):
the lines of every `raise` statement, of every `except` clause with its body, of every `assert`,
and of every `if` whose body only raises (its test and its body). Blank lines, comments and
docstrings are not counted anywhere, so the share is of code lines.
"""

from __future__ import annotations

import argparse
import ast
import io
import json
import sys
import tokenize
from dataclasses import asdict, dataclass, field
from pathlib import Path

FUNCTION_LIMIT, CLASS_LIMIT, LINE_LIMIT, FILE_LIMIT = 80, 250, 120, 450


@dataclass
class Span:
    where: str
    name: str
    lines: int


@dataclass
class Stats:
    files: int = 0
    code_lines: int = 0
    error_lines: int = 0
    long_lines: list[str] = field(default_factory=list)
    big_files: list[Span] = field(default_factory=list)
    functions: list[Span] = field(default_factory=list)
    classes: list[Span] = field(default_factory=list)

    @property
    def error_share(self) -> float:
        return self.error_lines / max(1, self.code_lines)


def code_lines(source: str, tree: ast.Module) -> set[int]:
    """Line numbers holding code: not blank, not only a comment, not part of a docstring."""
    lines: set[int] = set()
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type not in (tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT):
            lines.update(range(tok.start[0], tok.end[0] + 1))
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if isinstance(body, list) and body and _is_docstring(body[0]):
            lines.difference_update(range(body[0].lineno, body[0].end_lineno + 1))
    return lines


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def error_lines(tree: ast.Module) -> set[int]:
    """Lines of raises, except clauses, asserts and raise-only `if`s (see the module docstring)."""
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Raise, ast.Assert, ast.ExceptHandler)):
            lines.update(range(node.lineno, node.end_lineno + 1))
        elif isinstance(node, ast.If) and not node.orelse and all(isinstance(s, ast.Raise) for s in node.body):
            lines.update(range(node.lineno, node.end_lineno + 1))
    return lines


def measure(paths: list[Path]) -> Stats:
    stats = Stats()
    for path in sorted(p for root in paths for p in ([root] if root.is_file() else root.rglob("*.py"))):
        source = path.read_text()
        tree = ast.parse(source)
        code = code_lines(source, tree)
        stats.files += 1
        stats.code_lines += len(code)
        stats.error_lines += len(error_lines(tree) & code)
        text_lines = source.splitlines()
        stats.long_lines += [f"{path}:{i}" for i, line in enumerate(text_lines, 1) if len(line) > LINE_LIMIT]
        stats.big_files.append(Span(str(path), "", len(text_lines)))
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                span = Span(f"{path}:{node.lineno}", node.name, node.end_lineno - node.lineno + 1)
                (stats.classes if isinstance(node, ast.ClassDef) else stats.functions).append(span)
    for spans in (stats.big_files, stats.functions, stats.classes):
        spans.sort(key=lambda s: -s.lines)
    return stats


def report(stats: Stats, top: int) -> str:
    over_f = [s for s in stats.functions if s.lines > FUNCTION_LIMIT]
    over_c = [s for s in stats.classes if s.lines > CLASS_LIMIT]
    over_files = [s for s in stats.big_files if s.lines > FILE_LIMIT]
    out = [
        f"files {stats.files}, code lines {stats.code_lines}",
        f"error handling: {stats.error_lines} lines = {100 * stats.error_share:.1f}% of code lines",
        f"lines over {LINE_LIMIT}: {len(stats.long_lines)}",
        f"files over {FILE_LIMIT} lines: {len(over_files)}" + "".join(f"\n  {s.where}: {s.lines}" for s in over_files),
        f"functions over {FUNCTION_LIMIT} lines: {len(over_f)}; classes over {CLASS_LIMIT}: {len(over_c)}",
        "longest functions:",
        *(f"  {s.lines:4d}  {s.name}  {s.where}" for s in stats.functions[:top]),
        "longest classes:",
        *(f"  {s.lines:4d}  {s.name}  {s.where}" for s in stats.classes[:top]),
    ]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("paths", nargs="*", type=Path, default=[Path("tarflow_core"), Path("tarflow_cli")])
    parser.add_argument("--top", type=int, default=5, help="how many of the longest functions and classes")
    parser.add_argument("--json", action="store_true", help="one JSON object instead of the table")
    args = parser.parse_args(argv)
    stats = measure(args.paths)
    if args.json:
        summary = asdict(stats) | {"error_share": stats.error_share}
        summary["functions"], summary["classes"] = summary["functions"][: args.top], summary["classes"][: args.top]
        summary["big_files"] = summary["big_files"][: args.top]
        print(json.dumps(summary, indent=1))
    else:
        print(report(stats, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
