"""Logging for every entry point (the `florence2` CLI configures it once per process).

`text` (default) is one line per record for people; `json` is one JSON object per line
(python-json-logger) for log pipelines, with the record's extra fields. Lines about a job carry
`job_id`, `model`, `task` and, if the client gave one, `request_id` (`job_fields`). rq's per-job INFO
chatter is off, and each Hugging Face warning is shown once per process.

JSON times are RFC 3339 in UTC with milliseconds (`2026-12-05T08:12:46.976Z`). A long-running process
in JSON format (serve, worker, up) also calls `json_lines_on_stderr`: whatever else reaches its stderr
(gRPC C-core's own lines, a library's print, a thread's uncaught traceback) becomes a JSON record too, so
the stream stays JSON Lines; progress bars are turned off.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sys
import threading
import time
from datetime import datetime, timezone

FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
JOB_FIELDS = ("job_id", "model", "task", "request_id")
# Libraries whose warnings repeat (every model load, every batch): shown once per message.
ONCE_LOGGERS = ("transformers", "huggingface_hub", "timm", "py.warnings")


class _Once(logging.Filter):
    def __init__(self):
        super().__init__()
        self.seen: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING or not record.name.startswith(ONCE_LOGGERS):
            return True
        key = f"{record.name}:{record.getMessage()}"
        if key in self.seen:
            return False
        self.seen.add(key)
        return True


class _TextWithJob(logging.Formatter):
    """The text format, with a job's fields appended when a record carries them."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = [f"{name}={getattr(record, name)}" for name in JOB_FIELDS if getattr(record, name, "")]
        return f"{line} [{' '.join(fields)}]" if fields else line


def rfc3339(created: float) -> str:
    """A Unix time as RFC 3339 in UTC with milliseconds: 2026-12-05T08:12:46.976Z."""
    return datetime.fromtimestamp(created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _json_formatter() -> logging.Formatter:
    from pythonjsonlogger.json import JsonFormatter

    class _Rfc3339Json(JsonFormatter):
        def formatTime(self, record, datefmt=None):  # noqa: N802 - logging's name
            return rfc3339(record.created)

    return _Rfc3339Json("%(asctime)s %(levelname)s %(name)s %(message)s",
                        rename_fields={"levelname": "level", "name": "logger", "asctime": "time"})


def configure_logging(level: int = logging.INFO, fmt: str = "text") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(_json_stream or sys.stderr)
    if fmt == "json":
        handler.setFormatter(_json_formatter())
    else:
        handler.setFormatter(_TextWithJob(TEXT_FORMAT))
    handler.addFilter(_Once())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    logging.captureWarnings(True)
    for name in ("rq", "rq.worker", "rq.queue", "rq.job"):
        logging.getLogger(name).setLevel(logging.WARNING)
    route_library_logs()


def route_library_logs() -> None:
    """Send the Hugging Face libraries' records through our handler (its format, its once-filter).

    transformers and huggingface_hub give their root loggers a handler of their own and stop
    propagation when they are first imported; call this again after importing them.
    """
    for name in ("transformers", "huggingface_hub"):
        library = logging.getLogger(name)
        library.handlers.clear()
        library.propagate = True


def job_fields(job_id: str, model: str = "", task: str = "", request_id: str = "") -> dict:
    """`extra=` for a log call about a job."""
    return {"job_id": job_id, "model": model, "task": task, "request_id": request_id}


def record_fields(record) -> dict:
    """`extra=` for a log call about a job, from its JobRecord (common/redis_layout.py)."""
    from florence2_serve.common.tasks import Task

    return job_fields(record.job_id, record.model, Task(record.task).name, record.request_id)


# -- JSON Lines on stderr, whoever writes there ------------------------------------------------------

_json_stream = None  # the real stderr, once json_lines_on_stderr took fd 2 over
# absl's line prefix (gRPC C-core): I1205 08:12:46.976 … — its first letter is the severity.
_ABSL_LEVELS = {"I": "INFO", "W": "WARNING", "E": "ERROR", "F": "CRITICAL"}


def json_lines_on_stderr() -> None:
    """Make every line this process (and the children that inherit its stderr) writes to stderr a JSON
    object: fd 2 becomes a pipe read by a thread that passes JSON lines through and wraps any other line
    as a record of logger `stderr`; our own handler writes to the real stderr directly. Also turns off the
    Hugging Face progress bars (carriage-return lines no collector can read). Call once, at an entry point."""
    global _json_stream
    if _json_stream is not None:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read by huggingface_hub and transformers at import
    if "transformers" in sys.modules:
        sys.modules["transformers"].utils.logging.disable_progress_bar()
    sys.stderr.flush()
    real = os.dup(2)
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)
    _json_stream = _LockedLines(os.fdopen(real, "w", buffering=1, encoding="utf-8", errors="replace"))
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setStream(_json_stream)
    reader = threading.Thread(target=_wrap_lines, args=(read_end, _json_stream), name="stderr-json", daemon=True)
    reader.start()
    atexit.register(_restore_stderr, real, reader)


class _LockedLines:
    """The real stderr, shared by the logging handler and the wrapping thread: one whole line per write."""

    def __init__(self, stream):
        self.stream = stream
        self.lock = threading.Lock()

    def write(self, text: str) -> int:
        with self.lock:
            return self.stream.write(text)

    def flush(self) -> None:
        with self.lock:
            self.stream.flush()


def _wrap_lines(read_end: int, out) -> None:
    pending = b""
    with os.fdopen(read_end, "rb", buffering=0) as pipe:
        while chunk := pipe.read(65536):
            pending += chunk.replace(b"\r", b"\n")
            *lines, pending = pending.split(b"\n")
            for line in lines:
                _write_wrapped(line.decode("utf-8", "replace"), out)
    if pending:
        _write_wrapped(pending.decode("utf-8", "replace"), out)


def _write_wrapped(line: str, out) -> None:
    text = line.strip()
    if not text:
        return
    try:
        if isinstance(json.loads(text), dict):
            out.write(text + "\n")
            return
    except ValueError:
        pass
    level = _ABSL_LEVELS.get(text[0], "WARNING") if text[:1] in _ABSL_LEVELS and text[1:5].isdigit() else "WARNING"
    out.write(json.dumps({"time": rfc3339(time.time()), "level": level, "logger": "stderr", "message": text}) + "\n")


def _restore_stderr(real: int, reader: threading.Thread) -> None:
    """At exit: flush what Python holds for stderr and give the reader a moment to write what it has."""
    try:
        sys.stderr.flush()
    except (OSError, ValueError):
        pass
    os.dup2(real, 2)  # closes our write end of the pipe (children may still hold theirs)
    reader.join(timeout=0.5)
