"""Decode only what the crops need: JPEG DCT-domain downscaling before the crops are cut.

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 of its size for a fraction of the full cost (PIL's
`Image.draft`). `draft_for_crops` picks the largest such reduction at which every crop's box still
has at least its output size in decoded pixels, so no crop is upsampled because of it. The crop
boxes stay in original-image coordinates; the caller divides them by the returned reduction.

Effect on pixels: a reduced decode is close to the full decode averaged over r x r blocks, and the
bicubic resize that follows downsamples from there instead of from the full image. On the bench's
procedural photographs the crops differ from those cut from the fully decoded image by under half a
grey level on average (99th percentile 2 levels, a few up to ~10 at sharp edges);
tests/test_augment_decode.py bounds it. Their geometry is the same.
"""

from __future__ import annotations

import io
from collections.abc import Iterable

from PIL import Image, UnidentifiedImageError

from gramline.errors import InputError

REDUCTIONS = (8, 4, 2)  # libjpeg's DCT scalings, largest first


def open_image(image: Image.Image | bytes) -> Image.Image:
    """An encoded image opened lazily (header only), or the given image."""
    if not isinstance(image, bytes | bytearray):
        return image
    try:
        return Image.open(io.BytesIO(image))
    except (UnidentifiedImageError, OSError) as err:
        raise InputError("image", f"bytes cannot be read as an image ({err})", "an encoded JPEG or PNG") from err


def largest_reduction(crops: Iterable[tuple[float, float, int]]) -> int:
    """The largest of 8, 4, 2 (else 1) that leaves every crop of box size (w, h) in source pixels at
    least its output side `size` in both dimensions: crops = [(w, h, size), ...]."""
    smallest = min((min(w, h) / size for w, h, size in crops), default=1.0)
    return next((r for r in REDUCTIONS if smallest >= r), 1)


def draft_for_crops(image: Image.Image, crops: Iterable[tuple[float, float, int]]) -> int:
    """Ask a not-yet-decoded JPEG `image` to decode at the largest reduction the crops allow; the
    reduction actually set (1 for other formats, or an image already decoded)."""
    reduction = largest_reduction(crops)
    if reduction == 1 or image.format != "JPEG":
        return 1
    width, height = image.size
    got = image.draft(image.mode, (width // reduction, height // reduction))
    if got is None:
        return 1
    return round(width / got[1][2])
