"""Image validation: every rejection reason, EXIF orientation, mode conversion, storage bytes."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from gramline.curate.validate import REASONS, Rejection, ValidImage, validate_image


def _save(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _noise(w: int = 64, h: int = 48, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height, with a tiny IDAT: a decompression-bomb shape."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def _reason(data: bytes, **kwargs) -> str:
    result = validate_image(data, **kwargs)
    assert isinstance(result, Rejection), f"expected a rejection, got {result}"
    assert result.reason in REASONS
    return result.reason


def _ok(data: bytes, **kwargs) -> ValidImage:
    result = validate_image(data, **kwargs)
    assert isinstance(result, ValidImage), f"expected a valid image, got {result}"
    return result


def test_rejection_reasons() -> None:
    jpeg = _save(_noise(200, 150), "JPEG", quality=90)
    png = _save(_noise(200, 150), "PNG")
    assert _reason(b"") == "zero-byte"
    assert _reason(b"hello, this is a text file\n" * 10) == "non-image"
    assert _reason(b"%PDF-1.4\n" + bytes(range(256))) == "non-image"
    assert _reason(jpeg[: len(jpeg) // 2]) == "truncated"
    assert _reason(png[: len(png) // 2]) == "truncated"
    assert _reason(jpeg[:3] + bytes(500)) in ("corrupt", "truncated")  # JPEG magic, garbage body
    corrupt = bytearray(png)
    corrupt[60:200] = bytes(140)  # zero the compressed data: zlib fails
    assert _reason(bytes(corrupt)) == "corrupt"
    assert _reason(_save(_noise(20, 100), "PNG"), min_side=32) == "too-small"
    assert _reason(_save(_noise(200, 150), "PNG"), max_pixels=200 * 150 - 1) == "too-many-pixels"
    # header claims 100k x 100k (10^10 pixels): rejected from the header, never allocated
    assert _reason(_png_header_only(100_000, 100_000)) == "too-many-pixels"
    assert _reason(_png_header_only(9_000, 9_000), max_pixels=50_000_000) == "too-many-pixels"


def test_exif_orientation_is_applied() -> None:
    # stored 40 wide x 20 tall: top half red, bottom half blue; orientation 6 = rotate 90° clockwise
    array = np.zeros((20, 40, 3), np.uint8)
    array[:10] = (255, 0, 0)
    array[10:] = (0, 0, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _save(Image.fromarray(array), "JPEG", quality=95, exif=exif.tobytes())
    v = _ok(data, min_side=8)
    assert (v.width, v.height) == (20, 40)
    pixels = np.asarray(v.image).astype(int)
    # after a clockwise quarter turn the old top (red) is on the right, the old bottom (blue) left
    assert pixels[20, 16, 0] > 200 and pixels[20, 16, 2] < 60
    assert pixels[20, 3, 2] > 200 and pixels[20, 3, 0] < 60
    assert v.reencoded and v.data != data
    stored = Image.open(io.BytesIO(v.data))
    assert stored.size == (20, 40) and stored.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("case", ["P_transparent", "LA", "RGBA", "CMYK", "I;16", "L", "1", "F"])
def test_modes_convert_to_rgb(case: str) -> None:
    w, h = 40, 40
    if case == "P_transparent":
        image = Image.new("P", (w, h), 0)
        image.putpalette([0, 0, 0, 255, 0, 0] + [0] * (256 * 3 - 6))
        image.paste(1, (0, 0, 20, 40))  # left half palette 1 (red), right half palette 0 (transparent black)
        data = _save(image, "PNG", transparency=0)
        expect_left, expect_right = (255, 0, 0), (255, 255, 255)
    elif case == "LA":
        la = np.zeros((h, w, 2), np.uint8)
        la[:, :20] = (0, 255)      # opaque black
        la[:, 20:] = (0, 0)        # fully transparent: shows the background
        data = _save(Image.fromarray(la, "LA"), "PNG")
        expect_left, expect_right = (0, 0, 0), (255, 255, 255)
    elif case == "RGBA":
        rgba = np.zeros((h, w, 4), np.uint8)
        rgba[:, :20] = (255, 0, 0, 255)
        rgba[:, 20:] = (255, 0, 0, 128)  # half-transparent red over white: G,B = 255 * (1 - 128/255) = 127
        data = _save(Image.fromarray(rgba, "RGBA"), "PNG")
        expect_left, expect_right = (255, 0, 0), (255, 127, 127)
    elif case == "CMYK":
        image = Image.new("CMYK", (w, h), (0, 255, 255, 0))  # no cyan/black, full magenta+yellow = red
        image.paste((0, 0, 0, 255), (20, 0, 40, 40))          # full black
        data = _save(image, "JPEG", quality=100)
        expect_left, expect_right = (255, 0, 0), (0, 0, 0)
    elif case == "I;16":
        grey = np.zeros((h, w), np.uint16)
        grey[:, :20] = 65535
        grey[:, 20:] = 257 * 100  # 16-bit 25700 is 8-bit 100, not clipped to 255
        image = Image.new("I;16", (w, h))
        image.frombytes(grey.astype("<u2").tobytes())
        data = _save(image, "PNG")
        assert Image.open(io.BytesIO(data)).mode.startswith("I")
        expect_left, expect_right = (255, 255, 255), (100, 100, 100)
    elif case == "L":
        grey = np.full((h, w), 30, np.uint8)
        grey[:, 20:] = 200
        data = _save(Image.fromarray(grey, "L"), "PNG")
        expect_left, expect_right = (30, 30, 30), (200, 200, 200)
    elif case == "1":
        bits = np.zeros((h, w), bool)
        bits[:, 20:] = True
        data = _save(Image.fromarray(bits), "PNG")
        expect_left, expect_right = (0, 0, 0), (255, 255, 255)
    else:  # "F": floats in [0, 1] scale to [0, 255]
        values = np.full((h, w), 0.5, np.float32)
        values[:, 20:] = 1.0
        data = _save(Image.fromarray(values, "F"), "TIFF")
        expect_left, expect_right = (128, 128, 128), (255, 255, 255)
    v = _ok(data, min_side=8)
    assert v.image.mode == "RGB"
    stored = np.asarray(Image.open(io.BytesIO(v.data)).convert("RGB")).astype(int)
    tolerance = 3 if v.ext == "jpg" else 1
    assert np.abs(stored[20, 5] - expect_left).max() <= tolerance, (stored[20, 5], expect_left)
    assert np.abs(stored[20, 35] - expect_right).max() <= tolerance, (stored[20, 35], expect_right)


def test_storage_keeps_upright_rgb_originals_and_hashes_pixels() -> None:
    image = _noise(80, 60, seed=3)
    jpeg = _save(image, "JPEG", quality=90)
    png = _save(image, "PNG")
    bmp = _save(image, "BMP")
    v_jpeg, v_png, v_bmp = _ok(jpeg), _ok(png), _ok(bmp)
    assert v_jpeg.data == jpeg and v_jpeg.ext == "jpg" and not v_jpeg.reencoded
    assert v_png.data == png and v_png.ext == "png" and not v_png.reencoded
    assert v_bmp.ext == "png" and v_bmp.reencoded  # not a shard format: re-encoded losslessly
    # same pixels in PNG and BMP: one pixel hash (exact duplicates), two file hashes
    assert v_png.pixel_sha256 == v_bmp.pixel_sha256
    assert v_png.file_sha256 != v_bmp.file_sha256
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(v_bmp.data))), np.asarray(image))
    assert v_jpeg.pixel_sha256 != v_png.pixel_sha256  # lossy: different pixels


def test_max_side_downscales() -> None:
    v = _ok(_save(_noise(400, 100), "PNG"), max_side=100, min_side=10)
    assert (v.width, v.height) == (100, 25)
    assert Image.open(io.BytesIO(v.data)).size == (100, 25)
