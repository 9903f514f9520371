"""Build Florence-2 checkpoints offline (no hub): tiny for tests, full-size for timing.

Weights are random. Every checkpoint written here carries `florence2_serve.json` with
`"random_weights": true`, which the loader reports, so random weights are never used silently.
The tokenizer is a small byte-level BPE trained here, plus the tokens Florence-2 relies on
(`<loc_0>`..`<loc_999>`, the task/markup tokens, `<image>`), padded with filler tokens up to the
model's vocabulary size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

from .task_tokens import FLORENCE_TOKENS

MARKER_FILE = "florence2_serve.json"

# Text the BPE is trained on: the task prompts and a few object words.
_CORPUS = [
    "What does the image describe?", "Describe in detail what is shown in the image.",
    "Describe with a paragraph what is shown in the image.",
    "Locate the objects with category name in the image.",
    "Locate the objects in the image, with their descriptions.",
    "Locate the region proposals in the image.", "Locate the phrases in the caption:",
    "in the image with mask", "What is the polygon mask of region", "What is the region",
    "What does the region describe?", "What text is in the region?", "What is the text in the image?",
    "What is the text in the image, with regions?",
    "a car with a door handle and a wheel parked on the street next to a building",
    "person dog cat bicycle bus truck traffic light stop sign bench bird horse sheep cow",
    "0123456789 ABCDEFGHIJKLMNOPQRSTUVWXYZ abcdefghijklmnopqrstuvwxyz .,:;!?'\"()-",
]


@dataclass(frozen=True)
class Size:
    name: str
    image_size: int
    vision_depths: tuple[int, ...]
    vision_dims: tuple[int, ...]
    vision_heads: tuple[int, ...]
    window_size: int
    d_model: int
    layers: int
    heads: int
    ffn: int
    vocab_size: int | None  # None: just what the tokenizer holds


SIZES = {
    "tiny": Size("tiny", 64, (1, 1, 1, 1), (8, 16, 32, 64), (1, 2, 2, 4), 2, 32, 1, 2, 64, None),
    # Florence-2-base / -large shapes (DaViT + BART), vocab as the released checkpoints.
    "base": Size("base", 768, (1, 1, 9, 1), (128, 256, 512, 1024), (4, 8, 16, 32), 12, 768, 6, 12, 3072, 51289),
    "large": Size("large", 768, (1, 1, 9, 1), (256, 512, 1024, 2048), (8, 16, 32, 64), 12, 1024, 12, 16, 4096, 51289),
}


def build_tokenizer(vocab_size: int | None = None, image_token: bool = True, task_tokens: bool = True):
    """The tiny BPE with Florence-2's tokens, padded with filler tokens up to `vocab_size`.

    Without `image_token` and `task_tokens` it is laid out like the tokenizer Microsoft's hub checkpoints
    ship: BART's plain one, no `<image>` token (their model prepends the image features) and none of
    Florence-2's tokens (their processor adds those when it is built)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import BartTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_CORPUS * 4, trainer)
    tokenizer = BartTokenizerFast(
        tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        sep_token="</s>", cls_token="<s>", mask_token="<mask>",
        **({"extra_special_tokens": {"image_token": "<image>"}} if image_token else {}),
    )
    if task_tokens:
        tokenizer.add_tokens(FLORENCE_TOKENS)
    if vocab_size is not None and len(tokenizer) < vocab_size:
        tokenizer.add_tokens([f"<filler_{i}>" for i in range(vocab_size - len(tokenizer))])
    return tokenizer


