"""The live progress of a simulated run: rounds, sites done in the round, elapsed time and ETA.

On a terminal it is a ``rich`` progress display (Flower's log lines scroll above it); without one
(CI, a log file) it prints one plain line per round and never a control character. It observes the
round loop through :mod:`medflower.progress`.

Use it around any run in this process (``simulate``, ``compare``'s federated run, each run of a sweep)::

    with RunProgress(label="fedavg seed 0", num_rounds=exp.train.rounds) as bar:
        simulate(exp, out)
"""

from __future__ import annotations

import logging
import sys
import time
from types import TracebackType
from typing import IO, Any

from medflower import progress


def _clock(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class RunProgress:
    """A progress observer for one run; a context manager that registers and shows it.

    ``stream`` defaults to stderr; ``live`` forces the rich display on (True) or the plain lines
    (False); by default the display is live when ``stream`` is a terminal.
    """

    def __init__(
        self, *, label: str = "", num_rounds: int | None = None, stream: IO[str] | None = None, live: bool | None = None
    ) -> None:
        self.label = label
        self.num_rounds = num_rounds
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty() if live is None else live
        self.t0 = time.time()
        self.t_first: float | None = None  # when the first round started (start-up is not a round's time)
        self.round = 0
        self.round_done = False  # the current round has ended
        self.sites = (0, 0)  # done, total in the current round's training
        self.stage = "train"
        self._rich: Any = None
        self._task: Any = None
        self._cm: Any = None
        self._handlers: list[tuple[logging.StreamHandler[Any], Any]] = []

    # -- what the display says -------------------------------------------------------------------

    def eta(self) -> float | None:
        """Seconds left, from the mean time of the rounds done so far (None before the first)."""
        done = self.round if self.round_done else self.round - 1
        if not self.num_rounds or done <= 0 or self.t_first is None:
            return None
        return (time.time() - self.t_first) / done * (self.num_rounds - done)

    def line(self, record: Any = None) -> str:
        """The plain line of a finished round."""
        total = self.num_rounds or "?"
        parts = [f"{self.label}: " if self.label else "", f"round {self.round}/{total}"]
        if record is not None:
            parts.append(f" | {len(record.sites_train)}/{record.sites_asked} sites")
            test = record.global_test or {}
            shown = [f"{k} {test[k]:.3f}" for k in ("accuracy", "auc", "dice") if isinstance(test.get(k), float)]
            if shown:
                parts.append(" | " + " ".join(shown))
        parts.append(f" | elapsed {_clock(time.time() - self.t0)}")
        eta = self.eta()
        if eta is not None:
            parts.append(f" | ETA {_clock(eta)}")
        return "".join(parts)

    # -- observer ---------------------------------------------------------------------------------

    def round_started(self, server_round: int, num_rounds: int) -> None:
        self.round, self.num_rounds, self.round_done = server_round, num_rounds, False
        if self.t_first is None:
            self.t_first = time.time()
        self.sites, self.stage = (0, 0), "train"
        self._update()

    def sites_done(self, server_round: int, stage: str, done: int, total: int) -> None:
        self.stage = stage
        self.sites = (done, total)
        self._update()

    def round_ended(self, server_round: int, num_rounds: int, record: Any) -> None:
        self.round, self.round_done = server_round, True
        if self._rich is None:
            print(self.line(record), file=self.stream, flush=True)
        self._update()

    def _update(self) -> None:
        if self._rich is None:
            return
        done, total = self.sites
        eta = self.eta()
        label = f"{self.label}: " if self.label else ""
        self._rich.update(
            self._task,
            description=f"{label}round {self.round}/{self.num_rounds or '?'}",
            total=self.num_rounds,
            completed=self.round if self.round_done else self.round - 1,
            sites=f"{self.stage} {done}/{total} sites" if total else "waiting for sites",
            eta="-" if eta is None else _clock(eta),
        )

    # -- context ----------------------------------------------------------------------------------

    def __enter__(self) -> RunProgress:
        self.t0 = time.time()
        if self.live:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            console = Console(file=self.stream)
            self._rich = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                TextColumn("{task.fields[sites]}"),
                TextColumn("elapsed"),
                TimeElapsedColumn(),
                TextColumn("ETA {task.fields[eta]}"),
                console=console,
                redirect_stderr=True,
                redirect_stdout=True,
            )
            self._task = self._rich.add_task(
                f"{self.label or 'run'}: starting", total=self.num_rounds, sites="", eta="-"
            )
            self._rich.start()
            self._follow_logs()
        self._cm = progress.observe(self)
        self._cm.__enter__()
        return self

    def _follow_logs(self) -> None:
        """Point the loggers' console handlers at rich's redirected streams, so log lines scroll
        above the display instead of tearing it (a handler keeps the stream it was created with)."""
        for name in ("flwr", ""):
            for h in logging.getLogger(name).handlers:
                if type(h) is logging.StreamHandler and h.stream in (sys.__stderr__, sys.__stdout__):
                    self._handlers.append((h, h.stream))
                    h.setStream(sys.stderr if h.stream is sys.__stderr__ else sys.stdout)

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._cm.__exit__(exc_type, exc, tb)
        for h, stream in self._handlers:
            h.setStream(stream)
        self._handlers.clear()
        if self._rich is not None:
            self._rich.stop()
            self._rich = None
