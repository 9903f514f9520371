"""Redis URLs: `redact` hides a password before a URL is logged or printed; Sentinel URLs
(`redis+sentinel://h1:26379,h2:26379/MASTER/0`) name a Sentinel-managed Redis, and `connect` gives a
redis-py client for either kind."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit


def redact(url: str) -> str:
    """`redis://:secret@host:6379/0` -> `redis://:***@host:6379/0` (user names stay; no password, no change)."""
    try:
        parts = urlsplit(url)
        password = parts.password  # the userinfo alone: a sentinel list (h1:26379,h2) does not trouble it
    except ValueError:
        return "<unparsable Redis URL>"
    if not password:
        return url
    credentials, _, host = parts.netloc.rpartition("@")
    user = credentials.partition(":")[0]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


# -- Sentinel ---------------------------------------------------------------------------------------------

SENTINEL_SCHEMES = ("redis+sentinel", "valkey+sentinel", "rediss+sentinel", "valkeys+sentinel")
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelTarget:
    """A Sentinel-managed Redis: where the sentinels are, the master's name, and how to talk to the master.

    `redis+sentinel://[[user]:password@]h1[:26379],h2[:26379],…/MASTER[/DB][?sentinel_password=…&ssl_…]`:
    the password (and user) is the master's; `sentinel_password` authenticates to the sentinels when they
    require it; `rediss+sentinel://` talks TLS to the master (with redis-py's ssl_* query parameters)."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int = 0
    username: str | None = None
    password: str | None = None
    sentinel_password: str | None = None
    tls: bool = False
    query: tuple[tuple[str, str], ...] = ()


def is_sentinel(url: str) -> bool:
    return url.split("://", 1)[0].lower() in SENTINEL_SCHEMES


def parse_sentinel_url(url: str) -> SentinelTarget:
    scheme, _, rest = url.partition("://")
    if scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError(f"not a Sentinel URL: {redact(url)}")
    rest, _, query_text = rest.partition("?")
    authority, _, path = rest.partition("/")
    credentials, _, hosts = authority.rpartition("@")
    username = password = None
    if credentials:
        user, _, secret = credentials.partition(":")
        username, password = (unquote(user) or None), (unquote(secret) if secret else None)
    sentinels = []
    for item in (part.strip() for part in hosts.split(",")):
        if not item:
            continue
        if item.startswith("["):  # [v6]:port
            host, _, port = item[1:].partition("]")
            port = port.removeprefix(":")
        elif item.count(":") == 1:
            host, _, port = item.partition(":")
        else:
            host, port = item, ""
        try:
            sentinels.append((host, int(port) if port else DEFAULT_SENTINEL_PORT))
        except ValueError:
            raise ValueError(f"sentinel address {item!r} has no valid port") from None
    if not sentinels:
        raise ValueError("a Sentinel URL needs at least one sentinel host:port")
    parts = [p for p in path.split("/") if p]
    if not parts:
        raise ValueError("a Sentinel URL needs the master's name: redis+sentinel://h1:26379,h2:26379/MASTER/0")
    try:
        db = int(parts[1]) if len(parts) > 1 else 0
    except ValueError:
        raise ValueError(f"database {parts[1]!r} is not a number") from None
    query = {key: values[-1] for key, values in parse_qs(query_text).items()}
    return SentinelTarget(tuple(sentinels), unquote(parts[0]), db, username, password,
                          query.pop("sentinel_password", None), scheme.lower().startswith(("rediss", "valkeys")),
                          tuple(sorted(query.items())))


def connect(url: str, **options):
    """A redis-py client for `url`: a plain redis[s]:// URL as redis-py reads it, or a Sentinel URL as a client
    of the current master that follows a failover by itself (each new connection asks the sentinels)."""
    import redis

    if not is_sentinel(url):
        return redis.Redis.from_url(url, **options)
    target = parse_sentinel_url(url)
    master_options = dict(options)
    if target.tls:
        master_options["ssl"] = True
        master_options.update(dict(target.query))
    timeout = options.get("socket_timeout") or options.get("socket_connect_timeout") or 2.0
    return _sentinels(target, timeout).master_for(
        target.master, db=target.db, username=target.username, password=target.password, **master_options)


def _sentinels(target: SentinelTarget, timeout: float):
    """redis-py's Sentinel client for the target's sentinels (authenticated when they require it)."""
    from redis.sentinel import Sentinel

    options = {"socket_timeout": timeout, "socket_connect_timeout": timeout}
    if target.sentinel_password:
        options["password"] = target.sentinel_password
    return Sentinel(list(target.sentinels), sentinel_kwargs=options)


def master_url(url: str) -> str:
    """A plain redis[s]:// URL of the master a Sentinel URL names now (for tools that take only plain URLs,
    such as rq-dashboard: they do not follow a later failover); a plain URL as it is."""
    if not is_sentinel(url):
        return url
    from urllib.parse import quote, urlencode

    target = parse_sentinel_url(url)
    host, port = _sentinels(target, 2.0).discover_master(target.master)
    credentials = ""
    if target.password is not None:
        credentials = f"{quote(target.username or '', safe='')}:{quote(target.password, safe='')}@"
    query = f"?{urlencode(dict(target.query))}" if target.query else ""
    return f"{'rediss' if target.tls else 'redis'}://{credentials}{host}:{port}/{target.db}{query}"
