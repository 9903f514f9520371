"""The Redis function library (common/rq_functions.lua): its code, the names its functions are registered
under, and calling them. Loaded once per Redis server, on the first call that finds it missing.

Names carry a digest of the Lua (and the functions' flags), so processes of different versions can share
one Redis. common/rq_bridge.py gives each entry point its argument layout and typed reply.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import redis
from rq.defaults import RQ_KEY_PREFIX

from . import redis_layout as layout


ENTRY_POINTS = ("enqueue", "take", "progress", "requeue", "heartbeat", "cancel", "append")


def _library() -> tuple[str, str, dict[str, str]]:
    """(the library's code, its name, entry point -> function name)."""
    lua = (Path(__file__).resolve().parent / "rq_functions.lua").read_text()
    # Everything but enqueue may run when Redis is at its maxmemory: ending, requeueing and cancelling jobs
    # is what frees memory (a job's image goes when it ends), and must never be refused for lack of it.
    # Enqueue is refused instead (OOM), which Submit answers as QUEUE_FULL.
    flags = {name: "" if name == "enqueue" else ", flags={'allow-oom'}" for name in ENTRY_POINTS}
    digest = hashlib.sha1((lua + repr(sorted(flags.items()))).encode()).hexdigest()[:12]
    functions = {name: f"f2s_{name}_{digest}" for name in ENTRY_POINTS}
    registrations = "".join(
        f"\nredis.register_function{{function_name='{functions[name]}', "
        f"callback=function(keys, args) return {name}_body(args) end{flags[name]}}}"
        for name in ENTRY_POINTS)
    return f"#!lua name=florence2_serve_{digest}\n{lua}{registrations}\n", f"florence2_serve_{digest}", functions


LIBRARY_CODE, LIBRARY_NAME, FUNCTIONS = _library()
_PREFIX_ARGS = (RQ_KEY_PREFIX, layout.PREFIX)


def _missing_function(exc: redis.exceptions.ResponseError) -> bool:
    return "Function not found" in str(exc)


def run_script(connection: redis.Redis, name: str, args):
    """FCALL one of the library's entry points, loading the library first if Redis lacks it."""
    function = FUNCTIONS[name]
    try:
        return connection.fcall(function, 0, *_PREFIX_ARGS, *args)
    except redis.exceptions.ResponseError as exc:
        if not _missing_function(exc):
            raise
    connection.function_load(LIBRARY_CODE, replace=True)
    return connection.fcall(function, 0, *_PREFIX_ARGS, *args)


async def run_script_async(connection, name: str, args):
    """The same over a connection with `await execute(*command)` (server/redis_pipe.py)."""
    function = FUNCTIONS[name]
    try:
        return await connection.execute("FCALL", function, 0, *_PREFIX_ARGS, *args)
    except redis.exceptions.ResponseError as exc:
        if not _missing_function(exc):
            raise
    await connection.execute("FUNCTION", "LOAD", "REPLACE", LIBRARY_CODE)
    return await connection.execute("FCALL", function, 0, *_PREFIX_ARGS, *args)
