"""Finding and decoding image files; unreadable ones are skipped and counted by kind."""

from __future__ import annotations

import glob
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from ..errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


def find_images(specs: list[str | os.PathLike]) -> list[Path]:
    """Image files named by paths, directories (searched recursively) or glob patterns."""
    found: list[Path] = []
    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            found += sorted(q for q in p.rglob("*") if q.suffix.lower() in IMAGE_SUFFIXES)
        elif p.is_file():
            found.append(p)
        else:
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            found += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise DataError(f"no image files match {', '.join(map(str, specs))}")
    return found


def decode_image(path: Path, skipped: Counter) -> Image.Image | None:
    """An RGB image, or None (counted in `skipped` by reason) if it cannot be read."""
    try:
        if path.stat().st_size == 0:
            skipped["empty file"] += 1
            return None
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except FileNotFoundError:
        skipped["missing file"] += 1
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        skipped["unreadable image"] += 1
    return None


def demo_images(max_easy_vqa: int | None = None) -> list[Image.Image]:
    """The packaged demo images: easy-vqa's training images and the scikit-image photographs."""
    from easy_vqa import get_train_image_paths

    from .demo import skimage_photos
    from .transforms import to_rgb

    paths = [Path(p) for _, p in sorted(get_train_image_paths().items())][:max_easy_vqa]
    skipped: Counter = Counter()
    images = [im for im in (decode_image(p, skipped) for p in paths) if im is not None]
    images += [to_rgb(arr) for arr, _ in skimage_photos().values()]
    return images


def as_uint8(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.uint8)
