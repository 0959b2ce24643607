"""A live terminal view of tagging: a progress bar and the latest frames with their tags.

::

    view = LiveTagView(positions=["sample_x", "sample_y"])
    RE.subscribe(view.document)            # positions and expected points
    xsml.add_result_listener(view.results) # tags as they arrive
    with view:
        RE(grid_scan([det], sample_y, 0, 9, 5, sample_x, 0, 9, 5))

Made with `rich <https://rich.readthedocs.io>`_; on a terminal it redraws in
place, elsewhere (a log file, a notebook cell's captured output) it prints the
final state once when the view closes. The listeners are quick and never
raise: a broken view must not stall the RunEngine or the tagging worker.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict, deque
from collections.abc import Sequence
from typing import Any

from event_model import DocumentRouter

from .documents.routing import RunRouter
from .tags import TAGS

__all__ = ["LiveTagView"]

log = logging.getLogger(__name__)

_GROUP = {t.name: t.group for t in TAGS}
_MAX_POSITIONS = 100_000  # per run; a longer run forgets the oldest
_RUNS_KEPT = 16           # runs whose positions are kept (results come after the stop)


class _RunPositions(DocumentRouter):
    """One run, as the view sees it: its streams and its events' positions."""

    def __init__(self, view: LiveTagView, start: dict) -> None:
        super().__init__()
        self.view = view
        self.uid = start["uid"]
        self.streams: dict[str, str] = {}            # descriptor uid -> stream name
        self.positions: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()

    def start(self, doc: dict) -> None:
        self.view._add_run(self, doc)

    def descriptor(self, doc: dict) -> None:
        self.streams[doc["uid"]] = doc.get("name", "primary")

    def event_page(self, doc: dict) -> None:
        keys = [k for k in self.view.positions if k in doc["data"]]
        if not keys:
            return
        stream = self.streams.get(doc["descriptor"], "?")
        with self.view._lock:
            for i, seq in enumerate(doc["seq_num"]):
                self.positions[(stream, int(seq))] = {k: doc["data"][k][i] for k in keys}
            while len(self.positions) > _MAX_POSITIONS:
                self.positions.popitem(last=False)


