"""Convert a Microsoft-format Florence-2 checkpoint into transformers' native layout, without its code.

Microsoft's checkpoints (microsoft/Florence-2-* and the fine-tunes trained from them: `auto_map` in
config.json, `modeling_florence2.py` beside the weights) run only on transformers < 4.50. Their content
maps one to one onto transformers' own `Florence2ForConditionalGeneration`:

- config: `vision_config` (model_type davit) becomes `Florence2VisionConfig` (dim_embed -> embed_dim,
  image_pos_embed / visual_temporal_embedding sizes), `text_config` becomes a `BartConfig`;
- weights: DaViT's `PreNorm(norm, fn)` wrappers flatten (`window_attn.norm` -> `norm1`, `ffn.norm` ->
  `norm2`, `conv1.fn.dw` -> `conv1`, `ffn.fn.net.fc1` -> `ffn.fc1`, `convs.N.proj` -> `convs.N.conv`), the
  projector moves under `model.multi_modal_projector` (the bare `image_projection` matrix is transposed into
  a Linear), and the BART language model moves from `language_model.model` to `model.language_model`;
- generation defaults: Microsoft's generate runs its language model's, i.e. the generation fields of
  `text_config` (beams, no_repeat_ngram_size, forced BOS/EOS), which become generation_config.json;
- processor: the native processor puts image placeholder tokens in front of the text where Microsoft's
  model concatenated the features. The placeholder is the tokenizer's existing `<mask>` token (BART's,
  unused by Florence-2): adding a new token, as transformers' own conversion script does, adds a row to
  the vocabulary, and with it a term in every softmax, so beam scores would no longer be the original's.

Weights are read with safetensors, or with `torch.load(weights_only=True)` for pytorch_model.bin, which
refuses to unpickle anything but tensors. Every source tensor is either mapped or named as unused
(DaViT's classification `norms`/`head`, which Florence-2 never calls, and BART's all-zero
`final_logits_bias`); an unknown key, a missing key or a shape that does not fit is an error naming it.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from .task_tokens import TokenLayoutError, complete_tokenizer

log = logging.getLogger(__name__)

FORMAT_NATIVE = "native"
FORMAT_MICROSOFT = "microsoft"
FORMAT_REMOTE = "remote"  # remote code that is not Microsoft's Florence-2 layout: runs on the legacy line only
# What a conversion writes; a cached conversion made by another version is made again. 2: Florence-2's
# tokens added as Microsoft's processor adds them, PIL preprocessing.
CONVERSION_VERSION = 2
# Written into every converted checkpoint: what made it and how its images are preprocessed.
CONVERSION_RECORD = "florence2_conversion.json"

SUPPORTED_FEATURE_SOURCE = ["spatial_avg_pool", "temporal_avg_pool"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt",
                   "special_tokens_map.json", "added_tokens.json")

_BLOCK = r"vision_tower\.blocks\.(\d+)\.(\d+)\.(spatial_block|channel_block)"
_NATIVE_BLOCK = r"model.vision_tower.blocks.\1.\2.\3"
KEY_RULES: list[tuple[re.Pattern, str]] = [(re.compile(pattern + "$"), target) for pattern, target in (
    (r"vision_tower\.convs\.(\d+)\.proj\.(weight|bias)", r"model.vision_tower.convs.\1.conv.\2"),
    (r"vision_tower\.convs\.(\d+)\.norm\.(weight|bias)", r"model.vision_tower.convs.\1.norm.\2"),
    (_BLOCK + r"\.(conv1|conv2)\.fn\.dw\.(weight|bias)", _NATIVE_BLOCK + r".\4.\5"),
    (_BLOCK + r"\.(?:window_attn|channel_attn)\.norm\.(weight|bias)", _NATIVE_BLOCK + r".norm1.\4"),
    (_BLOCK + r"\.(window_attn|channel_attn)\.fn\.(qkv|proj)\.(weight|bias)", _NATIVE_BLOCK + r".\4.\5.\6"),
    (_BLOCK + r"\.ffn\.norm\.(weight|bias)", _NATIVE_BLOCK + r".norm2.\4"),
    (_BLOCK + r"\.ffn\.fn\.net\.(fc1|fc2)\.(weight|bias)", _NATIVE_BLOCK + r".ffn.\4.\5"),
    (r"image_projection", "model.multi_modal_projector.image_projection.weight"),
    (r"image_proj_norm\.(weight|bias)", r"model.multi_modal_projector.image_proj_norm.\1"),
    (r"image_pos_embed\.(row|column)_embeddings\.weight",
     r"model.multi_modal_projector.image_position_embed.\1_embeddings.weight"),
    (r"visual_temporal_embed\.pos_idx_to_embed", "model.multi_modal_projector.visual_temporal_embed.pos_idx_to_embed"),
    (r"language_model\.model\.(.+)", r"model.language_model.\1"),
    (r"language_model\.lm_head\.weight", "lm_head.weight"),
)]
# In the checkpoint, never read by Florence-2's forward: DaViT's ImageNet classifier and its norm.
UNUSED_KEYS = re.compile(r"vision_tower\.(norms|head)\.(weight|bias)$")
FINAL_LOGITS_BIAS = "language_model.final_logits_bias"
SHARED = "model.language_model.shared.weight"
TIED_TO_SHARED = ("model.language_model.encoder.embed_tokens.weight", "model.language_model.decoder.embed_tokens.weight")
ADAPTER_KEY = re.compile(r"(lora_[AB]|lora_embedding_[AB]|base_layer|lora_magnitude_vector)\b")


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the file, field or tensors and why."""


