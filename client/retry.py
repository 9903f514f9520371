"""When to try a call again: UNAVAILABLE only, with bounded exponential backoff that honours RetryInfo."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass

import grpc

from .errors import RpcError


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of UNAVAILABLE (the service restarting, Redis briefly away, a full queue).

    Delays grow from `initial_backoff_s` by `multiplier` up to `max_backoff_s`, with jitter; a
    server's RetryInfo raises the delay to its advice. At most `max_attempts` tries in all and no new
    try after `max_elapsed_s`. `RetryPolicy(max_attempts=1)` never retries.
    """

    max_attempts: int = 8
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    max_elapsed_s: float = 60.0

    def __post_init__(self):
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")

    def start(self) -> "Attempts":
        return Attempts(self)


NO_RETRY = RetryPolicy(max_attempts=1)


class Attempts:
    """One operation's tries under a policy: `next_delay(error)` is the wait before the next try, or None."""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        self.tries = 1
        self.started = time.monotonic()
        self._backoff = policy.initial_backoff_s

    def next_delay(self, error: RpcError) -> float | None:
        policy = self.policy
        if error.code() != grpc.StatusCode.UNAVAILABLE or self.tries >= policy.max_attempts:
            return None
        delay = self._backoff * random.uniform(0.8, 1.2)
        if error.retry_delay_s is not None:
            delay = max(delay, error.retry_delay_s)
        if time.monotonic() - self.started + delay > policy.max_elapsed_s:
            return None
        self.tries += 1
        self._backoff = min(self._backoff * policy.multiplier, policy.max_backoff_s)
        return delay

    def reset(self) -> None:
        """Progress was made (an event arrived): a later outage gets the full budget again."""
        self.tries = 1
        self.started = time.monotonic()
        self._backoff = self.policy.initial_backoff_s