class LiveTagView:
    """Progress of the current run and a table of the latest tagged frames.

    Parameters
    ----------
    positions : sequence of str
        Data keys of the source events shown as the frame's position
        (e.g. motor names); missing ones are left blank.
    rows : int
        Latest frames kept in the table.
    console : rich.console.Console, optional
        Where to draw (default: standard output).
    hide : sequence of str
        Tags left out of the table (instrument tags that are on every frame).
    """

    def __init__(self, *, positions: Sequence[str] = (), rows: int = 8, console=None,
                 hide: Sequence[str] = ("detector_gaps", "beamstop_circular",
                                        "beamstop_linear")):
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
        )

        self.console = console or Console()
        self.positions = list(positions)
        self.hide = set(hide)
        self._rows: deque = deque(maxlen=int(rows))
        self._lock = threading.Lock()
        self._runs: OrderedDict[str, _RunPositions] = OrderedDict()
        self._router = RunRouter([self._run_factory])
        self._scan: dict[str, Any] = {}
        self._task: dict[str, Any] = {}
        self._done: dict[str, int] = {}
        self.frames = 0
        self.skipped = 0
        self.progress = Progress(TextColumn("[bold]{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("frames tagged"),
                                 TimeElapsedColumn(), console=self.console)
        self._live = None

    # -- callbacks ----------------------------------------------------------

    def document(self, name: str, doc: dict) -> None:
        """RunEngine subscriber: learns each run's size and each event's position."""
        try:
            if name == "event":  # only what the view reads: a page of one
                name, doc = "event_page", {"descriptor": doc["descriptor"],
                                           "seq_num": [doc["seq_num"]],
                                           "data": {k: [v] for k, v in doc["data"].items()}}
            self._router(name, doc)
        except Exception:  # never let the view break the RunEngine
            log.exception("LiveTagView could not read a %s document", name)

    def _run_factory(self, name: str, start: dict):
        return [_RunPositions(self, start)], []

    def _add_run(self, run: _RunPositions, doc: dict) -> None:
        total = doc.get("num_points")
        label = f"scan {doc.get('scan_id', '?')} {doc.get('plan_name', '')}".strip()
        with self._lock:
            self._runs[run.uid] = run
            while len(self._runs) > _RUNS_KEPT:
                self._runs.popitem(last=False)
            self._scan[doc["uid"]] = doc.get("scan_id", "?")
            self._done[doc["uid"]] = 0
            self._task[doc["uid"]] = self.progress.add_task(
                label, total=int(total) if isinstance(total, int) else None)

    def results(self, run_uid: str, results: Sequence[Any]) -> None:
        """TaggingCallback result listener: adds rows and advances the run's bar."""
        try:
            with self._lock:
                run = self._runs.get(run_uid)
                where = run.positions if run is not None else {}
                for r in results:
                    pos = where.get((r.stream, int(r.seq_num)), {})
                    self._rows.append((self._scan.get(run_uid, "?"), int(r.seq_num), pos,
                                       list(r.tags or []), r.skip_reason or "",
                                       float(r.latency or 0.0)))
                    self.frames += 1
                    self.skipped += bool(r.skip_reason)
                task = self._task.get(run_uid)
                if task is not None:
                    self._done[run_uid] = self._done.get(run_uid, 0) + len(results)
                    done = self._done[run_uid]
                    total = next((t.total for t in self.progress.tasks if t.id == task), None)
                    if total is not None and done > total:   # an adaptive scan took more
                        self.progress.update(task, total=done)
                    self.progress.update(task, completed=done)
            if self._live is not None:
                self._live.refresh()
        except Exception:
            log.exception("LiveTagView could not show tag results")

    # -- drawing ------------------------------------------------------------

    def table(self):
        """The latest frames as a :class:`rich.table.Table`."""
        from rich.table import Table
        from rich.text import Text

        table = Table(title="latest frames", title_justify="left", expand=False,
                      show_edge=False, pad_edge=False)
        table.add_column("scan", justify="right")
        table.add_column("frame", justify="right")
        for p in self.positions:
            table.add_column(p, justify="right")
        table.add_column("tags")
        table.add_column("latency", justify="right")
        with self._lock:
            rows = list(self._rows)
        for scan, seq, pos, tags, skip, latency in rows:
            text = Text()
            if skip:
                text.append(f"skipped: {skip}", style="red")
            shown = [t for t in tags if t not in self.hide]
            for i, t in enumerate(shown):
                style = {"scattering": "bold cyan", "grazing": "bold magenta"}.get(
                    _GROUP.get(t, ""), "yellow")
                text.append(("  " if i else "") + t, style=style)
            if not skip and not shown:
                text.append("(no tag)", style="dim")
            cells = [str(scan), str(seq)]
            cells += [f"{pos[p]:.2f}" if isinstance(pos.get(p), (int, float)) else ""
                      for p in self.positions]
            cells += [text, f"{1000 * latency:.0f} ms"]
            table.add_row(*cells)
        return table

    def __rich__(self):
        from rich.console import Group

        return Group(self.progress, self.table())

    def start(self) -> LiveTagView:
        """Start redrawing (on a terminal; elsewhere the final state is printed on stop)."""
        from rich.live import Live

        if self._live is None:
            self._live = Live(self, console=self.console, refresh_per_second=4,
                              transient=False, redirect_stdout=False, redirect_stderr=False)
            self._live.start()
        return self

    def stop(self) -> None:
        """Stop redrawing and leave the final state on screen."""
        if self._live is not None:
            live, self._live = self._live, None
            live.stop()   # off a terminal this prints the final state once
            if not self.console.is_terminal:
                self.console.line()

    def __enter__(self) -> LiveTagView:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> None:
        """Forget finished runs' bars and rows (e.g. between demo steps)."""
        with self._lock:
            for task in list(self._task.values()):
                self.progress.remove_task(task)
            self._task.clear()
            self._done.clear()
            self._rows.clear()
