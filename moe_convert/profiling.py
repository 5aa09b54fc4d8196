"""Opt-in timers for the executor: `MOE_CONVERT_PROFILE=1` prints, per thread, where a conversion's time went.

Off by default (then every call here is a no-op). Each thread adds its own spans (read, hash, write, ...)
to its own table; the report at the end of a conversion lists, per thread, wall seconds, CPU seconds
(time.thread_time), each span's seconds, calls and MB, and how late a thread that only sleeps 1 ms
wakes up (a probe of how long a ready thread waits for the GIL). Spans nest nowhere: they are disjoint
stretches of one thread's time, so what is left of a lane's wall time is Python overhead and the GIL.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TextIO

ENABLED = os.environ.get("MOE_CONVERT_PROFILE", "") not in ("", "0")


@dataclass
class _Thread:
    name: str
    started: float
    cpu0: float
    spans: dict[str, list[float]] = field(default_factory=dict)  # name -> [seconds, calls, bytes]
    wall: float = 0.0
    cpu: float = 0.0


class Profile:
    """The timers of one conversion; `span` returns the start time to pass to `add` (0.0 when off)."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.threads: list[_Thread] = []
        self.lock = threading.Lock()
        self.started = time.perf_counter()
        self.probe_late: list[float] = []
        self._stop = threading.Event()
        self._probe: threading.Thread | None = None

    def _mine(self) -> _Thread:
        t: _Thread | None = getattr(self.local, "t", None)
        if t is None:
            t = self.local.t = _Thread(threading.current_thread().name, time.perf_counter(), time.thread_time())
            with self.lock:
                self.threads.append(t)
        return t

    def add(self, name: str, started: float, nbytes: int = 0) -> None:
        s = self._mine().spans.setdefault(name, [0.0, 0, 0])
        s[0] += time.perf_counter() - started
        s[1] += 1
        s[2] += nbytes

    def thread_start(self) -> None:
        self._mine()

    def thread_done(self) -> None:
        """Called by a thread at its end (the main thread: at the report) to record its wall and CPU time."""
        t = self._mine()
        t.wall, t.cpu = time.perf_counter() - t.started, time.thread_time() - t.cpu0

    def start_probe(self) -> None:
        def probe() -> None:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                time.sleep(0.001)
                self.probe_late.append(time.perf_counter() - t0 - 0.001)

        self._probe = threading.Thread(target=probe, name="gil-probe", daemon=True)
        self._probe.start()

    def report(self, out: TextIO, title: str) -> None:
        self._stop.set()
        if self._probe is not None:
            self._probe.join()
        self.thread_done()
        wall = time.perf_counter() - self.started
        late = sorted(self.probe_late) or [0.0]
        out.write(
            f"profile: {title}: {wall:.2f} s; GIL probe: a 1 ms sleep woke {1e3 * sum(late) / len(late):.2f} ms "
            f"late on average, p99 {1e3 * late[int(0.99 * (len(late) - 1))]:.2f} ms ({len(late)} samples)\n"
        )
        for t in self.threads:
            parts = [f"{t.name:22s} wall {t.wall:6.2f} cpu {t.cpu:6.2f}"]
            spent = 0.0
            for name, (sec, calls, nbytes) in sorted(t.spans.items(), key=lambda kv: -kv[1][0]):
                spent += sec
                mb = f" {nbytes / 1e6:.0f}MB" if nbytes else ""
                parts.append(f"{name} {sec:.2f}s/{calls}{mb}")
            parts.append(f"other {t.wall - spent:.2f}s")
            out.write("  " + "  ".join(parts) + "\n")
        out.flush()


class _Off(Profile):
    def __init__(self) -> None:
        pass

    def add(self, name: str, started: float, nbytes: int = 0) -> None:
        pass

    def thread_start(self) -> None:
        pass

    def thread_done(self) -> None:
        pass

    def start_probe(self) -> None:
        pass

    def report(self, out: TextIO, title: str) -> None:
        pass


_OFF = _Off()
current: Profile = _OFF


def clock() -> float:
    return time.perf_counter() if current is not _OFF else 0.0


def begin() -> Profile:
    """A fresh profile for a conversion that starts now (the shared no-op one when profiling is off)."""
    global current
    current = Profile() if ENABLED else _OFF
    current.start_probe()
    current.thread_start()
    return current


def end(title: str) -> None:
    global current
    current.report(sys.stderr, title)
    current = _OFF
