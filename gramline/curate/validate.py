"""Decode and check one image: full Pillow decode, EXIF orientation, RGB conversion, size limits.

A bad input is never fatal: `validate_image` returns a `Rejection` with one of `REASONS`, which curation
records in `quarantine.parquet`. A good one comes back as RGB pixels, the bytes to store
(the original file when it already is an upright RGB JPEG/PNG, else a re-encode), and two hashes:
`pixel_sha256` over the decoded pixels (used for exact dedup: it also catches the same picture in
another container or with different metadata) and `file_sha256` over the input bytes.
"""

from __future__ import annotations

import hashlib
import io
import re
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

REASONS = (
    "zero-byte",        # empty file
    "non-image",        # not a format Pillow knows
    "truncated",        # a known image format that ends early
    "corrupt",          # a known image format that fails to decode
    "too-small",        # shorter side below images.min_side
    "too-many-pixels",  # width*height above images.max_pixels (decompression bombs)
    "path-traversal",   # tar member with an absolute path or '..'
    "not-a-file",       # tar member that is a link, device or fifo
    "unreadable",       # listed in a manifest but missing or unreadable
)

# Leading bytes of formats Pillow decodes: a file that starts like one but fails is truncated/corrupt.
_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*",
               b"RIFF", b"\x00\x00\x00\x0cjP  ")
_ALPHA_MODES = {"LA", "La", "PA", "RGBA", "RGBa"}
_SIXTEEN_BIT = {"I;16", "I;16L", "I;16B", "I;16N"}


@dataclass(frozen=True)
class Rejection:
    reason: str
    detail: str


@dataclass
class ValidImage:
    image: Image.Image        # RGB, upright
    data: bytes               # what goes into the shard
    ext: str                  # "jpg" | "png"
    width: int
    height: int
    pixel_sha256: str
    file_sha256: str
    source_format: str        # Pillow's format name of the input
    source_mode: str          # Pillow's mode of the input
    reencoded: bool


def _looks_like_image(data: bytes) -> bool:
    return any(data.startswith(sig) for sig in _SIGNATURES)


def _decode_failure(err: BaseException) -> Rejection:
    # Pillow names the in-memory file with its address; drop it so that reruns give the same detail
    text = re.sub(r" <_io\.BytesIO object at 0x[0-9a-f]+>", "", f"{type(err).__name__}: {err}")
    if isinstance(err, EOFError) or "truncated" in str(err).lower() or "premature end" in str(err).lower():
        return Rejection("truncated", text)
    return Rejection("corrupt", text)


def flatten_to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB the way a viewer shows it, flattening transparency.

    Transparent pixels are composited over `background` (dropping alpha would expose whatever colour
    the encoder left under them); 16-bit grey is scaled by 1/257 rather than clipped at 255; float
    images in [0, 1] are scaled to [0, 255]; CMYK and the others use Pillow's conversions.
    """
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P" and "transparency" in image.info:
        image, mode = image.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode in _SIXTEEN_BIT or mode == "I":
        values = np.asarray(image).astype(np.float64)
        if mode == "I" and values.size and values.max() <= 255 and values.min() >= 0:
            scaled = values
        else:
            scaled = values / 257.0
        grey = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    if mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if values.size and np.nanmax(values) <= 1.0:
            values = values * 255.0
        grey = np.clip(np.rint(np.nan_to_num(values)), 0, 255).astype(np.uint8)
        return Image.fromarray(grey, "L").convert("RGB")
    return image.convert("RGB")


def _encode(image: Image.Image, ext: str, jpeg_quality: int) -> bytes:
    buf = io.BytesIO()
    if ext == "jpg":
        image.save(buf, format="JPEG", quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
    else:
        image.save(buf, format="PNG", compress_level=3)
    return buf.getvalue()


def pixel_hash(image: Image.Image) -> str:
    digest = hashlib.sha256(f"{image.mode}:{image.width}x{image.height}:".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def validate_image(
    data: bytes,
    *,
    min_side: int = 32,
    max_pixels: int = 50_000_000,
    max_side: int | None = None,
    jpeg_quality: int = 95,
    background: tuple[int, int, int] = (255, 255, 255),
) -> ValidImage | Rejection:
    """Fully decode `data`; return the upright RGB image and its storage bytes, or why not."""
    if not data:
        return Rejection("zero-byte", "the file is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as err:
        return Rejection("too-many-pixels", str(err))
    except UnidentifiedImageError as err:
        if _looks_like_image(data):
            return _decode_failure(err)
        return Rejection("non-image", "not a recognised image format")
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        return _decode_failure(err)
    source_format, source_mode = image.format or "unknown", image.mode
    width, height = image.size
    if width * height > max_pixels:
        return Rejection("too-many-pixels", f"{width}x{height} = {width * height} pixels > {max_pixels}")
    if max_side is not None and source_format == "JPEG" and max(width, height) > 2 * max_side:
        image.draft("RGB", (max_side, max_side))  # DCT-domain downscale: much faster decode
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
    except Image.DecompressionBombError as err:
        return Rejection("too-many-pixels", str(err))
    except (OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError, TypeError) as err:
        return _decode_failure(err)

    try:
        upright = ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001 - a broken EXIF block (any of PIL's parser errors) is not a broken image
        upright = image
    rotated = _has_orientation(image)
    try:
        rgb = flatten_to_rgb(upright, background)
    except (OSError, ValueError) as err:
        return _decode_failure(err)
    resized = False
    if max_side is not None and max(rgb.size) > max_side:
        scale = max_side / max(rgb.size)
        rgb = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))),
                         Image.Resampling.LANCZOS)
        resized = True
    if min(rgb.size) < min_side:
        return Rejection("too-small", f"{rgb.width}x{rgb.height}, shorter side < {min_side}")

    keep_original = (source_format in ("JPEG", "PNG") and source_mode == "RGB" and not rotated
                     and not resized and rgb.size == (width, height))
    if keep_original:
        ext, stored = ("jpg" if source_format == "JPEG" else "png"), data
    else:
        ext = "jpg" if source_format in ("JPEG", "MPO", "WEBP") else "png"
        stored = _encode(rgb, ext, jpeg_quality)
    return ValidImage(
        image=rgb, data=stored, ext=ext, width=rgb.width, height=rgb.height,
        pixel_sha256=pixel_hash(rgb), file_sha256=hashlib.sha256(data).hexdigest(),
        source_format=source_format, source_mode=source_mode, reencoded=not keep_original,
    )


def _has_orientation(image: Image.Image) -> bool:
    """True when EXIF asks for a flip or rotation (orientation 2..8)."""
    try:
        return int(image.getexif().get(0x0112, 1)) not in (0, 1)
    except Exception:  # noqa: BLE001 - as above: an unreadable EXIF block means no orientation
        return False
