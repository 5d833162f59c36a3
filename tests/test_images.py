"""Decoding: awkward images are converted, unusable ones raise BadImageError with a reason."""
import io

import numpy as np
import pytest
from PIL import Image

from bad_images import jpeg, unusable, usable
from train.data.images import BadImageError, ImageReader, decode_rgb, image_bytes_from_cell


@pytest.mark.parametrize("name", sorted(usable()))
def test_odd_images_decode_to_rgb(name):
    image = decode_rgb(usable()[name], where=name)
    assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3


def test_exif_orientation_is_applied():
    image = decode_rgb(usable()["exif_rotated"])
    assert image.shape[:2] == (64, 48)  # stored 48 high x 64 wide, displayed rotated


def test_alpha_is_composited_on_white():
    rgba = np.zeros((32, 32, 4), np.uint8)  # fully transparent black
    buf = io.BytesIO()
    Image.fromarray(rgba, "RGBA").save(buf, format="PNG")
    assert decode_rgb(buf.getvalue()).min() == 255


@pytest.mark.parametrize("name", sorted(unusable()))
def test_unusable_images_raise_with_reason(name):
    data, reason = unusable()[name]
    with pytest.raises(BadImageError, match="somefile.parquet row 7") as err:
        decode_rgb(data, where="somefile.parquet row 7")
    assert err.value.reason == reason


def test_huge_image_is_shrunk_on_decode():
    big = Image.new("RGB", (10_000, 10_000), (200, 120, 0))
    buf = io.BytesIO()
    big.save(buf, format="JPEG", quality=50)
    image = decode_rgb(buf.getvalue(), max_side=256)
    assert max(image.shape[:2]) <= 512 and image[0, 0, 0] > 150


def test_parquet_cells_and_files(tmp_path):
    assert image_bytes_from_cell({"bytes": b"abc", "path": None}) == b"abc"
    assert image_bytes_from_cell(b"xyz") == b"xyz"
    (tmp_path / "a.jpg").write_bytes(jpeg())
    assert ImageReader().read(str(tmp_path / "a.jpg")) == jpeg()
    with pytest.raises(BadImageError, match="missing.jpg"):
        ImageReader().read(str(tmp_path / "missing.jpg"))
