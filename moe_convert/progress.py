"""Progress of a long run on stderr: a bar on a terminal, plain lines in a log, nothing when quiet.

A CI log is not a terminal: a bar there is one line redrawn in place, which the log shows only at the
end (and CI systems kill jobs that stay silent). So when stderr is not a terminal, progress is a line at
the start (what will be done), then a line each time another `step` of the bytes is done or `interval`
seconds have passed without one, whichever comes first: percent, bytes done of the total, rate, ETA.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, TextIO

from .safe_text import one_line
from .units import human_bytes, human_rate, human_seconds

STEP = 0.1  # a line at least every 10% of the bytes
INTERVAL = 30.0  # and at least every 30 seconds


class Progress(Protocol):
    def update(self, n: int) -> None: ...

    def close(self) -> None: ...


class NoProgress:
    """--quiet, or a caller that did not ask for progress."""

    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def start(
    what: str,
    total: int,
    *,
    enabled: bool,
    headline: str = "",
    stream: TextIO | None = None,
    step: float = STEP,
    interval: float = INTERVAL,
) -> Progress:
    """Progress for `total` bytes of work called `what` ("converting", "verifying").

    Args:
        what: the verb each line starts with.
        total: bytes the run will process; `update(n)` reports n more.
        enabled: False gives a progress that prints nothing (as does a total of 0).
        headline: what will be done, for the first line of a log (a terminal's bar shows `what` only).
        stream: where to write (default: stderr, looked up now so tests can capture it).
        step, interval: a log line at least every `step` of the bytes and every `interval` seconds.
    """
    if not enabled or total <= 0:  # nothing to do (a --resume that finds everything written) says so elsewhere
        return NoProgress()
    out = sys.stderr if stream is None else stream
    if _is_terminal(out):
        from tqdm import tqdm

        bar: Progress = tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=what, file=out)
        return bar
    return LogProgress(what, total, out, headline=headline, step=step, interval=interval)


def _is_terminal(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or not a real file
        return False


class LogProgress:
    """Plain progress lines for logs; `update` may be called from any thread."""

    def __init__(
        self,
        what: str,
        total: int,
        stream: TextIO,
        *,
        headline: str = "",
        step: float = STEP,
        interval: float = INTERVAL,
        clock: Callable[[], float] = time.monotonic,
        ticker: bool = True,
    ) -> None:
        self.what, self.total, self.stream = what, max(total, 0), stream
        self.step, self.interval, self.clock = step, interval, clock
        self.done = 0
        self.started = self.last_line = clock()
        self.next_mark = self._mark_after(0)
        self.lock = threading.Lock()
        self.closed = threading.Event()
        self._write(f"{what}: {headline}" if headline else f"{what} {human_bytes(self.total)}")
        # A stall (a slow disk, a long fsync) updates nothing; the ticker still says every `interval` seconds
        # that the run is alive, so a CI system does not kill a silent job.
        self.thread = None
        if ticker:
            self.thread = threading.Thread(target=self._tick, name="moe-progress", daemon=True)
            self.thread.start()

    def update(self, n: int) -> None:
        with self.lock:
            self.done += n
            now = self.clock()
            if self.done >= self.next_mark or now - self.last_line >= self.interval:
                self._line(now)

    def close(self) -> None:
        self.closed.set()
        if self.thread is not None:
            self.thread.join()

    def line(self) -> str:
        """The progress line as of now: `converting: 40% (1.68 GB of 4.21 GB), 412.00 MB/s, ETA 6.1 s`."""
        elapsed = self.clock() - self.started
        percent = 100 * self.done / self.total if self.total else 100.0
        text = f"{self.what}: {percent:.0f}% ({human_bytes(self.done)} of {human_bytes(self.total)})"
        if elapsed > 0 and self.done:
            rate = self.done / elapsed
            text += f", {human_rate(rate)}"
            if self.done < self.total:
                text += f", ETA {human_seconds((self.total - self.done) / rate)}"
        return text

    def _line(self, now: float) -> None:
        self.last_line = now
        self.next_mark = self._mark_after(self.done)
        self._write(self.line())

    def _mark_after(self, done: int) -> float:
        """The byte count of the next `step` boundary above `done` (at most the total)."""
        if not self.total:
            return float("inf")
        stride = self.step * self.total
        return min((int(done / stride) + 1) * stride, self.total) if done < self.total else float("inf")

    def _tick(self) -> None:
        while not self.closed.wait(min(self.interval, 5.0)):
            with self.lock:
                now = self.clock()
                if now - self.last_line >= self.interval:
                    self._line(now)

    def _write(self, text: str) -> None:
        try:
            self.stream.write(one_line(text) + "\n")
            self.stream.flush()
        except (OSError, ValueError):  # stderr closed (a killed pipe): progress is not worth failing for
            pass
