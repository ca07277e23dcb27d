"""Progress over tensors and bytes with throughput and ETA (rich), shown only on a terminal."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)


class RichProgress:
    """Two bars: tensors finished, and output bytes written (with MB/s and ETA)."""

    def __init__(self, total_bytes: int, total_tensors: int, description: str):
        self._tensors = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), transient=False)
        self._progress = Progress(
            TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(), TimeRemainingColumn(),
            transient=False,
        )
        from rich.console import Group
        from rich.live import Live

        self._live = Live(Group(self._tensors, self._progress), refresh_per_second=4)
        self._tensor_task = self._tensors.add_task(f"{description}: tensors", total=total_tensors)
        self._task = self._progress.add_task(f"{description}: bytes  ", total=total_bytes)

    def update(self, done: int, total: int) -> None:
        self._progress.update(self._task, completed=done, total=total)

    def update_tensors(self, done: int, total: int) -> None:
        self._tensors.update(self._tensor_task, completed=done, total=total)

    def __enter__(self) -> "RichProgress":
        self._live.start()
        return self

    def __exit__(self, *exc) -> None:
        self._live.stop()


class StageProgress:
    """One bar per stage of a layer-by-layer run (e.g. "student", "teacher"), each counting layers, with ETA."""

    def __init__(self, description: str):
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                                  transient=False)
        self._description = description
        self._tasks: dict[str, int] = {}

    def update(self, stage: str, done: int, total: int) -> None:
        if stage not in self._tasks:
            self._tasks[stage] = self._progress.add_task(f"{self._description}: {stage} layers", total=total)
        self._progress.update(self._tasks[stage], completed=done, total=total)

    def __enter__(self) -> "StageProgress":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()
