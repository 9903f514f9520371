"""Image decoding and validation with Pillow only (used by the front end and the workers).

Every image that reaches a model is RGB, upright (EXIF orientation applied) and within the
configured pixel limit; anything else is an ImageError that says what is wrong.
"""

from __future__ import annotations

import functools
import io
import os
from dataclasses import dataclass

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

ALLOWED_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF", "MPO"})
EXIF_FORMATS = frozenset({"JPEG", "MPO", "TIFF", "WEBP"})
DEFAULT_MAX_PIXELS = 50_000_000
DEFAULT_MAX_BYTES = 32 * 1024 * 1024

# Truncated files are errors, never silently half-decoded.
ImageFile.LOAD_TRUNCATED_IMAGES = False
# The pixel limit is ours (ImageLimits.max_pixels), checked from the header right after opening;
# Pillow's own bomb check would refuse first, with its own number, for images past twice its default.
Image.MAX_IMAGE_PIXELS = None


class ImageError(ValueError):
    """The bytes are not an acceptable image; the message says why (never Pillow's own text).

    `too_large` tells an image over a size limit from one that cannot be read.
    """

    def __init__(self, message: str, too_large: bool = False):
        super().__init__(message)
        self.too_large = too_large


@dataclass(frozen=True)
class ImageLimits:
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_bytes: int = DEFAULT_MAX_BYTES


@dataclass(frozen=True)
class ImageInfo:
    format: str
    width: int
    height: int


def _open(data: bytes, limits: ImageLimits) -> Image.Image:
    if not data:
        raise ImageError("image is empty (0 bytes)")
    if len(data) > limits.max_bytes:
        raise ImageError(f"image is {len(data)} bytes, over the limit of {limits.max_bytes} bytes", too_large=True)
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        raise ImageError("not a readable image: the bytes are not in any accepted image format") from None
    except Exception:  # noqa: BLE001 - Pillow raises many types for corrupt headers
        raise ImageError("not a readable image: its header is corrupt") from None
    if image.format not in ALLOWED_FORMATS:
        raise ImageError(
            f"image format {image.format} is not accepted; use JPEG, PNG, WebP, BMP, GIF or TIFF"
        )
    width, height = image.size
    if width <= 0 or height <= 0:
        raise ImageError(f"image has zero size ({width}x{height})")
    # Checked from the header, before any pixel is decoded: decompression bombs stop here.
    if width * height > limits.max_pixels:
        raise ImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of "
            f"{limits.max_pixels} pixels", too_large=True)
    return image


def header_pixels(data: bytes, limits: ImageLimits = ImageLimits()) -> int:
    """Width x height from the header alone (format and limits checked; no pixel decoded)."""
    width, height = _open(data, limits).size
    return width * height


def probe_image(data: bytes, limits: ImageLimits = ImageLimits()) -> ImageInfo:
    """Validate an image (decoding every byte of it) and return its format and upright size.

    JPEGs are decoded at 1/8 scale (DCT scaling): every scan is still read, so truncated or corrupt
    data is still caught, at a fraction of the cost of a full decode.
    """
    image = _open(data, limits)
    source_format = image.format
    width, height = image.size
    if source_format in ("JPEG", "MPO"):
        image.draft("RGB", (max(1, width // 8), max(1, height // 8)))
    try:
        image.seek(0)
        image.load()
    except Exception:  # noqa: BLE001
        raise ImageError(f"image data is corrupt or truncated ({source_format})") from None
    try:
        orientation = image.getexif().get(0x0112, 1)
    except Exception:  # noqa: BLE001
        orientation = 1
    if orientation in (5, 6, 7, 8):
        width, height = height, width
    return ImageInfo(format=source_format, width=width, height=height)


def reuse_image_memory(images_in_flight: int, environ=None) -> int:
    """Have Pillow keep freed pixel blocks for the next images instead of handing them back to malloc.

    A worker decodes an image per job and frees it a batch later. Without a cache every decode is a
    fresh ~1 MB (640x480) allocation, and the process's RSS swings by tens of MB with the allocator's
    trimming; with one, decoding reuses the same blocks and RSS settles at what the images in flight
    need. Pillow's blocks are at most 16 MB each (an image of up to ~4 MP in RGB fits in one), so the
    cache holds at most `blocks x 16 MB`, and in practice the size of the last images seen. An explicit
    PILLOW_BLOCKS_MAX in the environment wins. Returns the number of blocks kept.
    """
    environ = os.environ if environ is None else environ
    if "PILLOW_BLOCKS_MAX" in environ:  # Pillow applied it when it was imported
        return Image.core.get_blocks_max()
    blocks = max(4, images_in_flight)
    Image.core.set_blocks_max(blocks)
    return blocks


def release_image_memory() -> None:
    """Hand Pillow's kept pixel blocks, and the allocator's free memory, back to the system: an idle
    worker's RSS is then its baseline whatever images it last saw (the cache fills again with the next
    batch). Without this, RSS at rest depends on how many images were in flight at the busiest moment so
    far, up to reuse_image_memory's bound."""
    Image.core.clear_cache()
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (musl, macOS)."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255 to white.
        wide = image.convert("I")
        high = wide.getextrema()[1]
        scale = 1.0 if high <= 255 else (1 / 256 if high <= 65535 else 255 / high)
        return wide.point(lambda v: v * scale).convert("L").convert("RGB")
    if mode == "F":
        return image.convert("L").convert("RGB")
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def decode_image(data: bytes, limits: ImageLimits = ImageLimits()) -> Image.Image:
    """Bytes -> upright RGB PIL image, or ImageError."""
    image = _open(data, limits)
    source_format = image.format
    try:
        image.seek(0)  # first frame of animations
        image.load()
    except Exception:  # noqa: BLE001 - truncated or corrupt pixel data
        raise ImageError(f"image data is corrupt or truncated ({source_format})") from None
    if source_format in EXIF_FORMATS or "exif" in image.info:  # a PNG's eXIf chunk lands in info
        try:
            ImageOps.exif_transpose(image, in_place=True)  # (not in place, it copies every upright image)
        except Exception:  # noqa: BLE001 - a broken EXIF block must not reject a good image
            pass
    image = _to_rgb(image)
    image.info["source_format"] = source_format
    return image
