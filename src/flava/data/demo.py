"""Data that ships inside installed packages, for the demo and tests."""

from __future__ import annotations

import numpy as np

# scikit-image photographs that ship in the wheel (others are fetched on first use: not here),
# with a caption a person would write.
SKIMAGE_PHOTOS = {
    "astronaut": "an astronaut in a space suit holding a helmet",
    "chelsea": "a ginger cat lying down",
    "coffee": "a cup of coffee on a saucer",
    "rocket": "a rocket on the launch pad",
    "camera": "a man with a camera on a tripod",
    "coins": "old coins on a table",
    "horse": "the silhouette of a horse",
    "moon": "the surface of the moon",
}


def skimage_photos() -> dict[str, tuple[np.ndarray, str]]:
    """name -> (image array, caption) for every listed photograph that loads offline."""
    from skimage import data

    out = {}
    for name, caption in SKIMAGE_PHOTOS.items():
        try:
            out[name] = (np.asarray(getattr(data, name)()), caption)
        except Exception:  # a photograph that would need a download is skipped
            continue
    return out
