"""Load a Florence-2 checkpoint (native or remote code) with an explicit attention implementation.

Native: transformers' own `Florence2ForConditionalGeneration` (transformers >= 4.56, no remote code,
`florence-community/Florence-2-*` layout). Microsoft format: `microsoft/Florence-2-*` and fine-tunes
(`auto_map` in config.json); on transformers >= 4.56 they are converted to native once (conversion.py,
cached by digest: conversion_cache.py) and served natively. Remote code (`--kind remote`, or any
remote-code checkpoint that is not Microsoft's layout): loaded with `trust_remote_code` and the
flash_attn shim; that code runs on transformers < 4.50 only, which the `legacy` extra installs. A
checkpoint that cannot be loaded is a ModelLoadError naming it and the cause, never a silent fallback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import flash_attn_shim
from .conversion import CONVERSION_RECORD, FORMAT_MICROSOFT, FORMAT_NATIVE, ConversionError, checkpoint_format
from .model_builder import read_marker
from .model_source import ModelSource, SourceError, hub_offline_env, resolve_source

log = logging.getLogger(__name__)

KINDS = ("auto", "native", "remote", "yolo", "noop")
ATTENTIONS = ("eager", "sdpa")
DTYPES = ("auto", "fp16", "bf16", "fp32")
# How images become pixels: transformers' backends. auto: what the checkpoint records (PIL for converted
# Microsoft-format checkpoints, as their reference computes them), else transformers' default.
IMAGE_BACKENDS = ("auto", "pil", "torchvision")
NATIVE_MIN_TRANSFORMERS = (4, 56)
REMOTE_MAX_TRANSFORMERS = (4, 50)  # exclusive


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; the message names it, the cause and the fix."""


@dataclass(frozen=True)
class LoadOptions:
    device: str = "auto"
    dtype: str = "auto"
    attention: str = "eager"
    kind: str = "auto"
    revision: str | None = None
    # Where converted Microsoft-format checkpoints are kept (None: ~/.cache/florence2-serve/converted).
    convert_cache: str | None = None
    image_backend: str = "auto"

    def __post_init__(self):
        if self.attention not in ATTENTIONS:
            raise ValueError(f"attention must be one of {ATTENTIONS}, got {self.attention!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {DTYPES}, got {self.dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.image_backend not in IMAGE_BACKENDS:
            raise ValueError(f"image backend must be one of {IMAGE_BACKENDS}, got {self.image_backend!r}")


@dataclass
class LoadedModel:
    model: Any
    processor: Any
    kind: str
    model_id: str
    revision: str
    device: Any  # torch.device
    dtype: Any  # torch.dtype
    attention: str
    random_weights: bool
    load_seconds: float
    marker: dict = field(default_factory=dict)
    # The checkpoint as given: native, microsoft (Microsoft's remote-code layout) or remote; yolo, noop.
    source_format: str = "native"
    # Served from a native copy made on load (the Microsoft-format checkpoint was converted).
    converted: bool = False

    @property
    def dtype_name(self) -> str:
        if self.dtype is None:  # no tensors (the no-op backend)
            return "-"
        return {"torch.float16": "fp16", "torch.bfloat16": "bf16", "torch.float32": "fp32"}.get(
            str(self.dtype), str(self.dtype)
        )


def transformers_version() -> tuple[int, int]:
    from importlib.metadata import version

    parts = version("transformers").split(".")
    return int(parts[0]), int(parts[1])


def can_run(kind: str) -> tuple[bool, str]:
    """Can this environment run checkpoints of `kind`? (ok, what to do if not)."""
    current = transformers_version()
    shown = ".".join(map(str, current))
    if kind == "native" and current < NATIVE_MIN_TRANSFORMERS:
        return False, (
            f"native Florence-2 needs transformers >= 4.56 (this environment has {shown}); "
            "install the default worker extra: pip install 'florence2-serve[worker]'"
        )
    if kind == "remote" and current >= REMOTE_MAX_TRANSFORMERS:
        return False, (
            f"running remote code (--kind remote) needs transformers < 4.50 (this environment has {shown}); "
            "Microsoft-format checkpoints (microsoft/Florence-2-* and fine-tunes) need no such thing: with "
            "--kind auto they are converted to native on load. For their own code, install the legacy extra "
            "in its own environment: pip install 'florence2-serve[legacy]'"
        )
    return True, ""


def _read_config(source: ModelSource, revision: str | None) -> dict:
    path_or_id = source.path_or_id
    if source.local:
        config_path = Path(path_or_id) / "config.json"
        if not config_path.is_file():
            raise ModelLoadError(f"could not load {path_or_id}: no config.json in that directory")
    else:
        try:
            from transformers.utils import cached_file

            config_path = Path(cached_file(path_or_id, "config.json", revision=revision,
                                           local_files_only=source.offline))
        except Exception as exc:  # noqa: BLE001 - hub/offline/permission errors all end here
            if source.offline:
                raise ModelLoadError(
                    f"could not load {path_or_id}: the Hugging Face hub is unreachable (offline) and the model "
                    "is not in the local cache; download it where there is network, or pass a local "
                    "directory") from None
            raise ModelLoadError(
                f"could not load {path_or_id}: not a local directory and not fetchable from the hub "
                f"({type(exc).__name__}: {exc})"
            ) from exc
    try:
        return json.loads(config_path.read_text())
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"could not load {path_or_id}: unreadable config.json ({exc})") from exc


