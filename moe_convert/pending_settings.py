"""Step (b) of reading config.json, the settings through transformers, kept off a conversion's critical path.

Importing transformers' config classes imports torch: about 1.6 s on the 2-core VM, up to 12 s on the
16-core host (where they also pull in sympy, scikit-learn and pandas), and nothing before the output's
config.json needs the result. A conversion starts the reading, plans and writes meanwhile, and waits for
the result before the first rank file gets its final name. Where the reading runs:

- in a child Python process (this interpreter, this process's `sys.path`) when this process has no
  torch: there the import takes neither the GIL nor this process's time from the write threads. In a
  thread, the import contending for the GIL made the whole command slower than reading first did;
- in a thread where this process has torch or is about to import it for a cast: a child would load a
  second torch (~150 MB); only transformers' own modules are left to import then. Also where no child
  can be started;
- in the caller of `result` where nothing was started (`plan`, `verify`), or the child gave no answer.

docs/performance.md has the measurements.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import subprocess
import sys
import threading
from typing import Any

from .errors import ConfigError
from .model_config import ModelSettings, ModelSpec, read_settings, read_sizes

log = logging.getLogger(__name__)

# The child takes this process's sys.path first, so it imports the same moe_convert and transformers.
_CHILD_CODE = (
    "import json, sys; request = json.loads(sys.stdin.buffer.read()); sys.path[:] = request['path']; "
    "from moe_convert.pending_settings import answer; answer(request)"
)


class PendingSettings:
    """The settings of one config.json, read once.

    `start()` begins reading them in the background; `result()` returns them (waiting for the background
    reading, or reading them itself if none was started), or raises their ConfigError, in every caller and
    any thread. Their notes are logged once, when they arrive.
    """

    def __init__(self, raw: dict[str, Any], spec: ModelSpec, where: str) -> None:
        self.raw, self.spec, self.where = raw, spec, where
        self._lock = threading.Lock()
        self._started = False
        self._child: subprocess.Popen[bytes] | None = None
        self._thread: threading.Thread | None = None
        self._settings: ModelSettings | None = None
        self._error: BaseException | None = None

    @property
    def failed(self) -> bool:
        """The reading is over and raised."""
        return self._error is not None

    def start(self, *, torch_here: bool = False) -> None:
        """Begin reading in the background: in a child process, or in a thread where this process has
        imported torch or will (`torch_here`: a cast needs it), which a child would load a second time."""
        with self._lock:
            if self._started:
                return
            self._started = True
            if not (torch_here or _has_torch()):
                try:
                    self._child = _spawn(self.raw, self.where)
                    return
                except Exception as e:  # no interpreter to run, no processes left, ...: a thread does the same
                    log.debug("%s: reading the settings in a thread (no child process: %s)", self.where, e)
            self._thread = threading.Thread(
                target=self._read_in_thread, args=(torch_here,), name="moe-convert-settings", daemon=True
            )
            self._thread.start()

    def result(self) -> ModelSettings:
        with self._lock:
            if not self._started:
                self._started = True
                self._read_here()
        if self._thread is not None:
            self._thread.join()
        with self._lock:  # one caller collects the child's answer; the others wait for it here
            if self._child is not None:
                try:
                    self._collect(self._child)
                finally:
                    self._stop_child()
        if self._error is not None:
            raise self._error
        assert self._settings is not None
        return self._settings

    def cancel(self) -> None:
        """Stop a child still reading: the conversion failed for another reason."""
        with self._lock:
            self._stop_child()

    def _stop_child(self) -> None:
        child, self._child = self._child, None
        if child is not None and child.poll() is None:
            child.kill()
            child.communicate()

    def _read_in_thread(self, torch_first: bool) -> None:
        if torch_first:  # the conversion's first cast waits for torch: load it before transformers' own modules
            import torch  # noqa: F401
        self._read_here()

    def _read_here(self) -> None:
        try:
            settings = read_settings(self.raw, self.spec, self.where)
        except Exception as e:  # raised in every caller of result()
            self._error = e
            return
        self._arrived(settings)

    def _arrived(self, settings: ModelSettings) -> None:
        for note in settings.notes:
            log.warning("%s", note)
        self._settings = settings

    def _collect(self, child: subprocess.Popen[bytes]) -> None:
        out, err = child.communicate()
        try:
            reply = json.loads(out)
            if "error" in reply:
                self._error = ConfigError(reply["error"], reply["problems"])
                return
            fields = reply["settings"]
            self._arrived(ModelSettings(**{**fields, "notes": tuple(fields["notes"])}))
        except (ValueError, TypeError, KeyError):  # no answer (it crashed, was killed): read here instead
            last = err.decode(errors="replace").strip().splitlines()[-1:]
            log.debug("%s: the settings child exited %s (%s); reading here", self.where, child.returncode, last)
            self._read_here()


def _has_torch() -> bool:
    return "torch" in sys.modules


def _spawn(raw: dict[str, Any], where: str) -> subprocess.Popen[bytes]:
    if not sys.executable or getattr(sys, "frozen", False):
        raise OSError("this interpreter cannot run `python -c`")
    request = json.dumps({"path": sys.path, "raw": raw, "where": where}).encode()
    pipe = subprocess.PIPE
    child = subprocess.Popen([sys.executable, "-c", _CHILD_CODE], stdin=pipe, stdout=pipe, stderr=pipe)
    try:
        assert child.stdin is not None
        child.stdin.write(request)
        child.stdin.close()
        child.stdin = None  # written: communicate() only reads
    except BaseException:
        child.kill()
        child.communicate()
        raise
    return child


def answer(request: dict[str, Any]) -> None:
    """In the child: read the settings, answer on stdout in JSON (a ConfigError as its message and problems)."""
    raw, where = request["raw"], request["where"]
    try:
        reply: dict[str, Any] = {"settings": dataclasses.asdict(read_settings(raw, read_sizes(raw, where), where))}
    except ConfigError as e:
        reply = {"error": str(e), "problems": e.problems}
    sys.stdout.write(json.dumps(reply))
