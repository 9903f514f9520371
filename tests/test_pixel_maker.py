"""worker/pixel_maker.py: the image processor's own numbers, bit for bit, with less Python on the fetcher thread."""

from __future__ import annotations

import io
import logging
import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from florence2_serve.common.images import decode_image
from florence2_serve.worker.model_builder import lesson_images
from florence2_serve.worker.pixel_maker import PixelMaker

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]


def _processor(backend: str = "torchvision", **overrides):
    from transformers import CLIPImageProcessor, CLIPImageProcessorPil

    settings = {"size": {"height": 64, "width": 64}, "crop_size": {"height": 64, "width": 64},
                "do_center_crop": False, "resample": 3, "image_mean": MEAN, "image_std": STD, **overrides}
    return (CLIPImageProcessor if backend == "torchvision" else CLIPImageProcessorPil)(**settings)


def _reference(processor, image) -> np.ndarray:
    return processor([image], return_tensors="pt")["pixel_values"][0].numpy()


def _encoded(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def _images() -> list[Image.Image]:
    """Decoded as jobs' images are: photos, tiny and very wide ones, odd sizes, from JPEG and PNG."""
    noise = np.random.default_rng(0).integers(0, 256, size=(301, 997, 3), dtype=np.uint8)
    sources = [*lesson_images(), Image.fromarray(noise, "RGB"), Image.new("RGB", (1, 1), (200, 10, 30)),
               Image.fromarray(noise[:3, :500], "RGB"), Image.fromarray(noise[:77, :13], "RGB")]
    return [decode_image(_encoded(image, fmt)) for image in sources for fmt in ("JPEG", "PNG")]


@pytest.mark.parametrize("overrides", [{}, {"size": {"height": 768, "width": 768}}, {"resample": 2},
                                       {"size": {"height": 96, "width": 40}}],
                         ids=["tiny", "base-size", "bilinear", "not-square"])
def test_the_direct_path_gives_the_processors_pixels_bit_for_bit(overrides):
    processor = _processor(**overrides)
    maker = PixelMaker(processor)
    assert maker.direct is not None
    for image in _images():
        made = maker(image)
        assert made.dtype == np.float32 and np.array_equal(made, _reference(processor, image)), image.size


def test_the_models_own_processor_takes_the_direct_path(tiny_loaded):
    processor = tiny_loaded.processor.image_processor
    maker = PixelMaker(processor)
    assert maker.direct is not None
    image = decode_image(_encoded(lesson_images()[0], "JPEG"))
    assert np.array_equal(maker(image), _reference(processor, image))


@pytest.mark.parametrize("processor", [
    pytest.param(lambda: _processor("pil"), id="pil-backend"),
    pytest.param(lambda: _processor(do_center_crop=True), id="center-crop"),
    pytest.param(lambda: _processor(size={"shortest_edge": 64}, default_to_square=False), id="shortest-edge"),
    pytest.param(lambda: _processor(do_normalize=False), id="no-normalize"),
])
def test_configurations_it_does_not_reproduce_go_through_the_processor(processor):
    processor = processor()
    maker = PixelMaker(processor)
    assert maker.direct is None
    for image in _images()[:4]:
        assert np.array_equal(maker(image), _reference(processor, image))


def test_images_that_are_not_rgb_go_through_the_processor():
    processor = _processor()
    maker = PixelMaker(processor)
    grey = Image.fromarray(np.arange(40 * 30, dtype=np.uint8).reshape(30, 40) % 251, "L")
    assert np.array_equal(maker(grey), _reference(processor, grey))


def test_a_direct_path_that_differs_is_not_used(monkeypatch, caplog):
    original = PixelMaker._direct
    monkeypatch.setattr(PixelMaker, "_direct", lambda self, image: original(self, image) + np.float32(1e-6))
    processor = _processor()
    with caplog.at_level(logging.WARNING):
        maker = PixelMaker(processor)
    assert maker.direct is None and "differs" in caplog.text
    image = _images()[0]
    assert np.array_equal(maker(image), _reference(processor, image))


def test_a_maker_survives_pickling_for_preparation_processes():
    maker = pickle.loads(pickle.dumps(PixelMaker(_processor())))
    image = _images()[0]
    assert maker.direct is not None
    assert torch.equal(torch.from_numpy(maker(image)), torch.from_numpy(_reference(_processor(), image)))
