"""What the user sees while a command runs: a rich live display on a terminal, plain log lines elsewhere."""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console

_state = {"quiet": False, "verbose": False}
err = Console(stderr=True, highlight=False)
out = Console(highlight=False, soft_wrap=True)


def configure(quiet: bool = False, verbose: bool = False) -> None:
    from llmkit.launch import is_main_process

    # Only the main process of a multi-process run talks to the user; the others would repeat it.
    _state.update(quiet=quiet or not is_main_process(), verbose=verbose)


def info(message: str) -> None:
    if not _state["quiet"]:
        err.print(message, soft_wrap=_plain())


def error(message: str) -> None:
    """One line on stderr; the message is printed as is (no markup: it may hold [MASK] or paths with [])."""
    from rich.text import Text

    err.print(Text.assemble(("error: ", "bold red"), message), soft_wrap=True)


def detail(message: str) -> None:
    if _state["verbose"] and not _state["quiet"]:
        err.print(f"[dim]{message}[/dim]", soft_wrap=_plain())


def live() -> bool:
    return err.is_terminal and not _state["quiet"]


def _plain() -> bool:
    """Writing to a log file or a pipe: one message, one line (rich would cut lines at 80 columns there)."""
    return not err.is_terminal


def fmt(value: Any) -> str:
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}"
        return f"{value:.3e}"
    return str(value)


def duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"


class StepProgress:
    """Progress of a job counted in steps (training steps, batches, documents), with live figures.

    On a terminal it is a rich progress bar; a StepProgress started while another one is shown (an evaluation
    pass inside training) becomes a transient line of that display, removed when it ends. Elsewhere (a log file,
    a pipe, CI) it prints nothing but the plain lines asked for with update(log=True)."""

    def __init__(self, description: str, total: int | None, unit: str = "step", enabled: bool = True,
                 context: str | None = None):
        self.description = description
        self.total = total
        self.unit = unit
        self.enabled = enabled and not _state["quiet"]
        self.context = context  # e.g. "cpu fp32": shown after the description unless inside another display
        self.start = time.perf_counter()
        self.figures: dict[str, Any] = {}
        self._progress = None
        self._nested = False
        self._last_figures = float("-inf")

    def due(self, interval: float = 0.5, final: bool = False) -> bool:
        """Whether live figures are due: shown, and `interval` seconds since the last time (or `final`). Lets a
        loop compute costly figures (a device sync) a few times a second rather than at every step."""
        if self._progress is None:
            return False
        now = time.perf_counter()
        if final or now - self._last_figures >= interval:
            self._last_figures = now
            return True
        return False

    def __enter__(self) -> "StepProgress":
        if self.enabled and live():
            description = self.description
            if _shown:
                self._progress, self._nested = _shown[-1]._progress, True
            else:
                from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
                    TimeRemainingColumn

                self._progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                          TextColumn("{task.fields[figures]}"), TimeElapsedColumn(),
                                          TextColumn("eta"), TimeRemainingColumn(), console=err, transient=False)
                self._progress.start()
                if self.context:
                    description = f"{description} [dim]({self.context})[/dim]"
            self._task = self._progress.add_task(description, total=self.total, figures="")
            _shown.append(self)
        return self

    def update(self, done: int, log: bool = False, **figures: Any) -> None:
        """Move to `done`; with log=True, also print a plain line when there is no live display."""
        self.figures.update(figures)
        text = "  ".join(f"{k} {fmt(v)}" for k, v in self.figures.items())
        if self._progress is not None:
            self._progress.update(self._task, completed=done, figures=text)
        elif log and self.enabled:
            elapsed = time.perf_counter() - self.start
            eta = ""
            if self.total and done:
                eta = f"  eta {duration(elapsed / done * (self.total - done))}"
            total = f"/{self.total}" if self.total else ""
            err.print(f"{self.description} {self.unit} {done}{total}  {text}{eta}", soft_wrap=_plain())

    def __exit__(self, *exc: Any) -> None:
        if self._progress is None:
            return
        _shown.remove(self)
        if self._nested:  # transient inside the outer display: show where it ended, then take the line away
            self._progress.refresh()
            self._progress.remove_task(self._task)
            self._progress.refresh()
        else:
            self._progress.stop()
        self._progress = None


_shown: list[StepProgress] = []  # the jobs on the terminal now, outermost first


def table(title: str, rows: dict[str, Any]) -> None:
    from rich.table import Table

    t = Table(title=title, show_header=True, header_style="bold")
    t.add_column("metric")
    t.add_column("value", justify="right")
    for key, value in rows.items():
        t.add_row(key, fmt(value))
    out.print(t)
