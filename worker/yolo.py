"""YOLOv8 through ultralytics (the `yolo` extra; ultralytics is AGPL-3.0): loading and batched detection.

A YOLOv8 worker serves the DETECT task only. Checkpoints are ultralytics `.pt` files, given as the
file or as a directory holding `model.pt` (with `florence2_serve.json` beside it when built offline).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from florence2_serve.common.errors import JobError, Reason
from florence2_serve.common.proto_enums import task_to_proto
from florence2_serve.v1 import florence2_pb2 as pb
from florence2_serve.common.tasks import Task

from .inference import InferenceOutcome, InferenceRequest
from .model_builder import read_marker, write_marker

log = logging.getLogger(__name__)

YOLO_FILE = "model.pt"
DEFAULT_CONFIDENCE = 0.25
# ultralytics' own defaults, stated here so a request that sets one option keeps the others as they were.
DEFAULT_IOU = 0.7
DEFAULT_MAX_DETECTIONS = 300


def is_yolo_path(path_or_id: str) -> bool:
    path = Path(path_or_id)
    if path.suffix in (".pt", ".yaml", ".yml"):
        return True
    return path.is_dir() and (path / YOLO_FILE).is_file() and not (path / "config.json").exists()


def _checkpoint(path_or_id: str) -> tuple[Path, Path]:
    """(weights file, directory that may hold the marker)."""
    path = Path(path_or_id)
    if path.is_dir():
        return path / YOLO_FILE, path
    return path, path.parent


def load_yolo(path_or_id: str, device: str, dtype: str):
    """A LoadedModel around an ultralytics YOLO; ModelLoadError when it cannot be loaded."""
    from .loader import LoadedModel, ModelLoadError, resolve_device, resolve_dtype

    try:
        from ultralytics import YOLO
    except ImportError as exc:
        raise ModelLoadError(
            f"cannot load YOLOv8 {path_or_id}: ultralytics is not installed; "
            "pip install 'florence2-serve[yolo]' (ultralytics is AGPL-3.0)"
        ) from exc
    started = time.perf_counter()
    weights, folder = _checkpoint(path_or_id)
    if not weights.is_file():
        raise ModelLoadError(f"could not load YOLOv8 {path_or_id}: no such file {weights}")
    resolved = resolve_device(device)
    try:
        model = YOLO(str(weights), task="detect")
        model.to(resolved)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"could not load YOLOv8 from {path_or_id}: {type(exc).__name__}: {exc}") from exc
    marker = read_marker(folder) if read_marker(folder).get("kind") == "yolo" else {}
    return LoadedModel(
        model=model, processor=None, kind="yolo", model_id=str(path_or_id),
        revision=f"mtime-{int(weights.stat().st_mtime)}", device=resolved,
        dtype=resolve_dtype(dtype, resolved),
        attention="-", random_weights=bool(marker.get("random_weights")),
        load_seconds=time.perf_counter() - started, marker=marker, source_format="yolo",
    )


class YoloEngine:
    """Same interface as Florence2Engine: run_batch(requests) -> outcomes, one predict per batch."""

    kind = "yolo"

    def __init__(self, loaded, confidence: float = DEFAULT_CONFIDENCE):
        self.loaded = loaded
        self.confidence = confidence
        self.generate_calls = 0

    tasks = [Task.DETECT]
    max_new_tokens_limit = 0
    max_text_tokens = 0

    def tokenizer_json(self) -> None:
        return None

    def run_batch(self, requests: list[InferenceRequest]) -> list[InferenceOutcome]:
        outcomes = [InferenceOutcome(r) for r in requests]
        runnable = []
        for outcome in outcomes:
            request = outcome.request
            if request.should_stop and request.should_stop():
                outcome.cancelled = True
            elif request.task is not Task.DETECT:
                outcome.error = JobError(Reason.TASK_NOT_SUPPORTED.value,
                                         f"task {request.task.name} needs a Florence-2 worker; YOLOv8 workers serve DETECT")
            else:
                runnable.append(outcome)
        if not runnable:
            return outcomes
        # One predict per set of detection options (ultralytics takes them per call); usually one set.
        groups: dict[tuple, list[InferenceOutcome]] = {}
        for outcome in runnable:
            groups.setdefault(self._options(outcome.request.detection), []).append(outcome)
        for (confidence, iou, max_detections), group in groups.items():
            self._predict(group, confidence, iou, max_detections)
        return outcomes

    def _options(self, detection: dict) -> tuple[float, float, int]:
        return (detection.get("confidence", self.confidence), detection.get("iou", DEFAULT_IOU),
                detection.get("max_detections") or DEFAULT_MAX_DETECTIONS)

    def _predict(self, runnable: list[InferenceOutcome], confidence: float, iou: float, max_detections: int) -> None:
        started = time.perf_counter()
        try:
            extra = {"half": True} if self.loaded.dtype_name == "fp16" else {}
            predictions = self.loaded.model.predict(
                [o.request.image for o in runnable], conf=confidence, iou=iou, max_det=max_detections, verbose=False,
                device=self.loaded.device, **extra,
            )
        except Exception:  # noqa: BLE001 - fail this batch's requests, keep the worker
            log.exception("YOLO predict failed")
            for outcome in runnable:
                outcome.error = JobError(Reason.INFERENCE_FAILED.value,
                                         "inference failed on the worker (its log has the details)")
            return
        self.generate_calls += 1
        elapsed_ms = (time.perf_counter() - started) * 1000
        names = self.loaded.model.names
        for outcome, prediction in zip(runnable, predictions, strict=True):
            post_started = time.perf_counter()
            width, height = outcome.request.image.size
            result = pb.Result(task=task_to_proto(Task.DETECT), image_width=width, image_height=height,
                               model_id=self.loaded.model_id, model_revision=self.loaded.revision,
                               batch_size=len(runnable))
            boxes = prediction.boxes
            for xyxy, score, cls in zip(boxes.xyxy.tolist(), boxes.conf.tolist(), boxes.cls.tolist(), strict=True):
                x1, y1, x2, y2 = [round(v, 2) for v in xyxy]
                result.boxes.append(pb.Box(x1=x1, y1=y1, x2=x2, y2=y2, label=str(names[int(cls)]),
                                           score=round(float(score), 4)))
            speed = getattr(prediction, "speed", {}) or {}
            result.timings.preprocess_ms = float(speed.get("preprocess", 0.0))
            result.timings.generate_ms = float(speed.get("inference", elapsed_ms))
            result.timings.postprocess_ms = (time.perf_counter() - post_started) * 1000 + float(
                speed.get("postprocess", 0.0))
            if outcome.request.should_stop and outcome.request.should_stop():
                outcome.cancelled = True
            else:
                outcome.result = result


def build_yolo(out_dir: str | Path, config: str = "yolov8n.yaml", seed: int = 0) -> Path:
    """A YOLOv8 checkpoint built from its config with random weights, offline.

    The class logits are biased upwards so that even random weights produce detections: tests see
    real boxes, labels and scores go through the service.
    """
    import torch
    from ultralytics import YOLO

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    from ultralytics.utils import ROOT, YAML

    torch.manual_seed(seed)
    model = YOLO(config, task="detect")
    model.model.names = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    head = model.model.model[-1]
    with torch.no_grad():
        for branch in head.cv3:
            branch[-1].bias.fill_(4.0)
    model.save(str(out / YOLO_FILE))
    write_marker(out, kind="yolo", config=config, seed=seed)
    return out
