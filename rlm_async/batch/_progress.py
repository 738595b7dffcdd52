"""The batch command's progress bar (rich): done / failed / running, the job's tokens and USD."""

from __future__ import annotations

from types import TracebackType

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from .._budget import UsageTotals
from ._items import ItemResult

__all__ = ["BatchProgress"]


class BatchProgress:
    """Counts a job's items and, on a terminal, draws them as a bar.

    Args:
        total: the job's items (those skipped as already finished included).
        console: where the bar goes; None or not a terminal: counts only.

    Attributes:
        done, failed, running, skipped: item counts.
        stopped: items the job's budget stopped as they ran (not recorded).
        usage: the job's usage so far (this run's items, the stopped ones included).
    """

    def __init__(self, total: int, console: Console | None = None) -> None:
        self.total = total
        self.done = self.failed = self.running = self.skipped = self.stopped = 0
        self.usage = UsageTotals()
        self._progress: Progress | None = None
        if console is not None and console.is_terminal:
            self._progress = Progress(
                TextColumn("[bold]batch[/bold]"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                console=console,
            )
        self._task = self._progress.add_task(self.line(), total=total) if self._progress is not None else None

    def line(self) -> str:
        """The counters as one line of text."""
        u = self.usage
        return (
            f"done {self.done}  failed {self.failed}  running {self.running}  skipped {self.skipped}  "
            f"tokens {u.prompt_tokens + u.completion_tokens:,}  ${u.cost_usd:.4f}"
        )

    def on_skipped(self, n: int) -> None:
        """``n`` items were already in the results file."""
        self.skipped = n
        self._draw()

    def on_start(self, item_id: str) -> None:
        """An item started."""
        self.running += 1
        self._draw()

    def on_result(self, result: ItemResult) -> None:
        """An item finished (and was recorded)."""
        self.running = max(self.running - 1, 0)
        if result.status == "done":
            self.done += 1
        else:
            self.failed += 1
        self.usage = self.usage + result.usage
        self._draw()

    def on_stopped(self, result: ItemResult) -> None:
        """The job's budget stopped a running item (not recorded; a rerun runs it): what it spent still counts."""
        self.running = max(self.running - 1, 0)
        self.stopped += 1
        self.usage = self.usage + result.usage
        self._draw()

    def _draw(self) -> None:
        if self._progress is not None and self._task is not None:
            finished = self.done + self.failed + self.skipped
            self._progress.update(self._task, completed=finished, description=self.line())

    def __enter__(self) -> BatchProgress:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()
