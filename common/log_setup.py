"""Logging for every entry point (the `florence2` CLI configures it once per process).

`text` (default) is one line per record for people; `json` is one JSON object per line
(python-json-logger) for log pipelines, with the record's extra fields. Lines about a job carry
`job_id`, `model`, `task` and, if the client gave one, `request_id` (`job_fields`). rq's per-job INFO
chatter is off, and each Hugging Face warning is shown once per process.
"""

from __future__ import annotations

import logging
import sys

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


def configure_logging(level: int = logging.INFO, fmt: str = "text") -> None:
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        from pythonjsonlogger.json import JsonFormatter

        handler.setFormatter(JsonFormatter("%(asctime)s %(levelname)s %(name)s %(message)s",
                                           rename_fields={"levelname": "level", "name": "logger", "asctime": "time"}))
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
