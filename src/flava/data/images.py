"""Finding image files (decoding is `flava.data.decode`)."""

from __future__ import annotations

import glob
import os
from pathlib import Path

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
            if not any(c in spec for c in "*?["):  # a plain path, not a pattern that matched nothing
                raise DataError(f"{spec} does not exist")
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True))
            found += [m for m in matches if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        raise DataError(f"no image files match {', '.join(map(str, specs))}")
    return found


def holds_images(spec: str) -> bool:
    """Whether a local path, folder (searched until the first) or glob names an image file: said
    when images are given where shards or text were asked for."""
    if "://" in spec or spec.startswith("pipe:"):
        return False
    p = Path(spec)
    candidates = p.rglob("*") if p.is_dir() else [p] if p.is_file() else map(Path, glob.iglob(spec, recursive=True))
    return any(q.suffix.lower() in IMAGE_SUFFIXES for q in candidates)


WRONG_KIND = {
    "pairs": "holds images without captions, which are image data (--images; data.images in a training config); "
             "pairs are WebDataset shards (.tar) or a table of image and caption",
    "text": "holds images or shards, not text (give them as data.images or data.pairs); text is .txt or .jsonl",
}
