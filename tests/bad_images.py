"""A generated corpus of awkward image files (nothing binary is committed)."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def _save(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(w: int = 64, h: int = 48, seed: int = 0) -> np.ndarray:
    return (np.random.default_rng(seed).random((h, w, 3)) * 255).astype(np.uint8)


def jpeg(w: int = 64, h: int = 48, seed: int = 0) -> bytes:
    return _save(Image.fromarray(photo(w, h, seed)), "JPEG", quality=90)


def usable() -> dict[str, bytes]:
    """Odd but usable images: each must decode to an RGB array."""
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    return {
        "png_alpha": _save(Image.fromarray(np.dstack([photo(), np.full((48, 64), 128, np.uint8)]), "RGBA"), "PNG"),
        "cmyk_jpeg": _save(Image.fromarray(photo()).convert("CMYK"), "JPEG"),
        "grayscale": _save(Image.fromarray(photo()[..., 0]), "JPEG"),
        "palette_png": _save(Image.fromarray(photo()).convert("P"), "PNG"),
        "exif_rotated": _save(Image.fromarray(photo(64, 48)), "JPEG", exif=exif),
    }


def unusable() -> dict[str, tuple[bytes, str]]:
    """Images that must be skipped, with the reason they are counted under."""
    return {
        "zero_byte": (b"", "empty"),
        "truncated_jpeg": (jpeg()[:300], "undecodable"),
        "not_an_image": (b"this is text, not an image" * 10, "undecodable"),
        "one_pixel": (_save(Image.new("RGB", (1, 1)), "PNG"), "too_small"),
    }


def bomb_png(side: int = 20_000) -> bytes:
    """A PNG whose header claims ``side`` x ``side`` pixels (above PIL's limit) over a few bytes of data: a
    decompression bomb, made without allocating it."""
    import struct
    import zlib

    data = bytearray(_save(Image.new("RGB", (16, 16)), "PNG"))
    ihdr = 8 + 8  # signature, then the IHDR chunk's length and type
    data[ihdr:ihdr + 8] = struct.pack(">II", side, side)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[ihdr - 4:ihdr + 13])))
    return bytes(data)
