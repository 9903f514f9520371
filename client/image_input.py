"""What `detect` accepts as an image, turned into the encoded bytes the service takes."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any, Union

# bytes, a path (str or os.PathLike), a PIL image, a numpy array (H x W, H x W x 3 or 4, uint8) or a
# binary file-like object. URLs are not fetched.
ImageInput = Union[bytes, bytearray, memoryview, str, os.PathLike, Any]


CHANNEL_ORDERS = ("rgb", "bgr")


def image_bytes(image: ImageInput, channels: str = "rgb") -> bytes:
    """The encoded image to send. PIL images and arrays are encoded as PNG: lossless, whatever the mode.

    A numpy array's colour channels are read as RGB(A); `channels="bgr"` for OpenCV's order (`cv2.imread`
    gives BGR, BGRA with an alpha channel). Other inputs carry their own colour order and ignore it."""
    if channels not in CHANNEL_ORDERS:
        raise ValueError(f"channels must be 'rgb' or 'bgr', got {channels!r}")
    if isinstance(image, (bytes, bytearray, memoryview)):
        return bytes(image)
    if isinstance(image, str) and image.startswith(("http://", "https://")):
        raise TypeError("URLs are not fetched: download the image and pass its bytes or path")
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"no such image file: {path}")
        data = path.read_bytes()
        if not data:
            raise ValueError(f"{path}: the file is empty")
        return data
    if type(image).__module__.split(".")[0] == "PIL":
        return _png(image)
    if type(image).__module__ == "numpy":
        from PIL import Image

        if image.dtype.name != "uint8" or image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[2] not in (1, 3, 4)):
            raise TypeError(f"a numpy image must be uint8 with shape (H, W), (H, W, 3) or (H, W, 4); got "
                            f"{image.dtype.name} {tuple(image.shape)}")
        array = image[:, :, 0] if image.ndim == 3 and image.shape[2] == 1 else image
        if channels == "bgr" and array.ndim == 3:
            array = array[:, :, [2, 1, 0, 3][: array.shape[2]]]  # BGR(A) -> RGB(A); alpha stays last
        return _png(Image.fromarray(array))
    if callable(getattr(image, "read", None)):
        data = image.read()
        if not isinstance(data, (bytes, bytearray)):
            raise TypeError("a file-like image must be opened in binary mode ('rb')")
        return bytes(data)
    raise TypeError(f"cannot send a {type(image).__name__} as an image: pass bytes, a path, a PIL image, "
                    "a numpy array or a binary file object")


def _png(image) -> bytes:
    if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "I;16", "I"):
        image = image.convert("RGBA" if "A" in image.mode else "RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()