@dataclass
class ConversionReport:
    source: str
    destination: str
    tensors: int
    unused: list[str] = field(default_factory=list)
    tied_lm_head: bool = True
    image_token: str = ""
    seconds: float = 0.0
    # Florence-2's tokens: the id of the first (<od>) and how many the source tokenizer lacked.
    task_token_first_id: int = 0
    task_tokens_added: int = 0
    # The image processor backend that gives the reference's pixels (transformers' `backend=`).
    image_backend: str = "pil"
    version: int = CONVERSION_VERSION

    def to_dict(self) -> dict:
        return {"source": self.source, "destination": self.destination, "tensors": self.tensors,
                "unused": self.unused, "tied_lm_head": self.tied_lm_head, "image_token": self.image_token,
                "task_token_first_id": self.task_token_first_id, "task_tokens_added": self.task_tokens_added,
                "image_backend": self.image_backend, "version": self.version, "seconds": round(self.seconds, 3)}


def checkpoint_format(config: dict) -> str:
    """native (model_type florence2, no remote code), microsoft (Microsoft's remote-code layout) or remote."""
    if "auto_map" not in config:
        return FORMAT_NATIVE
    vision = config.get("vision_config") or {}
    if config.get("model_type") == "florence2" and vision.get("model_type") == "davit":
        return FORMAT_MICROSOFT
    return FORMAT_REMOTE


def native_key(key: str) -> str | None:
    """The native name of a Microsoft checkpoint key; None for a key Florence-2 never uses."""
    if UNUSED_KEYS.match(key) or key == FINAL_LOGITS_BIAS:
        return None
    for pattern, target in KEY_RULES:
        if pattern.match(key):
            return pattern.sub(target, key)
    raise ConversionError(f"unknown tensor {key}")


# -- config ------------------------------------------------------------------------------------------

def _vision_config(vision: dict):
    from transformers import Florence2VisionConfig

    def required(name):
        if name not in vision:
            raise ConversionError(f"config.json: vision_config has no {name}")
        return vision[name]

    checks = (("image_feature_source", vision.get("image_feature_source", SUPPORTED_FEATURE_SOURCE),
               SUPPORTED_FEATURE_SOURCE),
              ("image_pos_embed.type", (vision.get("image_pos_embed") or {}).get("type"), "learned_abs_2d"),
              ("visual_temporal_embedding.type", (vision.get("visual_temporal_embedding") or {}).get("type"), "COSINE"))
    for name, value, supported in checks:
        if value != supported:
            raise ConversionError(f"config.json: vision_config.{name} is {value!r}; native Florence-2 supports "
                                  f"only {supported!r}")
    return Florence2VisionConfig(
        depths=list(required("depths")), patch_size=list(required("patch_size")),
        patch_stride=list(required("patch_stride")), patch_padding=list(required("patch_padding")),
        patch_prenorm=list(required("patch_prenorm")), embed_dim=list(required("dim_embed")),
        num_heads=list(required("num_heads")), num_groups=list(required("num_groups")),
        window_size=required("window_size"), drop_path_rate=vision.get("drop_path_rate", 0.1),
        projection_dim=required("projection_dim"), mlp_ratio=4.0, qkv_bias=True, activation_function="gelu",
        max_temporal_embeddings=vision["visual_temporal_embedding"].get("max_temporal_embeddings", 100),
        max_position_embeddings=vision["image_pos_embed"].get("max_pos_embeddings", 50),
    )


def _split_text_config(text: dict) -> tuple[dict, dict]:
    """(BartConfig fields, generation fields that differ from transformers' defaults)."""
    from transformers import BartConfig, GenerationConfig

    bart_fields = set(BartConfig().to_dict())
    generation_defaults = GenerationConfig().to_dict()
    model = {k: v for k, v in text.items() if k in bart_fields and k not in ("model_type", "architectures",
                                                                              "_name_or_path", "transformers_version")}
    generation = {k: v for k, v in text.items()
                  if k in generation_defaults and v is not None and v != generation_defaults[k]
                  and k not in ("transformers_version", "_from_model_config")}
    for token in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if text.get(token) is not None:
            generation[token] = text[token]
    return model, generation


