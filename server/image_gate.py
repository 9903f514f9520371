"""The front end's image check with bounded memory, whatever arrives at once.

The header is read first (format, size and pixel limit: no pixel decoded, so decompression bombs
stop there). The full decode that catches corrupt data then runs under a pixel budget: checks in
flight hold at most `budget_pixels` decoded pixels together, and the others wait their turn.
"""

from __future__ import annotations

import asyncio
import contextlib

import grpc

from florence2_serve.common.errors import Reason
from florence2_serve.common.images import ImageError, ImageInfo, ImageLimits, header_pixels, probe_image
from florence2_serve.common.tasks import region_tokens

from .errors import ServiceError, invalid

# Images up to this many bytes are checked on the event loop; bigger ones in a thread.
INLINE_CHECK_BYTES = 256 * 1024


class PixelBudget:
    """A weighted semaphore counted in pixels; a weight above the budget is capped to it."""

    def __init__(self, budget: int):
        self.budget = budget
        self.in_use = 0
        self._changed = asyncio.Condition()

    @contextlib.asynccontextmanager
    async def hold(self, pixels: int):
        weight = min(pixels, self.budget)
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_use + weight <= self.budget)
            self.in_use += weight
        try:
            yield
        finally:
            async with self._changed:
                self.in_use -= weight
                self._changed.notify_all()


def image_error(exc: ImageError) -> ServiceError:
    if exc.too_large:
        return ServiceError(grpc.StatusCode.INVALID_ARGUMENT, Reason.IMAGE_TOO_LARGE, str(exc),
                            violations=[("job.image", str(exc))])
    return invalid("job.image", f"bad image: {exc}", Reason.IMAGE_UNREADABLE)


class ImageGate:
    def __init__(self, limits: ImageLimits, budget_pixels: int):
        self.limits = limits
        self.budget = PixelBudget(max(budget_pixels, 1))

    async def check(self, data: bytes, region: list[float] | None) -> ImageInfo:
        """The image's upright size, or ServiceError (unreadable, too large, region outside it)."""
        try:
            pixels = header_pixels(data, self.limits)
            async with self.budget.hold(pixels):
                if len(data) <= INLINE_CHECK_BYTES and pixels <= 4_000_000:
                    info = probe_image(data, self.limits)
                else:
                    info = await asyncio.to_thread(probe_image, data, self.limits)
        except ImageError as exc:
            raise image_error(exc) from None
        if region is not None:
            try:
                region_tokens(tuple(region), (info.width, info.height))
            except ValueError as exc:
                raise invalid("job.region", str(exc), Reason.REGION_OUT_OF_BOUNDS) from None
        return info
