"""What a verification run collects: problem lines and byte counts (shared by its passes and threads)."""

from __future__ import annotations

import threading
from typing import Any

from . import progress as progress_lines

PieceKey = tuple[int, str, int]  # (index of the rank in the manifest, tensor name, piece index)


class Findings:
    """Problems found so far, bytes read, and the progress bar (updated from the two reading threads)."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self.rank_files = 0
        self.bytes_read = 0  # rank file bytes
        self.source_bytes_read = 0
        self.bar: Any = None
        self._lock = threading.Lock()

    def problem(self, message: str) -> None:
        self.problems.append(message)

    def read_bytes(self, n: int, *, source: bool = False) -> None:
        with self._lock:
            if source:
                self.source_bytes_read += n
            else:
                self.bytes_read += n
            if self.bar is not None:
                self.bar.update(n)

    def start_bar(self, total: int, headline: str) -> None:
        """A bar on a terminal, plain progress lines in a log (see progress.py)."""
        self.bar = progress_lines.start("verifying", total, enabled=True, headline=headline)

    def close_bar(self) -> None:
        if self.bar is not None:
            self.bar.close()
