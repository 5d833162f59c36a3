"""The natural photographs scikit-image ships (no download): a reference for content-dependent statistics.

Synthetic scenes may be flatter than real streets, so statistics such as APT's token reduction are
also reported on these. scikit-image is optional (``pip install scikit-image``, in ``.[dev]``).
"""
from __future__ import annotations

import logging

import numpy as np

log = logging.getLogger(__name__)
# photographs (not drawings, text or binary masks) that ship inside the scikit-image wheel
PHOTOS = ("astronaut", "camera", "coffee", "chelsea", "rocket", "coins", "moon", "grass", "gravel", "brick",
          "clock", "hubble_deep_field", "immunohistochemistry", "retina", "cell")


def natural_photos() -> dict[str, np.ndarray]:
    """``{name: uint8 HxWx3 RGB}``; empty when scikit-image is not installed. Missing photos are skipped."""
    try:
        import skimage.data
    except ImportError:
        log.info("scikit-image is not installed: no natural-photograph statistics (pip install scikit-image)")
        return {}
    photos, missing = {}, []
    for name in PHOTOS:
        try:
            image = np.asarray(getattr(skimage.data, name)())
        except Exception:  # noqa: BLE001 - a photo this version does not ship (or would download)
            missing.append(name)
            continue
        if image.ndim == 2:
            image = np.repeat(image[:, :, None], 3, axis=2)
        photos[name] = np.ascontiguousarray(image[:, :, :3]).astype(np.uint8)
    if missing:
        log.info("scikit-image %s lacks %d of the photos: %s", skimage.__version__, len(missing), missing)
    return photos
