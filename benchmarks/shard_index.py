"""Opening a shard: its tar headers walked by the loader (`tars._plain_listing`) against the same
shard listed by Python's tarfile (what the loader did before, and does where the walk declines), in
one process on the same files, alternated. A shard is opened each time a loader lane reaches it.

The shards: img2dataset's layout (a .jpg, .txt and .json per sample), 1,000 samples each, in the
three header formats shards are written in: ustar (webdataset's writer), pax with a header per
member (Python tarfile's default with float times, as `tar.add` gives them), GNU (GNU tar's).

    python benchmarks/shard_index.py [--samples 1000] [--rounds 7]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tarfile
import tempfile
import time
from pathlib import Path

import flava.data.tars as tars

FORMATS = {"ustar": tarfile.USTAR_FORMAT, "pax": tarfile.PAX_FORMAT, "gnu": tarfile.GNU_FORMAT}


def make_shard(path: Path, samples: int, fmt: int) -> Path:
    with tarfile.open(path, "w", format=fmt) as tar:
        for i in range(samples):
            for ext, size in ((".jpg", 24_000), (".txt", 60), (".json", 200)):
                info = tarfile.TarInfo(f"{i:09d}{ext}")
                info.size, info.mtime = size, 1.7e9 + i / 7  # float times: a pax header per member in pax
                tar.addfile(info, io.BytesIO(bytes(size)))
    return path


def tarfile_listing(f, total: int):
    f.seek(0)
    with tarfile.open(fileobj=f, mode="r:") as tar:
        for info in tar:
            yield info.name, info.offset_data, info.size, info.isfile(), info.issym() or info.islnk()


def open_us(shard: tars.TarShard, listing) -> tuple[float, int]:
    tars._listing = listing
    t = time.perf_counter()
    opened = shard.open()
    return time.perf_counter() - t, len(opened.records)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=1000)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    walk = tars._listing
    print(f"opening a shard of {args.samples} samples (.jpg, .txt, .json each), median of {args.rounds} "
          "alternated rounds")
    print(f"  {'format':8s} {'walked':>8s} {'tarfile':>8s}  (us a sample)  tarfile/walked")
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt in FORMATS.items():
            shard = tars.TarShard(str(make_shard(Path(tmp) / f"{name}.tar", args.samples, fmt)), "pairs")
            with open(shard.url, "rb") as f:  # walked, not declined to tarfile
                assert tars._plain_listing(f, Path(shard.url).stat().st_size) is not None
            ours, theirs = [], []
            for _ in range(args.rounds):
                dt, n = open_us(shard, walk)
                ours.append(dt / n * 1e6)
                dt, n = open_us(shard, tarfile_listing)
                theirs.append(dt / n * 1e6)
            a, b = statistics.median(ours), statistics.median(theirs)
            print(f"  {name:8s} {a:8.1f} {b:8.1f}  {'':13s}  {b / a:.2f}x")
    tars._listing = walk
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
