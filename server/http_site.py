"""Start an aiohttp application on a TCP port, with a busy port as one clear AddressInUse line."""

from __future__ import annotations

import errno

from aiohttp import web


async def start_site(app: web.Application, host: str, port: int, what: str, ssl_context=None,
                     **runner_options) -> tuple[web.AppRunner, int]:
    """(runner, bound port) of `app` on host:port (0: a free port); `what` names it in the error."""
    from .app import AddressInUse

    runner = web.AppRunner(app, access_log=None, **runner_options)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, ssl_context=ssl_context, reuse_address=True).start()
    except OSError as exc:
        await runner.cleanup()
        busy = exc.errno == errno.EADDRINUSE
        raise AddressInUse(f"cannot serve {what} on {host}:{port}: "
                           f"{'the port is in use' if busy else exc.strerror or exc}") from None
    return runner, runner.addresses[0][1]
