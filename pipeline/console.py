"""Terminal output for long work and results: one look, whatever the stage.

Progress and messages go to stderr; results (tables, JSON) go to stdout, so they can be piped.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

console = Console(stderr=True)
results = Console(width=None if sys.stdout.isatty() else 160)  # pipes and logs get whole rows


def progress_bar() -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rate]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=console,
    )


def table(title: str, columns: list[str], rows: list[list[str]]) -> Table:
    """A results table whose cells wrap rather than cut names and paths."""
    result = Table(title=title)
    for column in columns:
        result.add_column(column, overflow="fold")
    for row in rows:
        result.add_row(*row)
    return result
