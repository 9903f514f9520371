"""Kubernetes-style probes: `/healthz` (the process serves) and `/readyz[?model=NAME]` (Redis answers, and
that model has a live worker).

The HTTP API serves both on its port. `--health-port` also serves them alone on a plaintext listener
with no token check, so kubelet's probes (which cannot present a client certificate, and whose gRPC
probes cannot speak TLS at all) keep working when the API ports require TLS, mTLS or tokens.
"""

from __future__ import annotations

import logging

import grpc
from aiohttp import web

from florence2_serve.common.errors import Reason, quote

from . import validation
from .errors import ServiceError, store_unavailable
from .http_site import start_site
from .http_status import error_status, http_status_of, status_json

log = logging.getLogger(__name__)

PATHS = ("/healthz", "/readyz")


def error_response(status, headers=None) -> web.Response:
    return web.Response(status=http_status_of(status), text=status_json(status), content_type="application/json",
                        headers=headers)


class Probes:
    def __init__(self, store):
        self.store = store

    def add_routes(self, app: web.Application) -> None:
        app.router.add_get("/healthz", self.healthz)
        app.router.add_get("/readyz", self.readyz)

    async def healthz(self, request):
        return web.json_response({"status": "SERVING"})

    async def readyz(self, request):
        """Ready: Redis answers, and with ?model=NAME that model has a live worker (503 otherwise)."""
        unknown = set(request.query) - {"model"}
        if unknown:
            raise ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.INVALID_FIELD,
                               f"/readyz takes only ?model=, not {quote(sorted(unknown)[0])}")
        if not await self.store.ping():
            raise store_unavailable()
        model = request.query.get("model")
        if model is not None:
            validation.check_model_name(model)
            try:
                live = await self.store.live_workers(model)
            except Exception:  # noqa: BLE001 - Redis went away between the two calls
                raise store_unavailable() from None
            if not live:
                raise ServiceError(grpc.StatusCode.UNAVAILABLE, Reason.NO_LIVE_WORKER,
                                   f"model {quote(model)} has no live worker", retry_after_s=1.0)
        return web.json_response({"status": "SERVING"})


class ProbeListener:
    """The probes alone, plaintext, on `--health-port` (bound to `--health-host`, default the gRPC host)."""

    def __init__(self, store):
        self.probes = Probes(store)
        self._runner: web.AppRunner | None = None
        self.port = 0

    @web.middleware
    async def _errors(self, request, handler):
        try:
            return await handler(request)
        except ServiceError as exc:
            return error_response(error_status(exc))

    async def start(self, host: str, port: int) -> int:
        app = web.Application(middlewares=[self._errors])
        self.probes.add_routes(app)
        self._runner, self.port = await start_site(app, host, port, "the health probes", shutdown_timeout=1.0)
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
