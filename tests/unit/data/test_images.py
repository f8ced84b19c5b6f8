"""pipeline.data.images on images generated here: decoding, EXIF orientation, modes (alpha, 16-bit,
CMYK, palette), resize + centre crop, encodings, and the reasons images are skipped."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from pipeline.data import images


def encoded(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def decoded(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_jpeg_png_webp_in_each_output_format():
    img = Image.new("RGB", (40, 30), (200, 40, 10))
    for fmt in ("JPEG", "PNG", "WEBP"):
        for out, pil in (("png", "PNG"), ("jpeg", "JPEG"), ("webp", "WEBP")):
            c = images.convert(encoded(img, fmt), 16, 3, out, quality=90)
            got = decoded(c.data)
            assert got.format == pil and got.size == (16, 16) and got.mode == "RGB"
            assert c.original_size == (40, 30) and c.original_mode == "RGB"
            assert np.abs(np.asarray(got).astype(int) - [200, 40, 10]).max() <= 12, (fmt, out)


def test_shorter_side_resized_then_centre_cropped():
    arr = np.zeros((20, 60, 3), np.uint8)  # wide: left third red, middle green, right third blue
    arr[:, :20] = (255, 0, 0)
    arr[:, 20:40] = (0, 255, 0)
    arr[:, 40:] = (0, 0, 255)
    c = images.convert(encoded(Image.fromarray(arr), "PNG"), 10, 3)
    out = np.asarray(decoded(c.data))
    assert out.shape == (10, 10, 3) and (np.abs(out.astype(int) - [0, 255, 0]).max(axis=-1) <= 40).all()


def test_exif_orientation_is_applied():
    # stored 40 wide x 20 high, left half black, right half white; orientation 6 = rotate 90 clockwise to view
    arr = np.zeros((20, 40), np.uint8)
    arr[:, 20:] = 255
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encoded(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    img, stored = images.decode(data)
    assert stored == (40, 20) and img.size == (20, 40)  # upright: 20 wide, 40 high
    top, bottom = np.asarray(img)[:10].mean(), np.asarray(img)[30:].mean()
    assert top < 30 and bottom > 225  # the stored left (black) is now the top
    c = images.convert(data, 20, 1)
    out = np.asarray(decoded(c.data))  # 20x20 centre crop of the upright image: black above, white below
    assert out[:5].mean() < 60 and out[-5:].mean() > 200


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (16, 16), (255, 0, 0, 0))  # fully transparent red
    rgba.paste((0, 0, 255, 255), (0, 0, 8, 16))  # opaque blue left half
    out = np.asarray(decoded(images.convert(encoded(rgba, "PNG"), 16, 3).data))
    assert (out[:, :8] == [0, 0, 255]).all() and (out[:, 8:] == 255).all()
    la = Image.new("LA", (16, 16), (0, 0))
    assert (np.asarray(decoded(images.convert(encoded(la, "PNG"), 16, 1).data)) == 255).all()
    pal = Image.new("P", (16, 16), 0)
    pal.putpalette([10, 20, 30] * 256)
    pal.info["transparency"] = 0
    assert (np.asarray(decoded(images.convert(encoded(pal, "PNG", transparency=0), 16, 3).data)) == 255).all()


def test_16_bit_is_scaled_not_clipped():
    arr = np.linspace(0, 65535, 16 * 16).reshape(16, 16).astype(np.uint16)
    data = encoded(Image.fromarray(arr), "PNG")
    assert decoded(data).mode in ("I;16", "I")
    c = images.convert(data, 16, 1)
    out = np.asarray(decoded(c.data)).astype(int)
    assert out.min() == 0 and out.max() == 255
    assert np.abs(out - np.rint(arr / 257.0)).max() <= 1  # a ramp, not 255 everywhere above 255/65535
    assert (out < 128).sum() == pytest.approx(128, abs=2)
    i32 = Image.fromarray(arr.astype(np.int32), mode="I")
    assert np.abs(np.asarray(images.to_mode(i32, 1)).astype(int) - np.rint(arr / 257.0)).max() <= 1


def test_cmyk_grayscale_and_modes():
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # red
    for fmt in ("JPEG", "TIFF"):
        c = images.convert(encoded(cmyk, fmt), 16, 3)
        assert c.original_mode == "CMYK"
        assert np.abs(np.asarray(decoded(c.data)).astype(int) - [255, 0, 0]).max() <= 12
    gray = Image.new("L", (16, 16), 77)
    rgb = decoded(images.convert(encoded(gray, "PNG"), 8, 3).data)
    assert rgb.mode == "RGB" and (np.asarray(rgb) == 77).all()
    l_img = decoded(images.convert(encoded(Image.new("RGB", (16, 16), (0, 255, 0)), "PNG"), 8, 1).data)
    assert l_img.mode == "L" and (np.asarray(l_img) == 150).all()  # ITU-R 601-2 luma of pure green


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "empty"),
        (b"this is a text file, not a jpeg\n", "not_an_image"),
        (encoded(Image.new("RGB", (4, 30)), "PNG"), "too_small"),
    ],
)
def test_unusable_images_are_skipped_by_reason(data, reason):
    with pytest.raises(images.SkipImage) as e:
        images.convert(data, 16, 3)
    assert e.value.reason == reason and reason in images.REASONS


def test_truncated_files_are_skipped():
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    for fmt in ("JPEG", "PNG", "WEBP"):
        data = encoded(noise, fmt)
        with pytest.raises(images.SkipImage) as e:
            images.convert(data[: len(data) // 2], 16, 3)
        assert e.value.reason in ("truncated", "undecodable"), (fmt, e.value)
    with pytest.raises(images.SkipImage) as e:
        images.convert(encoded(noise, "JPEG")[:3000], 16, 3)
    assert e.value.reason == "truncated"


def test_jpeg_draft_decoding_keeps_the_size_and_the_picture():
    arr = np.zeros((256, 256, 3), np.uint8)
    arr[:128] = (250, 250, 250)
    data = encoded(Image.fromarray(arr), "JPEG", quality=95)
    img, stored = images.decode(data, size=64)
    assert stored == (256, 256) and min(img.size) >= 64 and img.size[0] < 256  # decoded at a DCT scale
    out = np.asarray(decoded(images.convert(data, 64, 3).data)).astype(int)
    assert out.shape == (64, 64, 3) and out[:28].min() > 230 and out[36:].max() < 25
