"""Finding image files (decoding is `flava.data.decode`)."""

from __future__ import annotations

import glob
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from ..errors import DataError

# Found in folders by these (a file named explicitly is decoded whatever its suffix): JPEG's other
# names (Windows' browsers save .jfif) and the formats Pillow reads whole.
IMAGE_SUFFIXES = {".png", ".apng", ".jpg", ".jpeg", ".jfif", ".jpe", ".jif", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                  ".ppm", ".pgm", ".pbm", ".pnm", ".ico", ".tga", ".avif"}


def passed_over(name: str) -> bool:
    """Whether a folder walk leaves out a file or folder of this name: dot-names (a notebook's
    .ipynb_checkpoints copies, a tool's .cache, .DS_Store, macOS's AppleDouble ._x.jpg) and the
    __MACOSX folder a zip made on a Mac holds. Copies and metadata, not the user's data: a class
    .ipynb_checkpoints had been trained and predicted. A file named explicitly is read."""
    return name.startswith(".") or name == "__MACOSX"


def walk_files(root: str | os.PathLike, file_links: set[str] | None = None) -> Iterator[Path]:
    """Every file below the folder `root`, in no set order, none `passed_over`. Folders are walked
    once each: the tree as it lies first, then the links to folders it holds (datasets are
    assembled with `ln -s`), in name order, where they reach a folder not walked yet and not one
    that holds `root` (a link to a parent would loop, or walk the parent's other folders): a
    `current -> v2` link beside `v2` had listed every image twice, as two classes. `file_links`
    receives the files yielded that are links (told without a stat), which may name a file
    yielded under its own name too."""
    top = os.path.realpath(root)
    walked: set[str] = set()
    links: list[str] = []

    def walk(start: str, real: str) -> Iterator[Path]:
        stack = [(start, real)]
        while stack:
            folder, real = stack.pop()
            if real in walked:
                continue
            walked.add(real)
            try:
                with os.scandir(folder) as listing:
                    entries = [e for e in listing if not passed_over(e.name)]
            except PermissionError:  # an unreadable sub-folder is passed over, as Path.rglob does
                continue
            for e in entries:
                if e.is_dir(follow_symlinks=False):
                    stack.append((e.path, os.path.join(real, e.name)))
                elif e.is_symlink() and e.is_dir():
                    links.append(e.path)
                else:  # a file, a link to one, or a dangling link (then named unreadable)
                    if file_links is not None and e.is_symlink():
                        file_links.add(os.path.abspath(e.path))
                    yield Path(e.path)

    yield from walk(str(root), top)
    while links:
        pending = sorted(links)
        links.clear()
        for link in pending:
            real = os.path.realpath(link)
            if real not in walked and not (top + os.sep).startswith(real.rstrip(os.sep) + os.sep):
                yield from walk(link, real)


def files_below(root: str | os.PathLike, suffixes: tuple[str, ...]) -> list[Path]:
    """The files below the folder `root` (`walk_files`: its sub-folders too) whose names end in one
    of `suffixes` (lower case), sorted: shards and parquet in sub-folders (a dataset's
    data/train/, img2dataset's parts) had been left out unsaid."""
    return sorted(q for q in walk_files(root) if q.name.lower().endswith(suffixes))


def holds_below(root: str | os.PathLike, suffixes: tuple[str, ...]) -> bool:
    """Whether the folder `root` holds a file ending in one of `suffixes` (lower case): at its top,
    else in its sub-folders, where the first image file found ends the search (an image folder
    is not walked whole to learn it holds no shards: its listing comes once, when it is read)."""
    with os.scandir(root) as listing:
        if any(e.name.lower().endswith(suffixes) for e in listing if not passed_over(e.name)):
            return True
    for q in walk_files(root):
        name = q.name.lower()
        if name.endswith(suffixes):
            return True
        if q.suffix.lower() in IMAGE_SUFFIXES:
            return False
    return False


def find_images(specs: list[str | os.PathLike], left_out: Counter | None = None,
                file_links: set[str] | None = None, utf8_names: bool = False) -> list[Path]:
    """Image files named by paths, directories (searched recursively: `walk_files`) or glob patterns;
    `left_out` counts by suffix the other files the directories hold (`said_left_out`);
    `file_links` receives the files found in directories that are links. `utf8_names`: for a
    command that writes each file's name to parquet or a UTF-8 table, which cannot hold a name
    that is not UTF-8: such a file is left out and counted (`NOT_UTF8_NAME`), not a traceback."""
    found: list[Path] = []
    others: Counter = Counter()

    def take(q: Path) -> None:
        if utf8_names and not utf8_name(q):
            others[NOT_UTF8_NAME] += 1
        else:
            found.append(q)

    for spec in specs:
        spec = str(spec)
        p = Path(spec)
        if p.is_dir():
            for q in sorted(walk_files(p, file_links)):
                if q.suffix.lower() in IMAGE_SUFFIXES:
                    take(q)
                else:
                    others[q.suffix.lower() or "no suffix"] += 1
        elif p.is_file():
            take(p)
        else:
            if not any(c in spec for c in "*?["):  # a plain path, not a pattern that matched nothing
                raise DataError(f"{spec} does not exist")
            # glob's wildcards already pass over dot-names; __MACOSX only where the pattern names it
            matches = sorted(Path(m) for m in glob.glob(spec, recursive=True)
                             if "__MACOSX" in spec or "__MACOSX" not in Path(m).parts)
            for m in matches:
                if m.is_file() and m.suffix.lower() in IMAGE_SUFFIXES:
                    take(m)
    if not found:
        # A name not UTF-8 shown, not raised as it is printed.
        named = ", ".join(os.fsencode(s).decode("utf-8", "replace") for s in specs)
        raise DataError(f"no image files match {named}{said_left_out(others)}")
    if left_out is not None:
        left_out.update(others)
    return found


