"""`florence2 doctor`'s checks beyond this Python: the optional extras, a Redis, a running front end."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def check_extras() -> dict:
    """Which optional parts are installed: yolo (ultralytics), legacy (transformers < 4.50 in .legacy/ or
    $FLORENCE2_LEGACY_SITE, for remote-code checkpoints), tracing (OpenTelemetry)."""
    legacy = Path(os.environ.get("FLORENCE2_LEGACY_SITE", ".legacy"))
    return {
        "yolo": importlib.util.find_spec("ultralytics") is not None,
        "legacy": (legacy / "transformers").is_dir(),
        "tracing": importlib.util.find_spec("opentelemetry") is not None,
    }


def check_redis(url: str, problems: list[str]) -> dict:
    """Reachable, its server and version, and whether it keeps data across a restart."""
    import redis

    entry: dict = {"url": url}
    try:
        from florence2_serve.common.redis_url import connect

        connection = connect(url, socket_connect_timeout=3, socket_timeout=3)
        info = connection.info("server")
        persistence = connection.info("persistence")
        config = connection.config_get("appendonly")
        connection.close()
    except (redis.RedisError, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        problems.append(f"Redis at {url} is unreachable: {reason}")
        entry["error"] = reason
        return entry
    entry["server"] = info.get("server_name") or ("valkey" if "valkey_version" in info else "redis")
    entry["version"] = info.get("valkey_version") or info.get("redis_version")
    entry["appendonly"] = config.get("appendonly") == "yes"
    entry["rdb_last_save"] = persistence.get("rdb_last_save_time")
    entry["persistent"] = entry["appendonly"] or bool(persistence.get("rdb_saves"))
    major = int(str(entry["version"] or "0").split(".")[0] or 0)
    if major < 7:
        problems.append(f"Redis at {url} is {entry['version']}: version 7 or newer is needed (Redis functions)")
    return entry


def check_server(address: str, problems: list[str]) -> dict:
    """A running front end: its health and the models it serves."""
    from florence2_serve.client.client import Florence2Client
    from florence2_serve.client.errors import Florence2Error
    from florence2_serve.client.json_output import to_json
    from florence2_serve.client.retry import NO_RETRY

    entry: dict = {"address": address}
    with Florence2Client(address, timeout=5, retry=NO_RETRY) as client:
        try:
            entry["health"] = client.health()
            entry["models"] = {m.name: {"kind": to_json(m)["kind"], "live_workers": m.live_workers,
                                        "queue_depth": m.queue_depth,
                                        "engines": sorted({w.engine for w in m.workers if w.engine}),
                                        "engine_notes": sorted({w.engine_note for w in m.workers if w.engine_note})}
                               for m in client.list_models()}
        except Florence2Error as exc:
            problems.append(f"front end at {address}: {exc}")
            entry["error"] = str(exc)
            return entry
    if entry["health"] != "SERVING":
        problems.append(f"front end at {address} is {entry['health']}")
    return entry
