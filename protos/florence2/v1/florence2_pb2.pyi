import datetime

from google.api import annotations_pb2 as _annotations_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TaskType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TASK_TYPE_UNSPECIFIED: _ClassVar[TaskType]
    TASK_TYPE_CAPTION: _ClassVar[TaskType]
    TASK_TYPE_DETAILED_CAPTION: _ClassVar[TaskType]
    TASK_TYPE_MORE_DETAILED_CAPTION: _ClassVar[TaskType]
    TASK_TYPE_OD: _ClassVar[TaskType]
    TASK_TYPE_DENSE_REGION_CAPTION: _ClassVar[TaskType]
    TASK_TYPE_REGION_PROPOSAL: _ClassVar[TaskType]
    TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING: _ClassVar[TaskType]
    TASK_TYPE_REFERRING_EXPRESSION_SEGMENTATION: _ClassVar[TaskType]
    TASK_TYPE_REGION_TO_SEGMENTATION: _ClassVar[TaskType]
    TASK_TYPE_OPEN_VOCABULARY_DETECTION: _ClassVar[TaskType]
    TASK_TYPE_REGION_TO_CATEGORY: _ClassVar[TaskType]
    TASK_TYPE_REGION_TO_DESCRIPTION: _ClassVar[TaskType]
    TASK_TYPE_REGION_TO_OCR: _ClassVar[TaskType]
    TASK_TYPE_OCR: _ClassVar[TaskType]
    TASK_TYPE_OCR_WITH_REGION: _ClassVar[TaskType]
    TASK_TYPE_DETECT: _ClassVar[TaskType]

class ModelKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    MODEL_KIND_UNSPECIFIED: _ClassVar[ModelKind]
    MODEL_KIND_FLORENCE2: _ClassVar[ModelKind]
    MODEL_KIND_YOLOV8: _ClassVar[ModelKind]
    MODEL_KIND_NOOP: _ClassVar[ModelKind]

class CheckpointFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CHECKPOINT_FORMAT_UNSPECIFIED: _ClassVar[CheckpointFormat]
    CHECKPOINT_FORMAT_NATIVE: _ClassVar[CheckpointFormat]
    CHECKPOINT_FORMAT_MICROSOFT: _ClassVar[CheckpointFormat]
    CHECKPOINT_FORMAT_REMOTE_CODE: _ClassVar[CheckpointFormat]
    CHECKPOINT_FORMAT_YOLO: _ClassVar[CheckpointFormat]
    CHECKPOINT_FORMAT_NONE: _ClassVar[CheckpointFormat]

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
    JOB_STATE_EXPIRED: _ClassVar[JobState]

class EventType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    EVENT_TYPE_UNSPECIFIED: _ClassVar[EventType]
    EVENT_TYPE_QUEUED: _ClassVar[EventType]
    EVENT_TYPE_STARTED: _ClassVar[EventType]
    EVENT_TYPE_RESULT: _ClassVar[EventType]
    EVENT_TYPE_DONE: _ClassVar[EventType]
    EVENT_TYPE_FAILED: _ClassVar[EventType]
    EVENT_TYPE_CANCELLED: _ClassVar[EventType]
    EVENT_TYPE_EXPIRED: _ClassVar[EventType]
