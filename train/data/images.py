"""Image bytes in, RGB arrays out: the one place images are read and decoded.

Every image the framework touches goes through :func:`decode_rgb`, so EXIF rotation, CMYK,
grayscale, palette and alpha images, tiny and huge images are handled in one way everywhere.
"""
from __future__ import annotations

import atexit
import io
import multiprocessing.util  # registers multiprocessing's exit handler before ours (see end_loader_workers)
import signal
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
from PIL import Image, ImageOps

MIN_SIDE = 16  # smaller images carry no usable content for a 224 px task
Image.MAX_IMAGE_PIXELS = 16_000 * 16_000  # allow big photos (10k x 10k) but not decompression bombs


class BadImageError(ValueError):
    """An image that cannot be used; the message names the file (and row) and the reason.

    ``reason`` is a short category (``empty``, ``undecodable``, ``too_small``, ``too_large``, ``unreadable``)
    used to count skipped images.
    """

    def __init__(self, message: str, reason: str = "undecodable"):
        if message.startswith("Caught ") and "Traceback" in message:  # re-raised from a DataLoader worker: keep the
            message = message.rstrip().rsplit("BadImageError: ", 1)[-1]  # original message, not the worker's trace
        super().__init__(message)
        self.reason = reason

    def __reduce__(self):  # keep ``reason`` when raised inside a DataLoader / pool worker
        return type(self), (str(self), self.reason)


def decode_rgb(data: bytes, max_side: int | None = None, min_side: int = MIN_SIDE, where: str = "") -> np.ndarray:
    """Decode image bytes to an HxWx3 uint8 RGB array.

    Applies the EXIF orientation, converts CMYK / grayscale / palette to RGB, composites alpha
    on white. ``max_side`` lets JPEGs decode at a reduced scale (never below ``max_side``) and
    shrinks anything larger, so a 10,000 px photo costs little. Raises :class:`BadImageError`.
    """
    if not data:
        raise BadImageError(f"{where}: empty image (0 bytes)", "empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if max_side and img.format == "JPEG":
                img.draft("RGB", (max_side, max_side))
            img.load()
            img = ImageOps.exif_transpose(img)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise BadImageError(f"{where}: image too large to decode ({e})", "too_large") from None
    except Exception as e:  # PIL raises many types for corrupt data
        raise BadImageError(f"{where}: cannot decode image ({type(e).__name__}: {e})", "undecodable") from None
    if min(img.size) < min_side:
        raise BadImageError(f"{where}: image too small ({img.size[0]}x{img.size[1]} < {min_side} px)", "too_small")
    img = _to_rgb(img)
    if max_side and max(img.size) > 2 * max_side:
        img.thumbnail((2 * max_side, 2 * max_side), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def _to_rgb(img: Image.Image) -> Image.Image:
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def encode_jpeg(image: np.ndarray, quality: int = 90) -> bytes:
    """RGB array -> JPEG bytes (PIL, 4:2:0 as most cameras and the validator's re-encode)."""
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def image_bytes_from_cell(cell) -> bytes:
    """A parquet image cell -> bytes: raw binary, or the HF ``{"bytes", "path"}`` struct."""
    if cell is None:
        return b""
    if isinstance(cell, dict):
        if cell.get("bytes"):
            return cell["bytes"]
        if cell.get("path"):
            return Path(cell["path"]).read_bytes()
        return b""
    return bytes(cell)


class ImageReader:
    """Reads the bytes of one sample from where the index says it lives.

    ``row < 0`` means ``file`` is an image file; otherwise ``file`` is a parquet file and
    ``column`` its image column. Parquet files are opened once per process (memory-mapped).
    """

    def __init__(self):
        self._tables: dict[str, object] = {}

    def read(self, file: str, row: int = -1, column: str = "") -> bytes:
        """The bytes of one sample: the image file ``file`` (``row < 0``; unreadable: :class:`BadImageError`), else the
        cell at ``row`` of the parquet file's ``column``."""
        if row < 0:
            try:
                return Path(file).read_bytes()
            except OSError as e:
                raise BadImageError(f"{file}: cannot read ({e.strerror})", "unreadable") from None
        table = self._tables.get(file)
        if table is None:
            table = self._tables[file] = pq.read_table(file, columns=[column], memory_map=True)
        return image_bytes_from_cell(table.column(column)[row].as_py())

    def __getstate__(self):  # open tables do not travel to DataLoader workers
        return {"_tables": {}}


def loader_worker_init(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: each loader worker is one process on one core, so OpenCV uses one thread; it
    ignores SIGTERM and SIGINT (a scheduler or Ctrl+C signals every process): the main process decides when to
    stop (:class:`~train.utils.faults.Preemption`) and ends its workers itself."""
    import cv2

    cv2.setNumThreads(1)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_IGN)


@atexit.register  # runs before multiprocessing's handler, registered earlier (atexit runs handlers last in, first out)
def end_loader_workers() -> None:
    """At exit, kill the daemonic child processes still alive: loader workers whose loaders an error's traceback
    kept. They ignore SIGTERM (:func:`loader_worker_init`), which is how multiprocessing ends daemonic children at
    exit before it waits for them: without this, a failed stage left the process waiting forever."""
    if hasattr(signal, "SIGCHLD"):  # PyTorch's handler would raise on the first killed worker
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()
            child.join(timeout=5)
