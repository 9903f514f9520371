"""A taken job as the engine's InferenceRequest: its image, settings and stop check, or why it cannot run."""

from __future__ import annotations

import hashlib
import threading

from florence2_serve.common.errors import JobError, Reason
from florence2_serve.common.generation import GenerationSettings
from florence2_serve.common.images import ImageError, decode_image
from florence2_serve.common.tasks import Task

from .inference import InferenceRequest
from .outcomes import Held, StopCheck
from .pixels import PreparationFailed, Prepared


def prepare_request(held: Held, prepared: Prepared | ImageError | PreparationFailed | None,
                    stop_now: threading.Event) -> JobError | None:
    """Set `held.request` (the job's image `prepared` already when the engine takes pixels, else decoded
    here), or say why the job cannot run."""
    job, record = held.job, held.job.record
    pixels = None
    try:
        if isinstance(prepared, (ImageError, PreparationFailed)):
            raise prepared
        if prepared is None:
            image = decode_image(job.image)
        else:
            image, pixels = prepared.image, prepared.pixels
    except ImageError as exc:
        return JobError((Reason.IMAGE_TOO_LARGE if exc.too_large else Reason.IMAGE_UNREADABLE).value, str(exc))
    except PreparationFailed as exc:
        return JobError(Reason.INFERENCE_FAILED.value, f"{exc} (twice)" if exc.died else str(exc))
    try:
        generation = GenerationSettings.from_options(record.generation)
        task = Task(record.task)
    except (ValueError, TypeError) as exc:
        return JobError(Reason.INVALID_FIELD.value, str(exc))
    held.stop = StopCheck(stop_now, held.cancel)
    held.request = InferenceRequest(
        image=image, task=task, text=record.text, region=tuple(record.region) if record.region else None,
        generation=generation, request_id=job.job_id, image_key=hashlib.blake2b(job.image, digest_size=16).hexdigest(),
        should_stop=held.stop, detection=dict(record.detection), pixels=pixels)
    return None
