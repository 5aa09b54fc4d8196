"""A conversion's start: transformers' notes about a config are taken from the reading thread only."""

from __future__ import annotations

import logging
import threading
import warnings

from moe_convert.model_config import _transformers_notes

# ---------------------------------------------------------------- notes: this thread's only


def test_notes_are_this_threads_only() -> None:
    """transformers' log records and warnings raised in the reading thread become its notes (and are not
    printed); another thread's at the same moment go where they always go."""
    tf_log = logging.getLogger("transformers.models.fake")
    seen_by_handlers: list[str] = []

    class Seen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen_by_handlers.append(record.getMessage())

    watcher = Seen()
    logging.getLogger("transformers").addHandler(watcher)
    inside, other_done = threading.Event(), threading.Event()
    other_warnings: list[str] = []

    def other_thread() -> None:
        inside.wait()
        tf_log.warning("theirs: a record")
        with warnings.catch_warnings(record=True) as caught:  # composes with the reader's routing
            warnings.simplefilter("always")
            warnings.warn("theirs: a warning", UserWarning, stacklevel=1)
        other_warnings.extend(str(w.message) for w in caught)
        other_done.set()

    other = threading.Thread(target=other_thread)
    other.start()
    try:
        with _transformers_notes("config.json") as notes:
            tf_log.warning("mine: a\n record")
            warnings.warn("mine: a warning (once per process)", FutureWarning, stacklevel=1)
            inside.set()
            assert other_done.wait(30)
    finally:
        logging.getLogger("transformers").removeHandler(watcher)
        other.join()
    assert notes == [
        "config.json: transformers: mine: a record",
        "config.json: transformers: mine: a warning (once per process)",
    ]
    assert "theirs: a record" in seen_by_handlers and not any(m.startswith("mine") for m in seen_by_handlers)
    assert other_warnings == ["theirs: a warning"]
