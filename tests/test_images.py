"""Image decoding: formats, EXIF orientation, modes, and every kind of bad input."""

import io

import pytest
from PIL import Image

from florence2_serve.common.images import ImageError, ImageLimits, decode_image


def encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"])
def test_formats_decode_to_rgb(fmt):
    image = decode_image(encode(Image.new("RGB", (40, 30), (200, 20, 20)), fmt))
    assert image.mode == "RGB" and image.size == (40, 30)
    assert image.info["source_format"] == fmt


def test_gif_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in [(255, 0, 0), (0, 0, 255)]]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    r, g, b = decode_image(data).getpixel((4, 4))
    assert r > 200 and b < 50


def test_exif_orientation_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    data = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    assert decode_image(data).size == (20, 40)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P", "L", "I;16", "CMYK", "1"])
def test_every_mode_converts_to_rgb(mode):
    fmt = "TIFF" if mode in ("I;16", "CMYK") else "PNG"
    image = Image.new(mode, (10, 10))
    assert decode_image(encode(image, fmt)).mode == "RGB"


def test_sixteen_bit_grey_is_scaled_not_clipped():
    image = Image.new("I;16", (4, 4), 32768)  # mid grey in 16 bits
    value = decode_image(encode(image, "PNG")).getpixel((0, 0))[0]
    assert 120 <= value <= 135


def test_transparent_pixels_become_white():
    assert decode_image(encode(Image.new("RGBA", (4, 4), (0, 0, 0, 0)), "PNG")).getpixel((1, 1)) == (255, 255, 255)


def test_truncated_file_rejected():
    data = encode(Image.effect_noise((256, 256), 50).convert("RGB"), "JPEG")
    with pytest.raises(ImageError, match="truncated|corrupt"):
        decode_image(data[: len(data) // 2])


@pytest.mark.parametrize("data,message", [(b"", "empty"), (b"hello, not an image", "not a readable image")])
def test_non_images_rejected(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_zero_size_rejected():
    # A hand-made BMP header declaring 0x5 pixels.
    header = bytearray(encode(Image.new("RGB", (1, 5)), "BMP"))
    header[18:22] = (0).to_bytes(4, "little", signed=True)
    with pytest.raises(ImageError):
        decode_image(bytes(header))


def test_over_pixel_limit_names_the_limit():
    with pytest.raises(ImageError, match="over the limit of 1000 pixels"):
        decode_image(encode(Image.new("RGB", (40, 30)), "PNG"), ImageLimits(max_pixels=1000))


def test_decompression_bomb_rejected_before_decoding():
    # 20000x20000 declared in a tiny PNG: the header check refuses it without allocating the pixels.
    data = encode(Image.new("1", (20000, 20000)), "PNG")
    assert len(data) < 200_000
    with pytest.raises(ImageError, match="pixels"):
        decode_image(data, ImageLimits(max_pixels=10_000_000))


def test_byte_limit_named():
    with pytest.raises(ImageError, match="over the limit of 10 bytes"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PNG"), ImageLimits(max_bytes=10))


def test_unaccepted_format_rejected():
    with pytest.raises(ImageError, match="not accepted"):
        decode_image(encode(Image.new("RGB", (4, 4)), "PPM"))


def test_probe_validates_like_decode_but_reports_upright_size():
    from florence2_serve.common.images import probe_image

    data = encode(Image.effect_noise((256, 128), 50).convert("RGB"), "JPEG")
    info = probe_image(data)
    assert (info.format, info.width, info.height) == ("JPEG", 256, 128)
    with pytest.raises(ImageError, match="truncated|corrupt"):
        probe_image(data[: len(data) // 2])
    exif = Image.Exif()
    exif[0x0112] = 6
    rotated = encode(Image.new("RGB", (40, 20)), "JPEG", exif=exif.tobytes())
    assert (probe_image(rotated).width, probe_image(rotated).height) == (20, 40)
    with pytest.raises(ImageError, match="pixels"):
        probe_image(encode(Image.new("1", (20000, 20000)), "PNG"), ImageLimits(max_pixels=10_000_000))