def detect_kind(config: dict) -> str:
    if "auto_map" in config:
        return "remote"
    if config.get("model_type") == "florence2":
        return "native"
    raise ModelLoadError(
        f"config.json has model_type {config.get('model_type')!r} and no auto_map: not a Florence-2 checkpoint"
    )


def resolve_device(device: str):
    import torch

    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = torch.device(device)
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but CUDA is not available")
    return resolved


def resolve_dtype(dtype: str, device):
    import torch

    if dtype == "auto":
        # fp16 on CPU is several times slower than fp32 there.
        return torch.float16 if device.type == "cuda" else torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]


def _revision_of(path_or_id: str, revision: str | None, config: dict) -> str:
    if revision:
        return revision
    if Path(path_or_id).exists():
        digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
        return f"local-{digest[:12]}"
    return "main"


def load_model(path_or_id: str, options: LoadOptions = LoadOptions()) -> LoadedModel:
    """Load once per process; raises ModelLoadError with the checkpoint and the cause."""
    flash_attn_shim.install()
    from .yolo import is_yolo_path, load_yolo

    if options.kind == "noop":
        from .noop import load_noop

        return load_noop()
    if options.kind == "yolo" or (options.kind == "auto" and is_yolo_path(path_or_id)):
        return load_yolo(path_or_id, options.device, options.dtype)
    started = time.perf_counter()
    try:
        source = resolve_source(path_or_id, offline_env=hub_offline_env())
    except SourceError as exc:
        raise ModelLoadError(str(exc)) from None
    config = _read_config(source, options.revision)
    source_format = checkpoint_format(config)
    kind = options.kind
    load_from, local_only, converted = path_or_id, source.offline, False
    if _converts_on_load(source_format, kind):
        kind, converted = "native", True
        load_from, local_only = str(_native_copy(source, options)), True
    elif kind == "auto":
        kind = detect_kind(config)
    ok, advice = can_run(kind)
    if not ok:
        raise ModelLoadError(f"cannot load {path_or_id}: {advice}")
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    try:
        model, processor = _load(kind, load_from, options, dtype, local_files_only=local_only)
        model.to(device).eval()
    except ModelLoadError:
        raise
    except Exception as exc:  # noqa: BLE001 - report any loader failure with its cause
        raise ModelLoadError(
            f"could not load {kind} Florence-2 from {path_or_id}: {type(exc).__name__}: {exc}"
        ) from exc
    marker = read_marker(path_or_id) if Path(path_or_id).exists() else {}
    loaded = LoadedModel(
        model=model, processor=processor, kind=kind, model_id=str(path_or_id),
        revision=_revision_of(path_or_id, options.revision, config), device=device, dtype=dtype,
        attention=options.attention, random_weights=bool(marker.get("random_weights")),
        load_seconds=time.perf_counter() - started, marker=marker, source_format=source_format,
        converted=converted,
    )
    if loaded.random_weights:
        log.warning("model %s has RANDOM weights (built offline for tests/benchmarks)", path_or_id)
    log.info(
        "loaded %s Florence-2 %s%s on %s (%s, attention=%s, flash_attn=%s) in %.2fs",
        kind, path_or_id, " (converted from Microsoft's format)" if converted else "", device, loaded.dtype_name, options.attention,
        flash_attn_shim.status().in_use if flash_attn_shim.status() else "?", loaded.load_seconds,
    )
    return loaded


