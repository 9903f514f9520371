"""Generation options of a request, validated the same way by the front end and the workers."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass

MAX_NUM_BEAMS = 16
MAX_NEW_TOKENS = 4096
MAX_REPETITION_PENALTY = 10.0


class GenerationError(ValueError):
    """An option out of range; `field` names it (as GenerationOptions does)."""

    def __init__(self, field: str, message: str):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class GenerationSettings:
    """Defaults are the reference run's: beam search with 3 beams, up to 1024 new tokens, no sampling."""

    num_beams: int = 3
    max_new_tokens: int = 1024
    min_new_tokens: int = 0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if not 1 <= self.num_beams <= MAX_NUM_BEAMS:
            raise GenerationError("num_beams", f"num_beams must be between 1 and {MAX_NUM_BEAMS}, got {self.num_beams}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise GenerationError("max_new_tokens",
                                  f"max_new_tokens must be between 1 and {MAX_NEW_TOKENS}, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise GenerationError("min_new_tokens", f"min_new_tokens must be between 0 and max_new_tokens "
                                  f"({self.max_new_tokens}), got {self.min_new_tokens}")
        penalty = self.repetition_penalty
        if not (math.isfinite(penalty) and 0 < penalty <= MAX_REPETITION_PENALTY):
            raise GenerationError("repetition_penalty", f"repetition_penalty must be a finite number in "
                                  f"(0, {MAX_REPETITION_PENALTY:g}], got {penalty!r}")

    def generate_kwargs(self) -> dict:
        kwargs = {"num_beams": self.num_beams, "max_new_tokens": self.max_new_tokens, "do_sample": False}
        if self.min_new_tokens:
            kwargs["min_new_tokens"] = self.min_new_tokens
        if self.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = self.repetition_penalty
        return kwargs

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_options(cls, options: dict) -> "GenerationSettings":
        """The settings for a request's options (only those it set); ValueError when out of range."""
        return _settings(tuple(sorted(options.items())))


@functools.lru_cache(maxsize=256)
def _settings(items: tuple) -> GenerationSettings:
    return GenerationSettings(**dict(items))