TASK_TYPE_UNSPECIFIED: TaskType
TASK_TYPE_CAPTION: TaskType
TASK_TYPE_DETAILED_CAPTION: TaskType
TASK_TYPE_MORE_DETAILED_CAPTION: TaskType
TASK_TYPE_OD: TaskType
TASK_TYPE_DENSE_REGION_CAPTION: TaskType
TASK_TYPE_REGION_PROPOSAL: TaskType
TASK_TYPE_CAPTION_TO_PHRASE_GROUNDING: TaskType
TASK_TYPE_REFERRING_EXPRESSION_SEGMENTATION: TaskType
TASK_TYPE_REGION_TO_SEGMENTATION: TaskType
TASK_TYPE_OPEN_VOCABULARY_DETECTION: TaskType
TASK_TYPE_REGION_TO_CATEGORY: TaskType
TASK_TYPE_REGION_TO_DESCRIPTION: TaskType
TASK_TYPE_REGION_TO_OCR: TaskType
TASK_TYPE_OCR: TaskType
TASK_TYPE_OCR_WITH_REGION: TaskType
TASK_TYPE_DETECT: TaskType
MODEL_KIND_UNSPECIFIED: ModelKind
MODEL_KIND_FLORENCE2: ModelKind
MODEL_KIND_YOLOV8: ModelKind
MODEL_KIND_NOOP: ModelKind
CHECKPOINT_FORMAT_UNSPECIFIED: CheckpointFormat
CHECKPOINT_FORMAT_NATIVE: CheckpointFormat
CHECKPOINT_FORMAT_MICROSOFT: CheckpointFormat
CHECKPOINT_FORMAT_REMOTE_CODE: CheckpointFormat
CHECKPOINT_FORMAT_YOLO: CheckpointFormat
CHECKPOINT_FORMAT_NONE: CheckpointFormat
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
JOB_STATE_EXPIRED: JobState
EVENT_TYPE_UNSPECIFIED: EventType
EVENT_TYPE_QUEUED: EventType
EVENT_TYPE_STARTED: EventType
EVENT_TYPE_RESULT: EventType
EVENT_TYPE_DONE: EventType
EVENT_TYPE_FAILED: EventType
EVENT_TYPE_CANCELLED: EventType
EVENT_TYPE_EXPIRED: EventType

class Region(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ...) -> None: ...

class TaskRequest(_message.Message):
    __slots__ = ("task", "text", "region")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    task: TaskType
    text: str
    region: Region
    def __init__(self, task: _Optional[_Union[TaskType, str]] = ..., text: _Optional[str] = ..., region: _Optional[_Union[Region, _Mapping]] = ...) -> None: ...

class GenerationOptions(_message.Message):
    __slots__ = ("num_beams", "max_new_tokens", "min_new_tokens", "repetition_penalty")
    NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MIN_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    num_beams: int
    max_new_tokens: int
    min_new_tokens: int
    repetition_penalty: float
    def __init__(self, num_beams: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., min_new_tokens: _Optional[int] = ..., repetition_penalty: _Optional[float] = ...) -> None: ...

class DetectionOptions(_message.Message):
    __slots__ = ("confidence", "iou", "max_detections")
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    IOU_FIELD_NUMBER: _ClassVar[int]
    MAX_DETECTIONS_FIELD_NUMBER: _ClassVar[int]
    confidence: float
    iou: float
    max_detections: int
    def __init__(self, confidence: _Optional[float] = ..., iou: _Optional[float] = ..., max_detections: _Optional[int] = ...) -> None: ...

class JobSpec(_message.Message):
    __slots__ = ("model", "task", "image", "text", "region", "generation", "request_id", "priority", "timeout", "cancel_on_disconnect", "more_tasks", "detection")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    REGION_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_FIELD_NUMBER: _ClassVar[int]
    CANCEL_ON_DISCONNECT_FIELD_NUMBER: _ClassVar[int]
    MORE_TASKS_FIELD_NUMBER: _ClassVar[int]
    DETECTION_FIELD_NUMBER: _ClassVar[int]
    model: str
    task: TaskType
    image: bytes
    text: str
    region: Region
    generation: GenerationOptions
    request_id: str
    priority: int
    timeout: _duration_pb2.Duration
    cancel_on_disconnect: bool
    more_tasks: _containers.RepeatedCompositeFieldContainer[TaskRequest]
    detection: DetectionOptions
    def __init__(self, model: _Optional[str] = ..., task: _Optional[_Union[TaskType, str]] = ..., image: _Optional[bytes] = ..., text: _Optional[str] = ..., region: _Optional[_Union[Region, _Mapping]] = ..., generation: _Optional[_Union[GenerationOptions, _Mapping]] = ..., request_id: _Optional[str] = ..., priority: _Optional[int] = ..., timeout: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cancel_on_disconnect: _Optional[bool] = ..., more_tasks: _Optional[_Iterable[_Union[TaskRequest, _Mapping]]] = ..., detection: _Optional[_Union[DetectionOptions, _Mapping]] = ...) -> None: ...

class SubmitRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobSpec
    def __init__(self, job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class SubmitResponse(_message.Message):
    __slots__ = ("job_id", "created", "state", "more_job_ids")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    MORE_JOB_IDS_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    created: bool
    state: JobState
    more_job_ids: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, job_id: _Optional[str] = ..., created: _Optional[bool] = ..., state: _Optional[_Union[JobState, str]] = ..., more_job_ids: _Optional[_Iterable[str]] = ...) -> None: ...

class RunRequest(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: JobSpec
    def __init__(self, job: _Optional[_Union[JobSpec, _Mapping]] = ...) -> None: ...

class RunResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class WatchRequest(_message.Message):
    __slots__ = ("job_id", "after_event_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    AFTER_EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    after_event_id: str
    def __init__(self, job_id: _Optional[str] = ..., after_event_id: _Optional[str] = ...) -> None: ...

class WatchResponse(_message.Message):
    __slots__ = ("event",)
    EVENT_FIELD_NUMBER: _ClassVar[int]
    event: JobEvent
    def __init__(self, event: _Optional[_Union[JobEvent, _Mapping]] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("job_id", "request_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetJobResponse(_message.Message):
    __slots__ = ("job",)
    JOB_FIELD_NUMBER: _ClassVar[int]
    job: Job
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("job_id",)
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    def __init__(self, job_id: _Optional[str] = ...) -> None: ...

class CancelJobResponse(_message.Message):
    __slots__ = ("job_id", "state", "cancelled")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    state: JobState
    cancelled: bool
    def __init__(self, job_id: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., cancelled: _Optional[bool] = ...) -> None: ...

class ListModelsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListModelsResponse(_message.Message):
    __slots__ = ("models", "limits")
    MODELS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    models: _containers.RepeatedCompositeFieldContainer[ModelInfo]
    limits: ServiceLimits
    def __init__(self, models: _Optional[_Iterable[_Union[ModelInfo, _Mapping]]] = ..., limits: _Optional[_Union[ServiceLimits, _Mapping]] = ...) -> None: ...

class ServiceLimits(_message.Message):
    __slots__ = ("max_image_bytes", "max_image_pixels", "max_message_bytes", "max_request_id_length", "max_model_name_length", "max_num_beams", "max_priority")
    MAX_IMAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_IMAGE_PIXELS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUEST_ID_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_NAME_LENGTH_FIELD_NUMBER: _ClassVar[int]
    MAX_NUM_BEAMS_FIELD_NUMBER: _ClassVar[int]
    MAX_PRIORITY_FIELD_NUMBER: _ClassVar[int]
    max_image_bytes: int
    max_image_pixels: int
    max_message_bytes: int
    max_request_id_length: int
    max_model_name_length: int
    max_num_beams: int
    max_priority: int
    def __init__(self, max_image_bytes: _Optional[int] = ..., max_image_pixels: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_request_id_length: _Optional[int] = ..., max_model_name_length: _Optional[int] = ..., max_num_beams: _Optional[int] = ..., max_priority: _Optional[int] = ...) -> None: ...

class Box(_message.Message):
    __slots__ = ("x1", "y1", "x2", "y2", "label", "score")
    X1_FIELD_NUMBER: _ClassVar[int]
    Y1_FIELD_NUMBER: _ClassVar[int]
    X2_FIELD_NUMBER: _ClassVar[int]
    Y2_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    x1: float
    y1: float
    x2: float
    y2: float
    label: str
    score: float
    def __init__(self, x1: _Optional[float] = ..., y1: _Optional[float] = ..., x2: _Optional[float] = ..., y2: _Optional[float] = ..., label: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class Polygon(_message.Message):
    __slots__ = ("label", "rings")
    LABEL_FIELD_NUMBER: _ClassVar[int]
    RINGS_FIELD_NUMBER: _ClassVar[int]
    label: str
    rings: _containers.RepeatedCompositeFieldContainer[Ring]
    def __init__(self, label: _Optional[str] = ..., rings: _Optional[_Iterable[_Union[Ring, _Mapping]]] = ...) -> None: ...

class Ring(_message.Message):
    __slots__ = ("points",)
    POINTS_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, points: _Optional[_Iterable[float]] = ...) -> None: ...

class OcrQuad(_message.Message):
    __slots__ = ("points", "text")
    POINTS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    points: _containers.RepeatedScalarFieldContainer[float]
    text: str
    def __init__(self, points: _Optional[_Iterable[float]] = ..., text: _Optional[str] = ...) -> None: ...

class Timings(_message.Message):
    __slots__ = ("queue_ms", "preprocess_ms", "generate_ms", "postprocess_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    PREPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    GENERATE_MS_FIELD_NUMBER: _ClassVar[int]
    POSTPROCESS_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    preprocess_ms: float
    generate_ms: float
    postprocess_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., preprocess_ms: _Optional[float] = ..., generate_ms: _Optional[float] = ..., postprocess_ms: _Optional[float] = ...) -> None: ...

class Result(_message.Message):
    __slots__ = ("task", "text", "boxes", "polygons", "ocr", "raw_text", "image_width", "image_height", "model_id", "model_revision", "worker_id", "timings", "generated_tokens", "batch_size")
    TASK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    BOXES_FIELD_NUMBER: _ClassVar[int]
    POLYGONS_FIELD_NUMBER: _ClassVar[int]
    OCR_FIELD_NUMBER: _ClassVar[int]
    RAW_TEXT_FIELD_NUMBER: _ClassVar[int]
    IMAGE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    IMAGE_HEIGHT_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    TIMINGS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    task: TaskType
    text: str
    boxes: _containers.RepeatedCompositeFieldContainer[Box]
    polygons: _containers.RepeatedCompositeFieldContainer[Polygon]
    ocr: _containers.RepeatedCompositeFieldContainer[OcrQuad]
    raw_text: str
    image_width: int
    image_height: int
    model_id: str
    model_revision: str
    worker_id: str
    timings: Timings
    generated_tokens: int
    batch_size: int
    def __init__(self, task: _Optional[_Union[TaskType, str]] = ..., text: _Optional[str] = ..., boxes: _Optional[_Iterable[_Union[Box, _Mapping]]] = ..., polygons: _Optional[_Iterable[_Union[Polygon, _Mapping]]] = ..., ocr: _Optional[_Iterable[_Union[OcrQuad, _Mapping]]] = ..., raw_text: _Optional[str] = ..., image_width: _Optional[int] = ..., image_height: _Optional[int] = ..., model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., worker_id: _Optional[str] = ..., timings: _Optional[_Union[Timings, _Mapping]] = ..., generated_tokens: _Optional[int] = ..., batch_size: _Optional[int] = ...) -> None: ...

class JobError(_message.Message):
    __slots__ = ("reason", "message", "metadata")
    class MetadataEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: str
        def __init__(self, key: _Optional[str] = ..., value: _Optional[str] = ...) -> None: ...
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    reason: str
    message: str
    metadata: _containers.ScalarMap[str, str]
    def __init__(self, reason: _Optional[str] = ..., message: _Optional[str] = ..., metadata: _Optional[_Mapping[str, str]] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("event_id", "job_id", "type", "state", "result", "error", "time")
    EVENT_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    TYPE_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    event_id: str
    job_id: str
    type: EventType
    state: JobState
    result: Result
    error: JobError
    time: _timestamp_pb2.Timestamp
    def __init__(self, event_id: _Optional[str] = ..., job_id: _Optional[str] = ..., type: _Optional[_Union[EventType, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "request_id", "model", "task", "state", "result", "error", "created_time", "deadline", "worker_id")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TASK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    DEADLINE_FIELD_NUMBER: _ClassVar[int]
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    request_id: str
    model: str
    task: TaskType
    state: JobState
    result: Result
    error: JobError
    created_time: _timestamp_pb2.Timestamp
    deadline: _timestamp_pb2.Timestamp
    worker_id: str
    def __init__(self, job_id: _Optional[str] = ..., request_id: _Optional[str] = ..., model: _Optional[str] = ..., task: _Optional[_Union[TaskType, str]] = ..., state: _Optional[_Union[JobState, str]] = ..., result: _Optional[_Union[Result, _Mapping]] = ..., error: _Optional[_Union[JobError, _Mapping]] = ..., created_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deadline: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., worker_id: _Optional[str] = ...) -> None: ...

class WorkerInfo(_message.Message):
    __slots__ = ("worker_id", "host", "device", "dtype", "attention", "batch_size", "model_id", "model_revision", "random_weights", "jobs_done", "generate_calls", "state", "source_format", "converted", "engine", "engine_note")
    WORKER_ID_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    ATTENTION_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    MODEL_ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_REVISION_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    JOBS_DONE_FIELD_NUMBER: _ClassVar[int]
    GENERATE_CALLS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    CONVERTED_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    ENGINE_NOTE_FIELD_NUMBER: _ClassVar[int]
    worker_id: str
    host: str
    device: str
    dtype: str
    attention: str
    batch_size: int
    model_id: str
    model_revision: str
    random_weights: bool
    jobs_done: int
    generate_calls: int
    state: str
    source_format: CheckpointFormat
    converted: bool
    engine: str
    engine_note: str
    def __init__(self, worker_id: _Optional[str] = ..., host: _Optional[str] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., attention: _Optional[str] = ..., batch_size: _Optional[int] = ..., model_id: _Optional[str] = ..., model_revision: _Optional[str] = ..., random_weights: _Optional[bool] = ..., jobs_done: _Optional[int] = ..., generate_calls: _Optional[int] = ..., state: _Optional[str] = ..., source_format: _Optional[_Union[CheckpointFormat, str]] = ..., converted: _Optional[bool] = ..., engine: _Optional[str] = ..., engine_note: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "workers", "live_workers", "queue_depth", "random_weights", "kind", "tasks", "max_new_tokens", "max_text_tokens", "limits", "source_format")
    NAME_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LIVE_WORKERS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_DEPTH_FIELD_NUMBER: _ClassVar[int]
    RANDOM_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FORMAT_FIELD_NUMBER: _ClassVar[int]
    name: str
    workers: _containers.RepeatedCompositeFieldContainer[WorkerInfo]
    live_workers: int
    queue_depth: int
    random_weights: bool
    kind: ModelKind
    tasks: _containers.RepeatedScalarFieldContainer[TaskType]
    max_new_tokens: int
    max_text_tokens: int
    limits: ServiceLimits
    source_format: CheckpointFormat
    def __init__(self, name: _Optional[str] = ..., workers: _Optional[_Iterable[_Union[WorkerInfo, _Mapping]]] = ..., live_workers: _Optional[int] = ..., queue_depth: _Optional[int] = ..., random_weights: _Optional[bool] = ..., kind: _Optional[_Union[ModelKind, str]] = ..., tasks: _Optional[_Iterable[_Union[TaskType, str]]] = ..., max_new_tokens: _Optional[int] = ..., max_text_tokens: _Optional[int] = ..., limits: _Optional[_Union[ServiceLimits, _Mapping]] = ..., source_format: _Optional[_Union[CheckpointFormat, str]] = ...) -> None: ...