def convert_config(source: dict, image_token_id: int):
    """(Florence2Config, GenerationConfig) for a Microsoft config.json."""
    from transformers import BartConfig, Florence2Config, GenerationConfig

    if checkpoint_format(source) != FORMAT_MICROSOFT:
        raise ConversionError("config.json is not Microsoft's Florence-2 layout (auto_map with a davit vision_config)")
    if "text_config" not in source:
        raise ConversionError("config.json has no text_config")
    text_fields, generation_fields = _split_text_config(source["text_config"])
    text = BartConfig(**text_fields)
    config = Florence2Config(
        vision_config=_vision_config(source["vision_config"]), text_config=text, image_token_id=image_token_id,
        **{k: source[k] for k in ("bos_token_id", "pad_token_id", "eos_token_id") if source.get(k) is not None},
    )
    return config, GenerationConfig(**generation_fields)


# -- weights -----------------------------------------------------------------------------------------

def weight_files(directory: Path) -> list[Path]:
    """The checkpoint's weight files: safetensors first (single or sharded), else pytorch_model*.bin."""
    for pattern in ("model*.safetensors", "pytorch_model*.bin"):
        files = sorted(directory.glob(pattern))
        if files:
            return files
    raise ConversionError(f"{directory}: no model.safetensors or pytorch_model.bin")


def read_state_dict(directory: Path) -> dict:
    import pickle

    import torch
    from safetensors.torch import load_file

    state: dict = {}
    for path in weight_files(directory):
        if path.suffix == ".safetensors":
            part = load_file(path)
        else:
            try:
                part = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except pickle.UnpicklingError as exc:
                raise ConversionError(f"{path.name}: holds objects other than tensors; refusing to unpickle it "
                                      f"({str(exc).splitlines()[0][:200]})") from None
        state.update(part)
    return state


def convert_state_dict(source: dict, config) -> tuple[dict, list[str]]:
    """(native state dict, unused source keys); ConversionError names unknown, missing or misfit tensors."""
    import torch

    adapters = sorted(k for k in source if ADAPTER_KEY.search(k))
    if adapters:
        raise ConversionError(f"the checkpoint holds {len(adapters)} unmerged adapter tensors ({', '.join(adapters[:3])}, "
                              "...); merge the LoRA adapters into the weights first (peft: merge_and_unload())")
    converted, unused, unknown = {}, [], []
    for key, tensor in source.items():
        try:
            target = native_key(key)
        except ConversionError:
            unknown.append(key)
            continue
        if target is None:
            unused.append(key)
        else:
            converted[target] = tensor.t().contiguous() if key == "image_projection" else tensor
    bias = source.get(FINAL_LOGITS_BIAS)
    if bias is not None and bool(torch.any(bias != 0)):
        raise ConversionError(f"{FINAL_LOGITS_BIAS} is not zero; native Florence-2's lm_head has no bias")
    expected = _expected_shapes(config)
    unknown += sorted(k for k in converted if k not in expected)
    if unknown:
        raise ConversionError(f"{len(unknown)} tensors have no place in native Florence-2: {_listing(unknown)}")
    shared = converted.get(SHARED)
    for tied in TIED_TO_SHARED:
        copy = converted.pop(tied, None)
        if copy is not None and shared is not None and not torch.equal(copy, shared):
            raise ConversionError(f"{tied} differs from the shared embeddings; native Florence-2 ties them")
    lm_head = converted.get("lm_head.weight")
    if lm_head is not None and shared is not None and torch.equal(lm_head, shared):
        del converted["lm_head.weight"]
    required = {k for k in expected if k not in TIED_TO_SHARED and k != "lm_head.weight"}
    missing = sorted(required - set(converted))
    if missing:
        raise ConversionError(f"{len(missing)} tensors are missing from the checkpoint: {_listing(missing)}")
    misfits = [f"{k} {tuple(v.shape)} (expected {expected[k]})" for k, v in converted.items()
               if tuple(v.shape) != expected[k]]
    if misfits:
        raise ConversionError(f"tensor shapes do not fit the config: {_listing(misfits)}")
    return converted, sorted(unused)


def _expected_shapes(config) -> dict[str, tuple]:
    import torch
    from transformers import Florence2ForConditionalGeneration

    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    return shapes


def _listing(keys: list[str], limit: int = 8) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


# -- processor ---------------------------------------------------------------------------------------