def inspect_checkpoint(path_or_id: str, options: LoadOptions = LoadOptions()) -> dict:
    """What `load_model` would do with a checkpoint, without loading it: {"format", "plan"}."""
    from .yolo import is_yolo_path

    if options.kind == "noop":
        return {"format": "noop", "plan": "no model (the no-op engine)"}
    if options.kind == "yolo" or (options.kind == "auto" and is_yolo_path(path_or_id)):
        return {"format": "yolo", "plan": "YOLOv8 through ultralytics"}
    try:
        source = resolve_source(path_or_id, offline_env=hub_offline_env())
    except SourceError as exc:
        raise ModelLoadError(str(exc)) from None
    found = checkpoint_format(_read_config(source, options.revision))
    if _converts_on_load(found, options.kind):
        from .conversion_cache import cache_root, cached_conversion

        cached = cached_conversion(Path(source.path_or_id), cache_root(options.convert_cache)) if source.local else None
        plan = ("converted to native on load: already done, cached at " + str(cached) if cached else
                "will be converted to native on load (once; cached by digest under "
                f"{cache_root(options.convert_cache)})")
    elif found == FORMAT_NATIVE:
        plan = "served natively"
    else:
        kind = "remote" if options.kind == "auto" else options.kind
        ok, advice = can_run(kind)
        plan = f"run by its own code (--kind {kind})" + ("" if ok else f"; cannot here: {advice}")
    return {"format": found, "plan": plan}


def _converts_on_load(source_format: str, kind: str) -> bool:
    """Whether load_model serves a checkpoint of this format, asked for as `kind`, from a native conversion."""
    return source_format == FORMAT_MICROSOFT and kind in ("auto", "native") and can_run("native")[0]


def _native_copy(source: ModelSource, options: LoadOptions) -> Path:
    """The converted native copy of a Microsoft-format checkpoint (converting it now if needed)."""
    from .conversion_cache import cache_root, checkpoint_dir, ensure_converted

    try:
        cached = ensure_converted(checkpoint_dir(source, options.revision), cache_root(options.convert_cache))
    except (ConversionError, OSError) as exc:
        raise ModelLoadError(f"cannot convert Microsoft-format checkpoint {source.path_or_id}: {exc}") from exc
    if cached.converted_now:
        log.info("converted Microsoft-format checkpoint %s to native Florence-2 in %.1fs (cached at %s)",
                 source.path_or_id, cached.seconds, cached.path)
    else:
        log.info("Microsoft-format checkpoint %s: using its native conversion cached at %s",
                 source.path_or_id, cached.path)
    return cached.path


def image_backend(path_or_id: str, requested: str) -> str | None:
    """The image processor backend to load a native checkpoint with (None: transformers' default)."""
    if requested != "auto":
        return requested
    record = Path(path_or_id) / CONVERSION_RECORD
    try:
        return json.loads(record.read_text()).get("image_backend")
    except (OSError, ValueError):
        return None


def _load(kind: str, path_or_id: str, options: LoadOptions, dtype, local_files_only: bool = False):
    import transformers

    files = {"revision": options.revision, "local_files_only": local_files_only}
    common = {**files, "attn_implementation": options.attention}
    if kind == "native":
        model = transformers.Florence2ForConditionalGeneration.from_pretrained(path_or_id, dtype=dtype, **common)
        backend = image_backend(path_or_id, options.image_backend)
        processor = transformers.AutoProcessor.from_pretrained(
            path_or_id, **files, **({"backend": backend} if backend else {}))
    else:
        model, info = transformers.AutoModelForCausalLM.from_pretrained(
            path_or_id, trust_remote_code=True, torch_dtype=dtype, output_loading_info=True, **common
        )
        _refuse_new_weights(model, info, path_or_id)
        processor = transformers.AutoProcessor.from_pretrained(path_or_id, trust_remote_code=True, **files)
    return model, processor


def _refuse_new_weights(model, info: dict, path_or_id: str) -> None:
    """A remote-code load that left tensors at their initial (random) values is an error naming them;
    a missing tensor that shares its storage with a loaded one (tied embeddings) is not."""
    missing = set(info.get("missing_keys") or ())
    if not missing:
        return
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    loaded = {tensor.data_ptr() for name, tensor in tensors.items() if name not in missing}
    fresh = sorted(name for name in missing if name not in tensors or tensors[name].data_ptr() not in loaded)
    if fresh:
        shown = ", ".join(fresh[:8]) + (f" and {len(fresh) - 8} more" if len(fresh) > 8 else "")
        raise ModelLoadError(
            f"could not load remote Florence-2 from {path_or_id}: {len(fresh)} tensors are not in the checkpoint "
            f"and would be random ({shown}); save the checkpoint with these weights (a tied lm_head that the "
            "model's code does not tie on load needs tie_word_embeddings, or the tensor saved)")
