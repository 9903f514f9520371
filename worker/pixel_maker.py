"""One image's model pixels, with as little Python as the model's image processor allows (issue #23).

The fetcher makes every job's pixels on its own thread, beside the model thread, and the two share the
GIL: each Python call it makes is time a decoding step may wait. Calling transformers' image processor runs
about 650 Python calls per image (keyword merging and validation, grouping images by shape, a batch
feature) around five torch operations. For the configuration Florence-2's checkpoints use with the
torchvision backend (resize to a fixed height and width, no crop, no padding, rescale and normalise), the
maker runs those operations itself: about 130 Python calls, and it resizes the image where it lies instead
of first copying it into channels-first order (the same numbers, a 640x480 photo 3-4 times faster).

Numbers must not change, so the maker checks itself when it is built: it makes pixels both ways for a test
image and keeps its own path only if they are bitwise equal; any other processor, configuration or image
mode goes through the processor.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from PIL import Image

log = logging.getLogger(__name__)


def _processor_pixels(processor, image) -> np.ndarray:
    return processor([image], return_tensors="pt")["pixel_values"][0].numpy()


def _direct_settings(processor) -> dict | None:
    """What the direct path needs, or None where it does not reproduce this processor."""
    try:
        from transformers.image_processing_backends import TorchvisionBackend
        from transformers.image_utils import pil_torch_interpolation_mapping
    except ImportError:
        return None
    if not isinstance(processor, TorchvisionBackend):
        return None
    for method in ("preprocess", "_preprocess_image_like_inputs", "process_image", "_preprocess", "resize",
                   "rescale_and_normalize"):
        if getattr(type(processor), method, None) is not getattr(TorchvisionBackend, method, None):
            return None  # a model's own processing: only the processor itself reproduces it
    size = getattr(processor, "size", None)
    height, width = getattr(size, "height", None), getattr(size, "width", None)
    plain = (processor.do_resize and height and width and not getattr(size, "shortest_edge", None)
             and not processor.do_center_crop and not getattr(processor, "do_pad", False)
             and processor.do_rescale and processor.do_normalize and processor.resample is not None)
    if not plain:
        return None
    scale = 1.0 / processor.rescale_factor
    return {"size": [int(height), int(width)],
            "interpolation": pil_torch_interpolation_mapping[processor.resample],
            # The processor folds rescaling into normalising the same way (TorchvisionBackend.rescale_and_normalize).
            "mean": torch.tensor(processor.image_mean) * scale,
            "std": torch.tensor(processor.image_std) * scale}


def _probe_image() -> Image.Image:
    """Not square, neither size a multiple of the other, every channel different: a resize that differs shows."""
    values = np.random.default_rng(23).integers(0, 256, size=(45, 67, 3), dtype=np.uint8)
    return Image.fromarray(values, "RGB")


class PixelMaker:
    """Callable: an RGB PIL image -> the processor's pixel values for it, numpy [3, H, W]. Picklable (image
    preparation processes get one)."""

    def __init__(self, processor):
        self.processor = processor
        self.direct = _direct_settings(processor)
        if self.direct is not None:
            probe = _probe_image()
            if not np.array_equal(self._direct(probe), _processor_pixels(processor, probe)):
                log.warning("the direct pixel path differs from %s; images go through the processor",
                            type(processor).__name__)
                self.direct = None

    def __call__(self, image) -> np.ndarray:
        if self.direct is not None and getattr(image, "mode", None) == "RGB":
            return self._direct(image)
        return _processor_pixels(self.processor, image)

    def _direct(self, image: Image.Image) -> np.ndarray:
        import torchvision.transforms.v2.functional as tvF

        direct = self.direct
        # The processor copies the image into channels-first order before resizing it. Resizing the
        # channels-last view gives the same numbers (the self-check holds it to that) 3-4 times faster.
        pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1)
        pixels = tvF.resize(pixels[None], direct["size"], interpolation=direct["interpolation"], antialias=True)
        return tvF.normalize(pixels.to(torch.float32), direct["mean"], direct["std"], inplace=True)[0].numpy()