class RealPaths:
    """Files' paths with every link resolved, a stat per folder (cached) rather than per file, so a
    folder of a million images costs what its folders do; a file that is itself a link (`links`)
    is resolved alone."""

    def __init__(self, links: set[str] | None = None):
        self.links = links or set()
        self._folders: dict[str, str] = {}

    def __call__(self, path: str | os.PathLike) -> str:
        path = os.path.abspath(path)
        if path in self.links:
            return os.path.realpath(path)
        folder, name = os.path.split(path)
        real = self._folders.get(folder)
        if real is None:
            real = self._folders[folder] = os.path.realpath(folder)
        return os.path.join(real, name)


def without_repeats(files: list[Path], links: set[str]) -> tuple[list[Path], int]:
    """`files` less those a link names a second time (a link beside its target, two links to one
    file), and how many were left out: the file under its own name is kept, else the first link."""
    if not links:
        return files, 0
    real = RealPaths(links)
    seen = {real(f) for f in files if os.path.abspath(f) not in links}
    kept = []
    for f in files:
        if os.path.abspath(f) in links:
            target = real(f)
            if target in seen:
                continue
            seen.add(target)
        kept.append(f)
    return kept, len(files) - len(kept)


def empty_class_folders(root: str | os.PathLike, images: list[Path]) -> list[str]:
    """The first-level sub-folders of `root` (class folders) that hold none of `images`, sorted:
    such a class had vanished from the classes unsaid."""
    root = Path(root)
    used = {f.relative_to(root).parts[0] for f in images if len(f.relative_to(root).parts) > 1}
    with os.scandir(root) as listing:
        folders = [e.name for e in listing if not passed_over(e.name) and e.is_dir()]
    return sorted(set(folders) - used)


def said_empty(root: str | os.PathLike, folders: list[str]) -> str:
    """The note naming `empty_class_folders` (at most five of them)."""
    named = ", ".join(map(repr, folders[:5])) + (f" and {len(folders) - 5} more" if len(folders) > 5 else "")
    return f"in {root}: {len(folders)} class folder(s) with no image in them left out: {named}"


NOT_UTF8_NAME = "with a name that is not UTF-8 (rename them)"
"""How `find_images` counts an image file whose name is not UTF-8 among the files left out."""


def utf8_name(path: str | os.PathLike) -> bool:
    """Whether a path can be written as UTF-8 text (JSON, parquet, a CSV)."""
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:  # the undecodable bytes of a name, kept by Python as lone surrogates
        return False
    return True


def said_left_out(left_out: Counter, before: str = " (", after: str = ")") -> str:
    """'3 other files left out: .txt 2, .heic 1' between `before` and `after`, said beside a count of
    the images found (a photo in a format not read, .heic, is then not missed unsaid); '' for none."""
    if not left_out:
        return ""
    n = sum(left_out.values())
    kinds = ", ".join(f"{k} {why}" if why == NOT_UTF8_NAME else f"{why} {k}"
                      for why, k in sorted(left_out.items(), key=lambda x: (-x[1], x[0])))
    return f"{before}{n} other file{'s' if n > 1 else ''} left out: {kinds}{after}"


def holds_images(spec: str) -> bool:
    """Whether a local path, folder (searched until the first) or glob names an image file: said
    when images are given where shards or text were asked for."""
    if "://" in spec or spec.startswith("pipe:"):
        return False
    p = Path(spec)
    candidates = walk_files(p) if p.is_dir() else [p] if p.is_file() else map(Path, glob.iglob(spec, recursive=True))
    return any(q.suffix.lower() in IMAGE_SUFFIXES for q in candidates)


WRONG_KIND = {
    "pairs": "holds images without captions, which are image data (--images; data.images in a training config); "
             "pairs are WebDataset shards (.tar) or a table of image and caption",
    "text": "holds images or shards, not text (give them as data.images or data.pairs); text is .txt or .jsonl",
}