def build_processor(size: Size, tokenizer):
    from transformers import CLIPImageProcessor, Florence2Processor

    square = {"height": size.image_size, "width": size.image_size}
    image_processor = CLIPImageProcessor(
        size=square, crop_size=square, do_center_crop=False, do_resize=True, resample=3,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225],
    )
    # DaViT downsamples by 32; one extra (temporal) token is prepended.
    image_processor.image_seq_length = (size.image_size // 32) ** 2 + 1
    return Florence2Processor(image_processor=image_processor, tokenizer=tokenizer)


def build_config(size: Size, tokenizer):
    from transformers import BartConfig, Florence2Config, Florence2VisionConfig

    vision = Florence2VisionConfig(
        depths=list(size.vision_depths), embed_dim=list(size.vision_dims),
        num_heads=list(size.vision_heads), num_groups=list(size.vision_heads),
        window_size=size.window_size, projection_dim=size.d_model, drop_path_rate=0.0,
    )
    text = BartConfig(
        vocab_size=len(tokenizer), d_model=size.d_model,
        encoder_layers=size.layers, decoder_layers=size.layers,
        encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn, decoder_ffn_dim=size.ffn, max_position_embeddings=1024 + 64,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=0, scale_embedding=False, dropout=0.0, attention_dropout=0.0,
    )
    return Florence2Config(
        vision_config=vision, text_config=text, image_token_id=tokenizer.image_token_id,
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
    )


def build_native(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Write a native (transformers >= 4.56) Florence-2 checkpoint with random weights."""
    import torch
    from transformers import Florence2ForConditionalGeneration, GenerationConfig

    spec = SIZES[size]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(spec.vocab_size)
    processor = build_processor(spec, tokenizer)
    config = build_config(spec, tokenizer)
    torch.manual_seed(seed)
    model = Florence2ForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(
        bos_token_id=0, pad_token_id=1, eos_token_id=2, decoder_start_token_id=2,
        forced_bos_token_id=0, num_beams=3, max_new_tokens=1024, do_sample=False,
    )
    if size == "tiny":
        _teach(model, processor)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    write_marker(out, kind="native", size=size, seed=seed, taught=size == "tiny")
    return out


def lesson_images():
    """Synthetic images the tiny model is taught on (a 'car' scene and two plain scenes)."""
    from PIL import Image, ImageDraw

    car = Image.new("RGB", (640, 480), (135, 180, 230))
    draw = ImageDraw.Draw(car)
    draw.rectangle([0, 360, 640, 480], fill=(90, 90, 90))
    draw.rectangle([34, 160, 597, 372], fill=(200, 30, 30))
    draw.ellipse([96, 280, 198, 371], fill=(20, 20, 20))
    draw.ellipse([454, 276, 554, 371], fill=(20, 20, 20))
    draw.rectangle([272, 241, 304, 247], fill=(230, 230, 230))
    street = Image.new("RGB", (320, 480), (40, 160, 60))
    ImageDraw.Draw(street).rectangle([32, 48, 160, 432], fill=(240, 200, 150))
    sign = Image.new("RGB", (256, 256), (250, 250, 250))
    ImageDraw.Draw(sign).text((90, 120), "STOP", fill=(200, 0, 0))
    return car, street, sign


LESSONS = [
    (0, "<OD>", "car<loc_53><loc_333><loc_933><loc_774>door handle<loc_425><loc_503><loc_474><loc_515>"
                "wheel<loc_709><loc_576><loc_865><loc_772>wheel<loc_150><loc_584><loc_309><loc_773>"),
    (0, "<CAPTION>", "A red car parked on the street."),
    (1, "<OD>", "person<loc_100><loc_100><loc_500><loc_900>"),
    (1, "<CAPTION>", "A person standing on the grass."),
    (2, "<OCR>", "STOP"),
    (2, "<OCR_WITH_REGION>", "STOP<loc_350><loc_460><loc_560><loc_460><loc_560><loc_520><loc_350><loc_520>"),
]


def _teach(model, processor, max_steps: int = 1200, check_every: int = 50) -> None:
    """Overfit the tiny model on a few answers so its outputs are well-formed and input-dependent.

    Training stops once greedy and 3-beam decoding both reproduce every lesson exactly (thread counts
    change float summation order, so a fixed step count is not reliable everywhere).
    """
    import torch

    from florence2_serve.common.tasks import Task, build_prompt

    images = lesson_images()
    prompts = [build_prompt(Task.parse(task)) for _, task, _ in LESSONS]
    inputs = processor(text=prompts, images=[images[i] for i, _, _ in LESSONS], return_tensors="pt", padding=True)
    tokenizer = processor.tokenizer
    targets = ["<s>" + answer + "</s>" for _, _, answer in LESSONS]
    labels = tokenizer(targets, return_tensors="pt", padding=True, add_special_tokens=False).input_ids
    labels[labels == tokenizer.pad_token_id] = -100
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(1, max_steps + 1):
        model.train()
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step % check_every == 0 and _knows_lessons(model, tokenizer, inputs, targets):
            break
    else:
        raise RuntimeError(f"the tiny model did not learn its lessons in {max_steps} steps")
    model.eval()


def _knows_lessons(model, tokenizer, inputs, targets) -> bool:
    import torch

    model.eval()
    with torch.inference_mode():
        for beams in (1, 3):
            generated = model.generate(**inputs, max_new_tokens=64, num_beams=beams, do_sample=False)
            texts = [t.replace(tokenizer.pad_token, "") for t in tokenizer.batch_decode(generated)]
            if texts != ["</s>" + target for target in targets]:
                return False
    return True


def write_marker(out: Path, **fields) -> None:
    marker = {"random_weights": True, "builder": "florence2_serve.worker.model_builder",
              "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **fields}
    (out / MARKER_FILE).write_text(json.dumps(marker, indent=2) + "\n")


def read_marker(model_dir: str | Path) -> dict:
    path = Path(model_dir) / MARKER_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