def _processor(directory: Path, config_json: dict):
    from transformers import AutoTokenizer, CLIPImageProcessorPil, Florence2Processor

    preprocessor_path = directory / "preprocessor_config.json"
    if not preprocessor_path.is_file():
        raise ConversionError(f"{directory}: no preprocessor_config.json")
    preprocessor = json.loads(preprocessor_path.read_text())
    for key in ("auto_map", "processor_class", "image_processor_type", "_processor_class"):
        preprocessor.pop(key, None)
    # Microsoft's processor resizes with PIL (transformers < 4.50); the PIL backend gives the same pixels.
    image_processor = CLIPImageProcessorPil(**preprocessor)
    size = preprocessor.get("size") or {}
    height, width = size.get("height"), size.get("width")
    if not height or height != width:
        raise ConversionError(f"preprocessor_config.json: size {size} is not a square of known side")
    stride = 1
    for step in config_json["vision_config"]["patch_stride"]:
        stride *= step
    image_processor.image_seq_length = (height // stride) ** 2 + 1  # the spatial grid plus the pooled token
    with _quiet_transformers():  # AutoTokenizer reads config.json and warns that it is not a tokenizer's
        # BART's mask token is "<mask>": one load declares it the image placeholder; a tokenizer whose mask
        # token is another string is loaded again with that one.
        tokenizer = AutoTokenizer.from_pretrained(directory, extra_special_tokens={"image_token": "<mask>"})
        placeholder = tokenizer.mask_token
        if not placeholder:
            raise ConversionError("the tokenizer has no <mask> token to stand for the image features")
        if placeholder != "<mask>":
            tokenizer = AutoTokenizer.from_pretrained(directory, extra_special_tokens={"image_token": placeholder})
    vocab_size = (config_json.get("text_config") or {}).get("vocab_size") or config_json.get("vocab_size")
    if not vocab_size:
        raise ConversionError("config.json: text_config has no vocab_size")
    try:
        layout = complete_tokenizer(tokenizer, int(vocab_size))
    except TokenLayoutError as exc:
        raise ConversionError(f"tokenizer: {exc}") from None
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer), tokenizer, layout


@contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(previous)


# -- the whole checkpoint ----------------------------------------------------------------------------

def convert_checkpoint(source_dir: str | Path, destination: str | Path) -> ConversionReport:
    """Write the native checkpoint of a local Microsoft-format directory into `destination` (created)."""
    import torch
    from transformers import Florence2ForConditionalGeneration

    started = time.perf_counter()
    source_dir, destination = Path(source_dir), Path(destination)
    config_path = source_dir / "config.json"
    if not config_path.is_file():
        raise ConversionError(f"{source_dir}: no config.json")
    config_json = json.loads(config_path.read_text())
    found = checkpoint_format(config_json)
    if found != FORMAT_MICROSOFT:
        raise ConversionError(f"{source_dir} is a {found} checkpoint, not Microsoft's Florence-2 format"
                              + ("; it needs no conversion" if found == FORMAT_NATIVE else ""))
    processor, tokenizer, layout = _processor(source_dir, config_json)
    config, generation = convert_config(config_json, tokenizer.image_token_id)
    state, unused = convert_state_dict(read_state_dict(source_dir), config)
    tied = "lm_head.weight" not in state
    config.tie_word_embeddings = tied
    config.text_config.tie_word_embeddings = tied
    if not tied:  # untied, transformers gives the encoder and decoder embeddings tensors of their own
        state.update({key: state[SHARED] for key in TIED_TO_SHARED})
    dtype = next(iter(state.values())).dtype
    config.dtype = dtype
    with torch.device("meta"):
        model = Florence2ForConditionalGeneration(config)
    outcome = model.load_state_dict(state, strict=False, assign=True)
    allowed_missing = set(TIED_TO_SHARED) | {"lm_head.weight"} if tied else set()
    left = sorted(set(outcome.missing_keys) - allowed_missing)
    if left or outcome.unexpected_keys:
        raise ConversionError(f"native model did not take the weights: missing {_listing(left)}, "
                              f"unexpected {_listing(list(outcome.unexpected_keys))}")
    model.tie_weights()
    meta = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
    if meta:
        raise ConversionError(f"tensors left without a value: {_listing(meta)}")
    model.generation_config = generation
    destination.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(destination)
    processor.save_pretrained(destination)
    marker = source_dir / "florence2_serve.json"
    if marker.is_file():
        shutil.copy(marker, destination / marker.name)
    report = ConversionReport(source=str(source_dir), destination=str(destination), tensors=len(state),
                              unused=unused, tied_lm_head=tied, image_token=tokenizer.image_token,
                              task_token_first_id=layout.first_id, task_tokens_added=layout.added,
                              seconds=time.perf_counter() - started)
    (destination / CONVERSION_RECORD).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if unused:
        log.info("conversion of %s: not carried over (Florence-2 never reads them): %s", source_dir, ", ".join(unused))
    return report
