"""What a model name can do, from the registrations of its live workers; token counting for Submit.

Workers register their kind, the tasks they serve and their token limits (worker/service.py), and
publish their tokenizer under `f2s:tokenizer:{digest}`. A job may land on any worker of its model,
so a model serves the tasks every live worker serves and the smallest of their limits.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass

from florence2_serve.common.tasks import FLORENCE_TASKS, Task
from florence2_serve.v1 import florence2_pb2 as pb

_KINDS = {"native": pb.MODEL_KIND_FLORENCE2, "remote": pb.MODEL_KIND_FLORENCE2, "yolo": pb.MODEL_KIND_YOLOV8,
          "noop": pb.MODEL_KIND_NOOP}


@dataclass(frozen=True)
class ModelCapabilities:
    kind: int  # pb.ModelKind
    tasks: frozenset[Task]
    max_new_tokens: int  # 0: generates no tokens
    max_text_tokens: int  # 0: takes no text
    tokenizer: str = ""  # digest of the published tokenizer; "": count UTF-8 bytes instead

    @classmethod
    def of_workers(cls, registrations: list[dict]) -> "ModelCapabilities":
        kinds = {_KINDS.get(fields.get("kind", ""), pb.MODEL_KIND_UNSPECIFIED) for fields in registrations}
        task_sets = [_tasks(fields) for fields in registrations]
        tokenizers = {fields.get("tokenizer", "") for fields in registrations}
        return cls(
            kind=kinds.pop() if len(kinds) == 1 else pb.MODEL_KIND_UNSPECIFIED,
            tasks=frozenset.intersection(*task_sets) if task_sets else frozenset(),
            max_new_tokens=min((_int(f, "max_new_tokens") for f in registrations), default=0),
            max_text_tokens=min((_int(f, "max_text_tokens") for f in registrations), default=0),
            tokenizer=tokenizers.pop() if len(tokenizers) == 1 else "",
        )


# What a registration without a task list (a worker of an older version) serves, by its kind.
_TASKS_OF_KIND = {"native": frozenset(FLORENCE_TASKS), "remote": frozenset(FLORENCE_TASKS),
                  "yolo": frozenset({Task.DETECT})}


def _tasks(fields: dict) -> frozenset[Task]:
    if "tasks" not in fields:
        return _TASKS_OF_KIND.get(fields.get("kind", ""), frozenset(Task))
    names = [name for name in fields["tasks"].split(",") if name]
    return frozenset(Task[name] for name in names if name in Task.__members__)


def _int(fields: dict, name: str) -> int:
    try:
        return int(fields.get(name, 0))
    except ValueError:
        return 0


class TokenCounter:
    """Counts text tokens with a model's tokenizer (the `tokenizers` library: no torch), loaded from
    Redis once per digest. Without a tokenizer, UTF-8 bytes stand in: a byte-level BPE token (what
    Florence-2 uses) covers at least one byte, so the byte count never undercounts."""

    def __init__(self, fetch):
        self._fetch = fetch  # async digest -> tokenizer JSON (bytes) or None
        self._loaded: dict[str, object] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def count(self, text: str, digest: str) -> int:
        tokenizer = await self._tokenizer(digest) if digest else None
        if tokenizer is None:
            return len(text.encode("utf-8"))
        return len(tokenizer.encode(text, add_special_tokens=False).ids)

    async def _tokenizer(self, digest: str):
        if digest in self._loaded:
            return self._loaded[digest]
        lock = self._locks.setdefault(digest, asyncio.Lock())
        async with lock:
            if digest not in self._loaded:
                raw = await self._fetch(digest)
                if not raw:  # not published (yet): count bytes this time, look again next time
                    return None
                self._loaded[digest] = await asyncio.to_thread(_build, raw)
        return self._loaded[digest]


def _build(raw: bytes):
    from tokenizers import Tokenizer

    return Tokenizer.from_str(raw.decode("utf-8"))
